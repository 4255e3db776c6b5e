"""Static instruction counts of the benches' encoder attention launch (B = 8, H = 16, T = 1500, h = 64,
bf16, n = 15, global or a window, no padding, no M) compiled for sm_90 by the installed Triton: for each heavy
pass of the fused kernel (forward, dq, dk/dv) and of the plain flash kernel (echo_kernels.plain_attention, the
floor the fused one is measured against), each main loop's instructions (echo_kernels.aot) times the
iterations the launch runs it, in warp-instructions per (batch, head), and the fused passes' totals against
the plain ones'. A static estimate of the work, made without a GPU: not a time.

    python benches/static_counts.py [--json] [--window W]
    # W: the band |i - j| <= W, as the benches' local case

The iterations are counted by running one (batch, head) of each launch at the same tiles under the Triton
interpreter, in a child process, with every loop function watched. A program calls its loop functions in
the order its main loops have in the SASS, so the k-th call of each program runs the k-th main loop; the
count of calls per program must equal the count of main loops.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys

B, H, T, HEAD, N_REL = 8, 16, 1500, 64, 15
ARCH = 90

# (pass, module, kernel, loop functions): the kernel's loops run inside these, each over range(lo, hi, BLOCK)
PASSES = (
    ("forward", "echo_kernels.kernels.attention", "_attn_fwd_kernel", ("_fwd_tiles", "_fwd_inner_tiles")),
    ("dq", "echo_kernels.kernels.attention_backward_queries", "_attn_bwd_dq_kernel",
     ("_dq_tiles", "_dq_inner_tiles")),
    ("dkdv", "echo_kernels.kernels.attention_backward_keys", "_attn_bwd_dkdv_kernel",
     ("_dkdv_tiles", "_dkdv_inner_tiles")),
    ("plain forward", "echo_kernels.kernels.plain_attention", "_plain_fwd_kernel", ("_fwd_tiles",)),
    ("plain dq", "echo_kernels.kernels.plain_attention", "_plain_bwd_dq_kernel", ("_dq_tiles",)),
    ("plain dkdv", "echo_kernels.kernels.plain_attention", "_plain_bwd_dkdv_kernel", ("_dkdv_tiles",)),
)


def _run_passes(batch: int, heads: int, dtype, window: int | None) -> None:
    """The fused kernel's forward and backward (with the band |i - j| <= window, or global) and the plain
    kernel's, on sm_90's tiles, at the benches' shape with `batch` and `heads`."""
    import torch

    from echo_kernels.kernels import attention, attention_backward, attention_common, plain_attention
    from echo_kernels.reference import UNBOUNDED

    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(batch, heads, T, HEAD, generator=g).to(dtype) for _ in range(4))
    w, s = torch.rand(HEAD // 2, generator=g), torch.ones(())
    bias = torch.randn(2 * N_REL - 1, heads, generator=g)
    side = UNBOUNDED if window is None else window
    band = (side, side, 0, 0, "half_split")
    with attention_common.tiles_of(ARCH):
        out, lse = attention.forward(q, k, v, None, w, s, bias, None, *band)
        attention_backward.backward(do, q, k, v, out, lse, None, w, s, bias, None, *band)
        out, lse = plain_attention.forward(q, k, v)
        plain_attention.backward(do, q, k, v, out, lse)


def _as_int(x) -> int:
    """A loop bound as the interpreter passes it: a tensor of one element, a constexpr or an int."""
    if hasattr(x, "handle"):
        return int(x.handle.data.reshape(-1)[0])
    return int(getattr(x, "value", x))


def count_iterations(window: int | None) -> dict[str, list[int]]:
    """{pass: the iterations of each call of its loop functions, in call order}, for one (batch, head) run
    under the interpreter (TRITON_INTERPRET=1 must be set before triton is imported)."""
    import importlib

    import torch

    calls: dict[str, list[int]] = {name: [] for name, *_ in PASSES}
    originals = []
    for name, module_name, _, loops in PASSES:
        module = importlib.import_module(module_name)
        for fn_name in loops:
            inner = getattr(module, fn_name)
            params = list(inspect.signature(getattr(inner, "fn", inner)).parameters)

            def watched(*args, _inner=inner, _params=params, _calls=calls[name]):
                bound = dict(zip(_params, args))
                step = _as_int(bound["BLOCK_N"] if "BLOCK_N" in bound else bound["BLOCK_M"])
                lo, hi = _as_int(bound["lo"]), _as_int(bound["hi"])
                _calls.append(max(0, -(-(hi - lo) // step)))
                return _inner(*args)

            originals.append((module, fn_name, inner))
            setattr(module, fn_name, watched)
    # the interpreter runs no bf16: fp32 inputs, on the tiles bf16 takes (fp32 has rows of its own)
    from echo_kernels.kernels import attention_common

    try:
        with attention_common.rows_of(torch.bfloat16):
            _run_passes(1, 1, torch.float32, window)
    finally:
        for module, fn_name, inner in originals:
            setattr(module, fn_name, inner)
    return calls


def compile_passes(window: int | None) -> dict[str, tuple[object, int]]:
    """{pass: (its compile report for sm_90, warps)} for the launches at the benches' shape, bf16."""
    import importlib

    import torch

    from echo_kernels import aot

    with aot.recording_launches() as launches:
        _run_passes(B, H, torch.bfloat16, window)
    reports = {}
    for name, module_name, kernel_name, _ in PASSES:
        kernel = getattr(importlib.import_module(module_name), kernel_name)
        _, args, kwargs = next(launch for launch in launches if launch[0] is kernel)
        report = aot.compile_spec(aot.spec_of_launch(kernel, args, kwargs), ARCH, launch=(args, kwargs))
        reports[name] = (report, kwargs["num_warps"])
    return reports


def per_loop(calls: list[int], loops: int, name: str) -> list[int]:
    """Iterations of each main loop summed over the programs: the k-th call of every program runs loop k."""
    if loops == 0 or len(calls) % loops:
        raise RuntimeError(f"{name}: {len(calls)} loop calls do not split into programs of "
                           f"{loops} main loops")
    return [sum(calls[k::loops]) for k in range(loops)]


def static_counts(window: int | None = None) -> dict[str, dict]:
    """{pass: launch, registers, spilled bytes, code (the kernel's SASS instructions), main loops'
    instructions, their iterations per (batch, head), warps and total warp-instructions} (the counting
    child runs with the interpreter on)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    window_args = [] if window is None else ["--window", str(window)]
    child = subprocess.run([sys.executable, __file__, "--count", *window_args], env=env, capture_output=True,
                           text=True, check=True)
    calls = json.loads(child.stdout.strip().splitlines()[-1])
    counts = {}
    for name, (report, warps) in compile_passes(window).items():
        loops = [loop.instructions for loop in report.main_loops]
        iterations = per_loop(calls[name], len(loops), name)
        counts[name] = dict(launch=report.launch, registers=report.registers, spilled=report.spilled_bytes,
                            code=report.code, loops=loops, iterations=iterations, warps=warps,
                            total=warps * sum(i * n for i, n in zip(iterations, loops)))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the counts as JSON")
    parser.add_argument("--window", type=int, default=None,
                        help="the fused kernel's band |i - j| <= W (default: global)")
    # the child: the interpreter is on
    parser.add_argument("--count", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.window is not None and args.window < 0:
        parser.error(f"--window must be >= 0, got {args.window}")
    if args.count:
        print(json.dumps(count_iterations(args.window)))
        return
    counts = static_counts(args.window)
    if args.json:
        print(json.dumps(counts))
        return
    import triton

    band = "global" if args.window is None else f"window {args.window} (the plain kernel: global)"
    print(f"Triton {triton.__version__}, sm_{ARCH}: B {B}, H {H}, T {T}, h {HEAD}, bf16, n {N_REL}, {band}, "
          f"no padding; warp-instructions per (batch, head) in the main loops")
    for name, c in counts.items():
        print(f"{name:14s} {c['launch']:>16s}  regs {c['registers']:3d}  spill {c['spilled']:3d}  "
              f"code {c['code']:5d}  loops {c['loops']}  iterations {c['iterations']}  total {c['total']:,}")
    total = {name: c["total"] for name, c in counts.items()}
    fwd = total["forward"] / total["plain forward"]
    bwd = (total["dq"] + total["dkdv"]) / (total["plain dq"] + total["plain dkdv"])
    print(f"fused / plain: forward {fwd:.2f}x, backward (dq + dk/dv) {bwd:.2f}x")


if __name__ == "__main__":
    main()
