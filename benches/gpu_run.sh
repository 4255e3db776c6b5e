#!/usr/bin/env bash
# Everything a GPU machine can tell us, in one call of at most 8 minutes (--quick: 4), without network:
#
#   bash benches/gpu_run.sh RESULTS_DIR              # build, kernel tests on CUDA, every bench, report
#   bash benches/gpu_run.sh --quick RESULTS_DIR      # build, a shorter kernel test, the headline benches, report
#   bash benches/gpu_run.sh --rehearse RESULTS_DIR   # every step on this CPU (CI): see below
#   bash benches/gpu_run.sh --plan [--quick]         # the steps and their time limits; runs nothing
#
# Steps, in this order, each under its own time limit (PLAN below), so a hang costs that step only:
#   build        pip install -e . with the CUDA extension for this GPU's arch only; python -m echo_kernels.info
#   correctness  the kernel tests on CUDA tensors (fp32, fp16, bf16, the encoder shape, determinism):
#                CORRECTNESS_FILES, whose tests marked gpu run there too; the AOT compile tests stay in CI;
#                shared among sessions side by side (one per two cores), a line per test
#   headline     the bench cases of README's headline comparisons (marked `headline` in benches/conftest.py)
#   benches      every other bench case (not under --quick)
#   report       results.md and speedups.png from whatever results.json holds; runs even when a step before
#                failed or was killed
#
# RESULTS_DIR (absent or empty) receives, flat, 8 files at most, each as soon as it exists:
#   results.json   every finished bench case, rewritten as each case ends (benches/conftest.py)
#   results.md     the table of cases, the steps' exit codes and times, the tests that could not run
#   speedups.png   the speed-up plot (when matplotlib is installed)
#   NAME.log       one per step, its output as it comes (a failure's traceback as it fails), ending
#                  "== NAME: exit RC after S s (limit L s)"
#
# --rehearse runs the same steps on a CPU, for CI: no pip install (the checkout is already installed),
# Triton kernels under TRITON_INTERPRET=1, benches at ECHO_BENCH_SIZE=tiny without their torch.compile
# peers (a C++ build each on a CPU), the shorter kernel test of --quick, and the speech extra hidden from
# Python (tests/hide_modules), as on the GPU machine.
set -uo pipefail

# name, seconds under the full run, seconds under --quick (0: not run). Each column sums to at most 470
# and 230: 10 s are left for the script around the steps, under the 480 s and 240 s budgets.
PLAN="
build         90  90
correctness  170  80
headline     100  45
benches       90   0
report        20  15
"
# Smallest first where a file's kernels are few, so that one slow file leaves the others some time
CORRECTNESS_FILES=(tests/test_plain_attention.py tests/test_attention.py tests/test_rotary.py tests/test_orthogonal.py
                   tests/test_attention_shapes.py tests/test_masked_values.py tests/test_near_bias_tiles.py
                   tests/test_loop_stages.py tests/test_properties_triton.py)
CORRECTNESS_FULL="not aot"
CORRECTNESS_QUICK="(gpu or forward_matches_reference or deterministic or bf16 or fp16) and not aot"
GRACE=5  # a step gets SIGTERM GRACE seconds before its limit, SIGKILL at it

usage() {
    echo "usage: bash benches/gpu_run.sh [--quick | --rehearse] RESULTS_DIR   |   bash benches/gpu_run.sh --plan [--quick]" >&2
    exit 2
}

mode=full plan_only=0 out=""
for arg in "$@"; do
    case "$arg" in
        --quick) [ "$mode" = full ] || usage; mode=quick ;;
        --rehearse) [ "$mode" = full ] || usage; mode=rehearse ;;
        --plan) plan_only=1 ;;
        -*) echo "gpu_run.sh: unknown option $arg" >&2; usage ;;
        *) [ -z "$out" ] || usage; out=$arg ;;
    esac
done
column=2
[ "$mode" = quick ] && column=3

plan() {  # the steps that run in this mode: "name seconds" lines
    awk -v c="$column" 'NF == 3 && $c > 0 {print $1, $c}' <<<"$PLAN"
}

if [ "$plan_only" = 1 ]; then
    [ -z "$out" ] || usage
    plan
    plan | awk '{s += $2} END {print "total", s}'
    exit 0
fi
if [ -z "$out" ]; then
    echo "gpu_run.sh: RESULTS_DIR is required (where the results and logs are written)" >&2
    usage
fi
if [ -e "$out" ] && [ -n "$(ls -A "$out" 2>/dev/null)" ]; then
    echo "gpu_run.sh: RESULTS_DIR must be absent or empty: $out" >&2
    exit 2
