"""rotary_orthogonal, y = RoPE(x @ M): the Triton kernel against its peers, forward and backward.

    pytest benches/bench_rotary.py                  # pytest-benchmark table
    pytest benches/bench_rotary.py -s               # plus the roofline line of every case

Peers, in the same run:
- reference: the plain-PyTorch maths (a matmul, a cos/sin table, an elementwise pass);
- compiled: `torch.compile` of the reference;
- folded (GPU): M folded into the projection weight ahead of time, so only a plain rotary runs here
  (torch.compile of the rotary alone: the best a model could do without this kernel);
- kernel (GPU): the fused Triton kernel.

On a GPU the shape is Echo's (B=8, T=1500, H=16, h=64) in bf16; each case also prints its roofline:
bytes read and written over the copy bandwidth measured on this device in the same run. Without a GPU
the kernel only runs through the Triton interpreter, far too slow to time, so the CPU run compares the
reference with its compiled form on a small shape; the kernel and folded cases are marked gpu.
"""

from __future__ import annotations

import pytest
import torch

import echo_kernels
from echo_kernels import reference
from harness import TINY, ceilings, record

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
B, T, H, h = (8, 1500, 16, 64) if GPU else (2, 64, 4, 64)
if TINY:  # ECHO_BENCH_SIZE=tiny (harness.py)
    B, T, H, h = 1, 16, 2, 32
DTYPE = torch.bfloat16 if GPU else torch.float32
OFFSET, LAYOUT = 0, "half_split"


def make_inputs(requires_grad: bool):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(B, T, H, h, device=DEVICE, generator=g).to(DTYPE)
    M = torch.linalg.qr(torch.randn(h, h, device=DEVICE, generator=g))[0]
    w = 10000.0 ** (-torch.arange(0, h, 2, device=DEVICE) / h)
    s = torch.tensor(1.0, device=DEVICE)
    tensors = [x, M, w, s]
    for t in tensors:
        t.requires_grad_(requires_grad)
    return tensors


def kernel(x, M, w, s):
    return echo_kernels.rotary_orthogonal(x, M, w, s, OFFSET, LAYOUT)


def ref(x, M, w, s):
    return reference.rotary_orthogonal(x, M, w, s, OFFSET, LAYOUT)


compiled_ref = torch.compile(ref)


@torch.compile
def _plain_rotary(u, w, s):
    """RoPE of an already projected u (B, T, H, h): M folded into the weight that produced u."""
    positions = torch.arange(OFFSET, OFFSET + u.shape[1], device=u.device)
    phi = reference.rope_angles(w, s, positions)[:, None, :]  # (T, 1, h/2)
    u1, u2 = u[..., 0::2].float(), u[..., 1::2].float()
    cos, sin = torch.cos(phi), torch.sin(phi)
    return torch.cat([u1 * cos - u2 * sin, u1 * sin + u2 * cos], dim=-1).to(u.dtype)


def folded(x, M, w, s):
    return _plain_rotary(x, w, s)


CASES = {"reference": ref, "compiled": compiled_ref, "folded": folded, "kernel": kernel}
# The kernel reaches CPU tensors only through the Triton interpreter, far too slow to time, and the
# folded peer exists to be compared with it: both run on the GPU only.
PARAMS = [pytest.param(name, marks=pytest.mark.gpu) if name in ("folded", "kernel") else name
          for name in CASES]


def bytes_moved(backward: bool) -> int:
    """Forward: read x, write y. Backward: read x and dy, write dx (M, w, s and dM are tiny)."""
    tensor = B * T * H * h * torch.finfo(DTYPE).bits // 8
    return 3 * tensor if backward else 2 * tensor


def roofline(benchmark, name: str, backward: bool) -> None:
    """Tag the case; the harness divides its bytes by the copy bandwidth it measured in this run."""
    record(benchmark, role="ours" if name == "kernel" else "peer", bytes=bytes_moved(backward))
    if GPU:
        seconds = benchmark.stats.stats.median
        achieved = bytes_moved(backward) / seconds
        bandwidth = ceilings()["copy_bandwidth"]
        print(f"\n  {bytes_moved(backward) / 1e6:.1f} MB in {seconds * 1e6:.1f} us: "
              f"{achieved / 1e9:.0f} GB/s, {100 * achieved / bandwidth:.0f}% of the "
              f"{bandwidth / 1e9:.0f} GB/s copy bandwidth")


def synchronized(fn):
    def run(*args):
        out = fn(*args)
        if GPU:
            torch.cuda.synchronize()
        return out

    return run


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv("ECHO_BACKEND", "triton" if GPU else "reference")


@pytest.mark.parametrize("name", PARAMS)
def test_forward(benchmark, name):
    fn = CASES[name]
    args = make_inputs(requires_grad=False)
    with torch.no_grad():
        fn(*args)  # compile / warm up outside the timing
        benchmark.group = f"rotary forward {tuple(args[0].shape)} {DTYPE}"
        benchmark.pedantic(synchronized(fn), args=args, rounds=50 if GPU else 5, warmup_rounds=3)
    roofline(benchmark, name, backward=False)


@pytest.mark.parametrize("name", PARAMS)
def test_backward(benchmark, name):
    fn = CASES[name]
    args = make_inputs(requires_grad=True)
    y = fn(*args)
    dy = torch.randn_like(y)
    grads = args if name != "folded" else args[:1]  # folded: x here stands for the projection output

    def backward():
        return torch.autograd.grad(y, grads, dy, retain_graph=True)

    backward()  # warm up
    benchmark.group = f"rotary backward {tuple(args[0].shape)} {DTYPE}"
    benchmark.pedantic(synchronized(backward), rounds=50 if GPU else 5, warmup_rounds=3)
    roofline(benchmark, name, backward=True)
