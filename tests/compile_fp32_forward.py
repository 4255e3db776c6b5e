"""Compile the forward's launch for fp32 inputs at Echo's shape (T = 1500, a bias table, a padding
mask) at each built head width on each tile table, specialised as triton's JIT specialises it, and
print a line per launch: name, target, head width, shared memory, CTAs per SM (0: the launch could not
start). Run by tests/test_aot.py in a child process, with the interpreter off."""

import torch

from echo_kernels import aot
from echo_kernels.kernels import ATTENTION_HEAD_WIDTHS, ECHO_MAX_REL_DIST, attention, attention_common
from echo_kernels.reference import UNBOUNDED


def forward_launch(h: int, arch: int) -> tuple[tuple, dict]:
    """(args, kwargs) of the forward kernel's launch for fp32 (B, H, T, h) inputs, recorded, not run."""
    B, H, T = 1, 2, 1500
    q, k, v = (torch.randn(B, H, T, h) for _ in range(3))
    args = (None, torch.rand(h // 2), torch.ones(1), torch.randn(2 * ECHO_MAX_REL_DIST - 1, H),
            torch.zeros(B, T, dtype=torch.bool), UNBOUNDED, UNBOUNDED, 0, 0, "half_split")
    with aot.recording_launches() as recorded, attention_common.tiles_of(arch):
        attention.forward(q, k, v, *args)
    (args, kwargs), = [launch[1:] for launch in recorded if launch[0] is attention._attn_fwd_kernel]
    return args, kwargs


def main() -> None:
    for arch in aot.TARGETS:
        for h in ATTENTION_HEAD_WIDTHS:
            args, kwargs = forward_launch(h, arch)
            report = aot.compile_spec(aot.spec_of_launch(attention._attn_fwd_kernel, args, kwargs), arch,
                                      launch=(args, kwargs))
            print(report.name, arch, h, report.shared_bytes, report.ctas_per_sm, flush=True)


if __name__ == "__main__":
    main()