fi
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.." || exit 2
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
export ECHO_BENCH_JSON="$out/results.json" ECHO_BENCH_APPEND=1
# stream_failures (benches/stream_failures.py): each failure's traceback in the log as it happens, since
# a step killed at its limit never prints pytest's summary
export PYTHONPATH="$PWD/benches${PYTHONPATH:+:$PYTHONPATH}"
pytest_args=(-p no:cacheprovider -p stream_failures --tb=short)
# Triton compiles a kernel on one core, and compiles are most of a kernel test's time on a fresh machine:
# the correctness step runs its tests in a session per two cores (2 to 8 sessions), each a share of them
# (ECHO_TEST_SHARD, tests/conftest.py), a line per test
shards=$(( $(nproc) / 2 ))
(( shards >= 2 )) || shards=2
(( shards <= 8 )) || shards=8
bench_filter=()
correctness_filter=$CORRECTNESS_FULL
[ "$mode" = full ] || correctness_filter=$CORRECTNESS_QUICK
if [ "$mode" = rehearse ]; then
    speech=$(python3 -c "from echo_kernels.optional import OPTIONAL; print(*sorted(m for m, (_, e) in OPTIONAL.items() if e == 'speech'))")
    export TRITON_INTERPRET=1 ECHO_BENCH_SIZE=tiny ECHO_HIDE_MODULES="$speech"
    export PYTHONPATH="$PWD/tests/hide_modules${PYTHONPATH:+:$PYTHONPATH}"
    bench_filter=(-k "not compiled")
fi

limit_of() { plan | awk -v n="$1" '$1 == n {print $2}'; }

status=0
step() {  # step NAME COMMAND...: run under NAME's limit, output to NAME.log as it comes, then the exit line
    local name=$1 limit
    shift
    limit=$(limit_of "$name")
    [ -n "$limit" ] || return 0
    echo "== $name: $* (limit $limit s)" | tee "$out/$name.log"
    local start=$SECONDS
    timeout --kill-after="$GRACE" "$((limit - GRACE))" "$@" 2>&1 | tee -a "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start)) s (limit $limit s)" | tee -a "$out/$name.log"
    [ "$rc" -eq 0 ] || status=1
}

build() {
    if [ "$mode" = rehearse ]; then
        echo "rehearsal: pip install skipped (this checkout is already installed)"
        python3 -c "import importlib.util as u; print('hidden from Python:', *[m for m in '$ECHO_HIDE_MODULES'.split() if u.find_spec(m) is None])"
    else
        local arch
        arch=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || return 1
        echo "TORCH_CUDA_ARCH_LIST=$arch (this GPU's arch only)"
        TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$(nproc) python3 -m pip install --no-deps --no-build-isolation -e . || return 1
    fi
    python3 -m echo_kernels.info
}

sharded() {  # sharded PYTEST_COMMAND...: $shards sessions of it side by side, each line tagged with its shard
    set -o pipefail
    local i pids=() rc=0
    for ((i = 0; i < shards; i++)); do
        # a subshell, so that its pid's status is the pipeline's (pipefail): the tests', not sed's
        (ECHO_TEST_SHARD="$i/$shards" "$@" 2>&1 | sed -u "s|^|[shard $i/$shards] |") &
        pids+=($!)
    done
    for i in "${pids[@]}"; do
        wait "$i" || rc=1
    done
    return $rc
}

report() {
    local rc=0
    rm -f "$out/results.json.partial"  # left only by a session killed while it wrote
    if [ -f "$out/results.json" ]; then
        local plot=()
        if python3 -c "import matplotlib" 2>/dev/null; then
            plot=(--plot "$out/speedups.png")
        else
            echo "no plot: matplotlib is not installed"
        fi
        python3 -m echo_kernels.report "$out/results.json" --markdown "$out/results.md" "${plot[@]}" || rc=1
    else
        echo "No bench case finished: there is no results.json." | tee "$out/results.md"
    fi
    {
        printf '\n## Steps (%s)\n\n' "$mode"
        for name in $steps; do
            [ "$name" = report ] || tail -n 1 "$out/$name.log" 2>/dev/null || echo "== $name: no log"
        done | sed 's/^== /- /'
        echo "- report: this step"
        if grep -h '^not run (missing' "$out"/*.log >/dev/null 2>&1; then
            printf '\n## Tests not run\n\n'
            grep -h '^not run (missing' "$out"/*.log | sed 's/^/- /'
        fi
    } >>"$out/results.md"
    return $rc
}
steps=$(plan | awk '{print $1}' | tr '\n' ' ')
export -f build sharded report
export mode out steps shards

step build bash -c build
step correctness bash -c 'sharded "$@"' sharded python3 -m pytest "${pytest_args[@]}" -v --durations=5 \
    "${CORRECTNESS_FILES[@]}" -k "$correctness_filter"
step headline python3 -m pytest -q "${pytest_args[@]}" -s benches -m headline "${bench_filter[@]}"
step benches python3 -m pytest -q "${pytest_args[@]}" -s benches -m "not headline" "${bench_filter[@]}"
step report bash -c report
echo "results in $out (exit $status)"
exit $status
