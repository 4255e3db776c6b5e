"""The ahead-of-time compile report itself: a known kernel compiles for sm_80 and sm_90 and the
report sees its tensor-core dot, its shared memory and its register use."""

import pytest
import torch
import triton
import triton.language as tl

from echo_kernels import aot


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

