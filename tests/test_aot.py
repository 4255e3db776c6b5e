"""The ahead-of-time compile report itself: a known kernel compiles for sm_80 and sm_90 and the
report sees its tensor-core dot, its shared memory and its register use."""

import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

from echo_kernels import aot
from echo_kernels.kernels import attention_backward


@triton.jit
def _square_kernel(X, Y, stride, N: tl.constexpr):
    rows = tl.arange(0, N)
    offsets = rows[:, None] * stride + rows[None, :]
    x = tl.load(X + offsets)
    tl.store(Y + offsets, tl.dot(x, x))


@pytest.mark.parametrize("arch", aot.TARGETS)
def test_compile_report_sees_tensor_cores(arch):
    spec = aot.KernelSpec(
        name="square", fn=_square_kernel,
        signature={"X": "*fp16", "Y": "*fp32", "stride": "i32", "N": "constexpr"}, constexprs={"N": 64},
    )
    x, y = torch.empty(64, 64, dtype=torch.float16), torch.empty(64, 64, dtype=torch.float32)
    report = aot.compile_spec(spec, arch, launch=((x, y, 64), {"N": 64}))
    assert report.mma
    assert report.wgmma == (arch == 90)  # wgmma exists only on Hopper
    assert report.shared_bytes > 0
    assert 0 < report.registers <= 255
    assert report.spilled_bytes == 0


@triton.jit
def _libdevice_sine_kernel(X, Y, N: tl.constexpr):
    offsets = tl.arange(0, N)
    tl.store(Y + offsets, tl.sin(tl.load(X + offsets)))


def test_libdevice_sine_keeps_a_stack_frame():
    """What test_launches_keep_no_stack_frame_but_to_spill guards against: tl.sin, libdevice's, inlines
    a slow path for large angles whose table goes through a stack frame, spilling nothing."""
    spec = aot.KernelSpec(name="sine", fn=_libdevice_sine_kernel,
                          signature={"X": "*fp32", "Y": "*fp32", "N": "constexpr"}, constexprs={"N": 128})
    x = torch.empty(128)
    report = aot.compile_spec(spec, 90, launch=((x, x), {"N": 128}))
    assert report.stack_bytes > 0 and report.spilled_bytes == 0


def test_launches_keep_no_stack_frame_but_to_spill(aot_reports):
    """No launch of any kernel module, on either target, keeps a stack frame but one that spills: every
    kernel takes its sines and cosines from kernels.angles._sincos, in registers, where libdevice's would
    put a frame in every pass that rotates (test_libdevice_sine_keeps_a_stack_frame)."""
    assert aot_reports
    framed = [(r.name, r.arch, r.stack_bytes) for r in aot_reports if r.stack_bytes and not r.spilled_bytes]
    assert not framed, framed


# The launches that spill under CI's Triton, and why: the dk/dv pass summing dq on sm_90 (docs/model.md,
# "Backward passes"): dk/dv's accumulators, a third product per query tile and the bias table's sums; the
# shapes that spill nothing execute more instructions per pair than the dk/dv and dq passes together. No
# tile table runs it (DQ_IN_KEY_PASS): the GPU benches time it against the dk/dv and dq passes.
SPILLING_LAUNCHES = {(f"attention_bwd_dkdv_dq_h{h}_{dt}", 90)
                     for h in (32, 64, 128) for dt in ("bf16", "fp16")}


def test_ci_triton_launches_spill_nothing():
    """In the committed report of the Triton that CI installs, every launch of every kernel module
    (rotary, fused attention forward and backward, the plain flash kernels) on both targets spills no
    register, but SPILLING_LAUNCHES, a few hundred bytes at most. Reports of other versions are
    recorded beside it, not held to this."""
    spills = aot.recorded_spills(aot.CI_TRITON)
    assert set(spills) == {(spec.name, arch) for arch in aot.TARGETS for spec in aot.all_specs(arch)}
    assert {key for key, n in spills.items() if n} == SPILLING_LAUNCHES
    assert all(spills[key] <= 512 for key in SPILLING_LAUNCHES)
    assert not any(attention_backward.DQ_IN_KEY_PASS.values())


