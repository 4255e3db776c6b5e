#!/usr/bin/env bash
# Everything a GPU machine can tell us, in one run of under ten minutes, without network access:
# build the extension for this GPU, run the test suite (on a GPU the kernel tests run on CUDA
# tensors, and the tests marked gpu run too), run `pytest benches/` at full sizes, and write the
# results (JSON, markdown table, PNG plot, logs) under benches/results/<device>-<date>/, ready to
# commit. Each step has a time limit, so a hang costs that step only.
#
#   bash benches/gpu_run.sh                      # from the repository root
#   ECHO_RESULTS_DIR=/some/dir bash benches/gpu_run.sh
set -uo pipefail
cd "$(dirname "$0")/.."

device=$(python3 -c "import torch; print(torch.cuda.get_device_name())" | tr 'A-Z ' 'a-z-' | tr -cd 'a-z0-9-')
out="${ECHO_RESULTS_DIR:-benches/results/${device}-$(date +%Y-%m-%d)}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $out/NAME.log, remember a failure, go on
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || status=1
}

step build 150 python3 -m pip install --no-deps --no-build-isolation -e .
step info 30 python3 -m echo_kernels.info
step tests 200 python3 -m pytest -q --durations=15 tests
export ECHO_BENCH_JSON="$out/results.json"
step benches 200 python3 -m pytest -q -s benches
if [ -f "$out/results.json" ]; then
    step report 30 python3 -m echo_kernels.report "$out/results.json" --markdown "$out/results.md" --plot "$out/speedups.png"
fi
echo "results in $out (exit $status)"
exit $status
