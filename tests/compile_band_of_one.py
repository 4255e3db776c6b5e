"""Compile the forward's and the dq pass's launches for the band (1, 1) for sm_90, each specialised as
triton's JIT specialises it (left = right = 1 as constexprs), and print each kernel's name once it
compiled to warpgroup products. Run by tests/test_aot.py in a child process, with the interpreter off."""

import torch

from echo_kernels import aot
from echo_kernels.kernels import attention, attention_backward, attention_common
from echo_kernels.kernels import attention_backward_queries as queries

KERNELS = (attention._attn_fwd_kernel, queries._attn_bwd_dq_kernel)


def launches() -> list[tuple[object, tuple, dict]]:
    """(kernel, args, kwargs) of KERNELS' launches at the band (1, 1), recorded, not run."""
    B, H, T, h = 1, 2, 300, 64
    q, k, v, out = (torch.randn(B, H, T, h, dtype=torch.float16) for _ in range(4))
    args = (None, torch.rand(h // 2), torch.ones(1), torch.randn(29, H), None, 1, 1, 0, 0, "half_split")
    with aot.recording_launches() as recorded, attention_common.tiles_of(90), \
            attention_backward.dq_in_key_pass(False):
        attention.forward(q, k, v, *args)
        attention_backward.backward(torch.randn_like(out), q, k, v, out, torch.randn(B, H, T), *args)
    return [launch for launch in recorded if any(launch[0] is kernel for kernel in KERNELS)]


def main() -> None:
    for kernel, args, kwargs in launches():
        bound = dict(zip(kernel.arg_names, args))
        assert bound["left"] == bound["right"] == 1, (bound["left"], bound["right"])
        _, specialised, _ = aot._jit_specialisation(kernel, args, kwargs, 90)
        names = {kernel.arg_names[key[0]] if isinstance(key, tuple) else key for key in specialised}
        assert {"left", "right"} <= names, names
        spec = aot.spec_of_launch(kernel, args, kwargs)
        report = aot.compile_spec(spec, 90, launch=(args, kwargs))
        assert report.wgmma and report.main_loops, spec.name
        print(spec.name, flush=True)


if __name__ == "__main__":
    main()