def test_sass_listing_marks_the_loops_the_report_counts():
    """`python -m echo_kernels.aot --sass NAME` (here from under the interpreter, as the tests run):
    one launch's SASS, each main loop opened by the counts that the committed report records for it."""
    name = "plain_attention_fwd_h64_bf16"
    run = subprocess.run([sys.executable, "-m", "echo_kernels.aot", "--sass", name, "--arch", "90"],
                         capture_output=True, text=True, env=dict(os.environ, TRITON_INTERPRET="1"))
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert lines[0] == f"// {name}, sm_90"
    recorded = aot.recorded_loops(triton.__version__)[(name, 90)]
    assert len(recorded) == 2  # the plain forward: whole key tiles, then the masked ragged one
    opened = [line.split(": ", 1)[1] for line in lines if "// ---- main loop " in line]
    assert opened == [str(loop) for loop in recorded]
    assert sum("// ---- end of main loop " in line for line in lines) == len(recorded)
    assert any("HGMMA" in line for line in lines)


def test_sass_listing_refuses_an_unknown_launch():
    run = subprocess.run([sys.executable, "-m", "echo_kernels.aot", "--sass", "no_such_kernel"],
                         capture_output=True, text=True, env=dict(os.environ, TRITON_INTERPRET="0"))
    assert run.returncode == 2 and "no launch named 'no_such_kernel'" in run.stderr


def test_launch_shape_names_blocks_warps_and_stages():
    spec = lambda **ce: aot.KernelSpec("k", _square_kernel, {}, ce, num_warps=8, num_stages=2)
    assert aot.launch_shape(spec(HEAD=64, BLOCK_M=128, BLOCK_N=64, PRECISION="tf32")) == "128x64/8w/2s"
    assert aot.launch_shape(spec(HEAD=64, BLOCK=32)) == "32/8w/2s"
    assert aot.launch_shape(spec(BLOCK_T=64, BLOCK_K=128, BLOCK_P=32)) == "64x128x32/8w/2s"
    assert aot.launch_shape(spec(N=64)) == "-/8w/2s"


def test_reports_compile_in_a_child_process_with_the_interpreter_on_or_off(monkeypatch):
    """Finding the launches swaps JITFunction.run for a recorder: in the calling process (a test session
    on a GPU, where the compile ran in a thread beside the kernel tests) it would record that session's
    own launches instead of running them. So reports() always starts `python -m echo_kernels.aot`."""
    monkeypatch.setattr(aot, "_compile_all", lambda arches: pytest.fail("compiled in the calling process"))
    children = []

    def child(args, **kwargs):
        children.append(args)
        with open(args[args.index("--json") + 1], "w") as f:
            f.write("[]")
        return subprocess.CompletedProcess(args, 0, "", "")

    monkeypatch.setattr(aot, "_without_interpreter", child)
    for interpreted in ("1", "0"):
        monkeypatch.setenv("TRITON_INTERPRET", interpreted)
        assert aot.reports((80,)) == []
    assert [args[2:] for args in children] == [["--arch", "80"]] * 2


def test_band_sides_equal_to_one_compile_as_the_jit_specialises_them():
    """The JIT passes an integer argument equal to 1 as a plain int (a constexpr), on which a tensor's
    methods do not exist; the interpreter, which does not specialise, cannot show that. So the forward
    and the dq pass, given the band (1, 1), compile for sm_90 with both sides specialised so
    (tests/compile_band_of_one.py, in a child process with the interpreter off, as echo_kernels.aot)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "compile_band_of_one.py")
    run = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.split() == ["_attn_fwd_kernel", "_attn_bwd_dq_kernel"], run.stdout

