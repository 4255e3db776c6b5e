"""Inputs, cases and comparisons shared by the echo_attention tests (Triton and CPU paths)."""

from __future__ import annotations

import math

import torch

from echo_kernels import reference

from numerics import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(B=1, H=2, Tq=37, Tk=None, h=32, n=5, bias=True, pad=False, seed=0):
    """Random float64 inputs: M far from orthogonal, s != 1, a random bias table and padding."""
    g = torch.Generator().manual_seed(seed)
    Tk = Tq if Tk is None else Tk
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    M = torch.eye(h, dtype=torch.float64) + rnd(h, h) / math.sqrt(h)
    inputs = dict(
        q=rnd(B, H, Tq, h), k=rnd(B, H, Tk, h), v=rnd(B, H, Tk, h), M=M,
        w=torch.rand(h // 2, generator=g, dtype=torch.float64) * 0.5,
        s=torch.tensor(0.8, dtype=torch.float64),
        bias=rnd(2 * n - 1, H) if bias else None,
    )
    inputs["key_padding_mask"] = (torch.rand(B, Tk, generator=g) < 0.25) if pad else None
    return inputs


def cast(inputs, dtype, device=DEVICE, activations_only=False):
    """inputs with every floating tensor in dtype, all on device. activations_only: only q, k and v
    in dtype, and M, w, s and the bias table in float32 (see reference.ACTIVATIONS)."""
    def convert(name, t):
        if t is None or not t.is_floating_point():
            return t.to(device) if t is not None else None
        keep32 = activations_only and name not in reference.ACTIVATIONS
        return t.detach().to(device, torch.float32 if keep32 else dtype)
    return {name: convert(name, t) for name, t in inputs.items()}


def call(fn, inputs, **options):
    """fn(q, k, v, M, w, s, bias, key_padding_mask=..., **options) from an inputs dict."""
    i = inputs
    return fn(i["q"], i["k"], i["v"], i["M"], i["w"], i["s"], i["bias"],
              key_padding_mask=i["key_padding_mask"], **options)


GRAD_NAMES = ("q", "k", "v", "M", "w", "s", "bias")


def grads(fn, inputs, dtype, do, device=DEVICE, activations_only=False, **options):
    """(out, {name: gradient}) of fn on inputs cast to dtype (see cast), for the output gradient do."""
    leaves = cast(inputs, dtype, device, activations_only)
    for name in GRAD_NAMES:
        if leaves[name] is not None:
            leaves[name].requires_grad_(True)
    out = call(fn, leaves, **options)
    out.backward(do.to(out.device, out.dtype))
    return out, {name: leaves[name].grad for name in GRAD_NAMES if leaves[name] is not None}


# (Tq, Tk, window, causal, q_offset, k_offset, padding, n)
CASES = {
    "global": (37, 37, None, False, 0, 0, False, 5),
    "global_ragged_pad": (45, 53, None, False, 0, 0, True, 5),
    "window_int": (50, 50, 7, False, 0, 0, False, 5),
    "window_left_right": (50, 50, (5, 2), False, 0, 0, False, 9),
    "window_zero": (33, 33, 0, False, 0, 0, False, 3),
    "window_left_only": (40, 40, (3, 0), False, 0, 0, True, 5),
    "window_right_only": (40, 40, (0, 4), False, 0, 0, False, 5),
    "causal": (41, 41, None, True, 0, 0, False, 5),
    "causal_window": (60, 60, 9, True, 0, 0, True, 5),
    "cross": (19, 45, None, False, 0, 0, True, 5),
    "cross_window_offsets": (23, 61, (4, 6), False, 30, 2, False, 5),
    "offsets_causal": (20, 52, None, True, 32, 0, False, 5),
    "decode": (1, 47, None, True, 46, 0, False, 5),
    "decode_window": (1, 47, 10, True, 46, 0, True, 5),
    "rows_without_keys": (40, 30, (2, 3), False, 0, 20, False, 5),
    "n1": (35, 35, (6, 6), False, 0, 0, False, 1),
    "n_beyond_T": (21, 21, None, True, 0, 0, False, 24),
    "no_bias": (37, 37, 5, False, 0, 0, True, 0),
}


# The ways M reaches the op: either order with a random M, or no M at all (the model's folded default).
ROTATIONS = ("m_then_rope", "rope_then_m", "no_m")


def options(case, layout="half_split", rotation="m_then_rope"):
    """The keyword arguments of a CASES entry (rotation "no_m" is the default order; see case_inputs)."""
    Tq, Tk, window, causal, q_offset, k_offset, _, _ = CASES[case]
    return dict(window=window, causal=causal, q_offset=q_offset, k_offset=k_offset, layout=layout,
                rotation="m_then_rope" if rotation == "no_m" else rotation)


def case_inputs(case, rotation="m_then_rope", **kw):
    """Random inputs of a CASES entry (n = 0: no bias table; rotation "no_m": M = None)."""
    Tq, Tk, _, _, _, _, pad, n = CASES[case]
    inputs = make_inputs(Tq=Tq, Tk=Tk, n=max(n, 1), bias=n > 0, pad=pad, **kw)
    if rotation == "no_m":
        inputs["M"] = None
    return inputs


def with_keys_rotated(inputs, opts):
    """inputs with k replaced by k', as a decoding cache keeps it (echo_attention's keys_rotated): rotated
    at its positions in opts' layout, by inputs' M in opts' order (RoPE(k M) or RoPE(k) M)."""
    k, w = inputs["k"], inputs["w"]
    positions = torch.arange(opts["k_offset"], opts["k_offset"] + k.shape[2])
    phi = reference.rope_angles(w, inputs["s"], positions) if w is not None else None
    return dict(inputs,
                k=reference.rotate_for_attention(k, inputs["M"], phi, opts["layout"], opts["rotation"]))


def s_error(got, want, inputs):
    """|ds - ds_ref| against the size of ds's terms: ds = sum_m G_m w_m with G_m = dw_m / s, itself a
    sum of dphi * pos over every query and key, terms that may nearly cancel."""
    cpu = {name: t.detach().double().cpu()
           for name, t in (("w", want["w"]), ("s", want["s"]), ("got", got["s"]))}
    size = (cpu["w"].abs() * inputs["w"].abs()).sum() / inputs["s"].abs()  # inputs: the CPU float64 dict
    return ((cpu["got"] - cpu["s"]).abs() / size).item()


def assert_gradients_match(got, want, case, inputs):
    """fp32 kernel gradients `got` against float64 `want`, with tolerances per gradient (case: a label)."""
    for name, g in want.items():
        if g.norm() < 1e-12:  # dbias with n = 1 sums whole softmax rows of dS: exactly 0
            assert got[name].abs().max() < 1e-4, name
        elif name == "s":
            err = s_error(got, want, inputs)
            assert err < 5e-5, (case, name, err)
        else:
            # dw sums dphi * pos with cancellation, and dbias's end rows nearly whole rows of dS, which sum
            # to 0: fp32's rounding of p weighs more in them (dbias at T = 300, n = 15: about 1e-5)
            tol = {"w": 5e-5, "bias": 2e-5}.get(name, 1e-5)
            assert rel_err(got[name], g) < tol, (case, name, rel_err(got[name], g))
