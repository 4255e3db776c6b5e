"""Hypothesis cases of echo_attention for the property tests: the case, its random inputs, its
gradients through any implementation, and the size of the terms each gradient sums (for rel_err).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st

from echo_kernels import reference
from property_strategies import LAYOUTS, SEEDS

# Keyword arguments of echo_attention drawn as they are and passed unchanged to every implementation.
# A new keyword is one more entry here.
ATTENTION_KEYWORDS = {
    "layout": st.sampled_from(LAYOUTS),
    "rotation": st.sampled_from(("m_then_rope", "rope_then_m")),
}


def _dense_m(g: torch.Generator, h: int) -> torch.Tensor:
    """Far from orthogonal, so that M M^T is not the identity."""
    noise = torch.randn(h, h, generator=g, dtype=torch.float64)
    return torch.eye(h, dtype=torch.float64) + noise / math.sqrt(h)


# The forms M is drawn in: name -> (generator, h) -> M. A form is one more entry here.
M_FORMS = {"dense": _dense_m, "identity": lambda g, h: torch.eye(h, dtype=torch.float64)}


@dataclass(frozen=True)
class AttentionCase:
    B: int
    H: int
    Tq: int
    Tk: int
    h: int
    window: int | tuple[int, int] | None
    causal: bool
    q_offset: int
    k_offset: int
    n: int | None  # bias table of 2n - 1 rows; None: no bias
    padding: tuple[tuple[bool, ...], ...] | None  # (B, Tk), True = padded
    M_form: str
    logit_scale: float  # q is multiplied by it: flat and peaked softmax rows
    seed: int
    keywords: dict = field(default_factory=dict)  # ATTENTION_KEYWORDS drawn

    def options(self) -> dict:
        """echo_attention's keyword arguments but the padding mask."""
        return dict(window=self.window, causal=self.causal, q_offset=self.q_offset, k_offset=self.k_offset,
                    **self.keywords)

    def inputs(self) -> dict:
        """float64 q, k, v, M, w, s, bias, key_padding_mask: random, none of them zero."""
        g = torch.Generator().manual_seed(self.seed)
        rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
        B, H, Tq, Tk, h = self.B, self.H, self.Tq, self.Tk, self.h
        padding = torch.tensor(self.padding, dtype=torch.bool) if self.padding is not None else None
        return dict(
            q=rnd(B, H, Tq, h) * self.logit_scale, k=rnd(B, H, Tk, h), v=rnd(B, H, Tk, h),
            M=M_FORMS[self.M_form](g, h),
            w=0.05 + 0.5 * torch.rand(h // 2, generator=g, dtype=torch.float64),
            s=0.5 + torch.rand((), generator=g, dtype=torch.float64),
            bias=rnd(2 * self.n - 1, H) if self.n is not None else None,
            key_padding_mask=padding,
        )

    def output_gradient(self) -> torch.Tensor:
        """(B, H, Tq, h) float64: the gradient that flows into the output."""
        g = torch.Generator().manual_seed(self.seed + 1)
        return torch.randn(self.B, self.H, self.Tq, self.h, generator=g, dtype=torch.float64)


def windows(widest: int):
    """None, an int or (left, right), from 0 to `widest` (past T, so the band can cover every key)."""
    side = st.integers(0, widest)
    return st.one_of(st.none(), side, st.tuples(side, side))


def padding_masks(B: int, Tk: int):
    """(B, Tk) rows: the first unpadded or a random pattern, the others also fully padded (their queries
    see no key): were the first allowed to be, many cases would have no key at all."""
    pattern = st.tuples(*[st.booleans()] * Tk)
    unpadded, full = st.just((False,) * Tk), st.just((True,) * Tk)
    return st.tuples(st.one_of(unpadded, pattern), *[st.one_of(unpadded, full, pattern)] * (B - 1))


def query_offsets(Tq: int, Tk: int, k_offset: int, max_offset: int):
    """q_offset: the keys' own (self-attention), the last query at the last key (decoding), the
    queries overlapping the keys, or anywhere (the band may then miss every key)."""
    overlapping = st.integers(max(0, k_offset - Tq), k_offset + Tk)
    choices = [st.just(k_offset), overlapping, st.integers(0, max_offset)]
    if k_offset + Tk - Tq >= 0:
        choices.append(st.just(k_offset + Tk - Tq))
    return st.one_of(*choices)


@st.composite
def attention_cases(draw, head_widths, max_len, max_batch=2, max_heads=2, max_offset=40):
    """AttentionCase: ragged Tq and Tk from 1 to max_len (Tq = Tk half the time), every window kind,
    causal or not, offsets, bias tables of n = 1, n past T or none, padding with fully padded rows."""
    Tq = draw(st.integers(1, max_len))
    # a single key is drawn less often than hypothesis would: no query then has two keys to weigh
    Tk = Tq if draw(st.booleans()) else draw(st.one_of(st.integers(2, max_len), st.integers(1, max_len)))
    B = draw(st.integers(1, max_batch))
    k_offset = draw(st.integers(0, max_offset))
    return AttentionCase(
        B=B, H=draw(st.integers(1, max_heads)), Tq=Tq, Tk=Tk, h=draw(st.sampled_from(head_widths)),
        window=draw(windows(max_len + 8)), causal=draw(st.booleans()),
        q_offset=draw(query_offsets(Tq, Tk, k_offset, max_offset)), k_offset=k_offset,
        n=draw(st.one_of(st.none(), st.just(1), st.integers(2, max_len + 8))),
        padding=draw(st.one_of(st.none(), padding_masks(B, Tk))),
        M_form=draw(st.sampled_from(sorted(M_FORMS))),
        logit_scale=draw(st.sampled_from((0.3, 1.0, 3.0))),
        seed=draw(SEEDS),
        keywords=draw(st.fixed_dictionaries(ATTENTION_KEYWORDS)),
    )


def attention_grads(fn, inputs: dict, do: torch.Tensor, dtype: torch.dtype, options: dict, device="cpu"):
    """(out, {name: gradient}) of fn(q, k, v, M, w, s, bias, key_padding_mask=..., **options), every
    input on device and every floating one cast to dtype; inputs that are None have no gradient, and
    inputs left unused get zeros."""
    leaves = {name: t.detach().to(device, dtype).requires_grad_(True) if t.is_floating_point()
              else t.to(device) for name, t in inputs.items() if t is not None}
    x = {name: leaves.get(name) for name in inputs}
    out = fn(x["q"], x["k"], x["v"], x["M"], x["w"], x["s"], x["bias"],
             key_padding_mask=x["key_padding_mask"], **options)
    names = [name for name, t in leaves.items() if t.is_floating_point()]
    if out.requires_grad:  # the brute force builds queries that see no key as constant zeros
        grads = torch.autograd.grad(out, [leaves[n] for n in names], do.to(out.device, out.dtype),
                                    allow_unused=True, materialize_grads=True)
    else:
        grads = [torch.zeros_like(leaves[n]) for n in names]
    return out, dict(zip(names, grads))


def attention_gradient_terms(case: AttentionCase, inputs: dict, do: torch.Tensor) -> dict:
    """name -> the size of the terms that echo_attention's gradient of that input sums (see rel_err).

    Every gradient but dv sums, over (query i, key j), the score gradient dS_ij = p_ij dO_i . (v_j - out_i)
    times the logit's derivative, and these sums cancel: exactly to 0 where no query sees two keys.
    The terms' size is the same sum with dS_ij replaced by T_ij = p_ij (|dO_i| . |v_j| + |dO_i| . |out_i|),
    i.e. the gradient of sum_ij T_ij logit_ij with T held fixed (logits RoPE(q) M (RoPE(k) M)^T: another
    order of the rotations has terms of the same size). dw and ds also sum over positions and
    frequencies: their terms are |dphi| s |pos| (dw) and |dphi| |pos w| (ds), phi = s pos w each
    query's and key's angles.
    """
    x = {name: t.double() if t is not None and t.is_floating_point() else t for name, t in inputs.items()}
    q, k, v, M, w, s, bias = (x[name] for name in ("q", "k", "v", "M", "w", "s", "bias"))
    B, H, Tq, Tk, h = case.B, case.H, case.Tq, case.Tk, case.h
    options = case.options()
    one_hot = torch.eye(Tk, dtype=torch.float64).expand(B, H, Tk, Tk)  # values e_j: the output is p
    p = reference.echo_attention(q, k, one_hot, M, w, s, bias, key_padding_mask=x["key_padding_mask"],
                                 **options)
    do = do.double()
    T = p * (do.abs() @ v.abs().transpose(-1, -2) + (do * (p @ v)).abs().sum(-1, keepdim=True))

    q_pos = torch.arange(case.q_offset, case.q_offset + Tq)
    k_pos = torch.arange(case.k_offset, case.k_offset + Tk)
    angles = lambda pos: reference.rope_angles(w, s, pos).expand(B, H, len(pos), h // 2)  # one per query/key
    leaves = dict(q=q, k=k, M=M, bias=bias, phi_q=angles(q_pos), phi_k=angles(k_pos))
    leaves = {name: t.clone().requires_grad_(True) for name, t in leaves.items() if t is not None}
    layout = options.get("layout", "half_split")
    rotate = (lambda u: u @ leaves["M"]) if "M" in leaves else (lambda u: u)  # M None: the identity
    a = rotate(reference.apply_rope(leaves["q"], leaves["phi_q"], layout))
    c = rotate(reference.apply_rope(leaves["k"], leaves["phi_k"], layout))
    logits = a @ c.transpose(-1, -2) / math.sqrt(h)
    if bias is not None:
        logits = logits + reference.relative_bias(leaves["bias"], q_pos, k_pos)
    grads = dict(zip(leaves, torch.autograd.grad((T * logits).sum(), list(leaves.values()))))

    terms = {name: grads[name].norm().item() for name in ("q", "k", "M", "bias") if name in grads}
    terms["v"] = (p.transpose(-1, -2) @ do.abs()).norm().item()
    dphi_pos = ((grads["phi_q"].abs() * q_pos[:, None]).sum((0, 1, 2))
                + (grads["phi_k"].abs() * k_pos[:, None]).sum((0, 1, 2)))  # (h/2,)
    terms["w"] = (s.abs() * dphi_pos).norm().item()
    terms["s"] = (w.abs() * dphi_pos).sum().item()
    return terms
