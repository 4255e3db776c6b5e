"""Hypothesis strategies for the property tests: the settings every property test runs under, the
error measure they are judged by, and the cases of rotary_orthogonal and orthogonal_product with
their random inputs (echo_attention's are in tests/attention_strategies.py).

A case holds the drawn shapes and options plus a seed; its tensors come from that seed, so a failing
case prints in full (hypothesis shows the case) and is rebuilt exactly from what is printed.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import mutually_broadcastable_shapes

from echo_kernels import reference

LAYOUTS = ("half_split", "interleaved")
SEEDS = st.integers(0, 2**32 - 1)


def property_settings(max_examples: int) -> settings:
    """Derandomized runs (the same cases every run, no example database), no deadline (the Triton
    interpreter's first call compiles), and the blob that reproduces a failure printed with it."""
    return settings(max_examples=max_examples, derandomize=True, database=None, print_blob=True,
                    deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------------------------------
# rotary_orthogonal
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RotaryCase:
    B: int
    T: int
    H: int
    h: int
    offset: int
    layout: str
    s_is_tensor: bool  # s a learned scalar tensor, or a plain float (no gradient)
    strided: bool  # x a (B, T, H, h) view of (B, H, T, h) storage, as attention's projections are
    seed: int

    def inputs(self) -> dict:
        """float64 x, M, w, s and the output gradient dy: random, none of them zero."""
        g = torch.Generator().manual_seed(self.seed)
        B, T, H, h = self.B, self.T, self.H, self.h
        x = torch.randn(B, H, T, h, generator=g, dtype=torch.float64).transpose(1, 2)
        if not self.strided:
            x = x.contiguous()
        s = 0.5 + torch.rand((), generator=g, dtype=torch.float64)
        return dict(
            x=x, M=torch.randn(h, h, generator=g, dtype=torch.float64) / math.sqrt(h),
            w=0.05 + 0.5 * torch.rand(h // 2, generator=g, dtype=torch.float64),
            s=s if self.s_is_tensor else float(s),
            dy=torch.randn(B, T, H, h, generator=g, dtype=torch.float64),
        )


@st.composite
def rotary_cases(draw, head_widths, max_len, max_batch=2, max_heads=4, max_offset=60):
    """RotaryCase: ragged T from 1 to max_len, offsets, both layouts, s a tensor or a float, x dense or a
    strided view."""
    return RotaryCase(
        B=draw(st.integers(1, max_batch)), T=draw(st.integers(1, max_len)), H=draw(st.integers(1, max_heads)),
        h=draw(st.sampled_from(head_widths)), offset=draw(st.integers(0, max_offset)),
        layout=draw(st.sampled_from(LAYOUTS)), s_is_tensor=draw(st.booleans()), strided=draw(st.booleans()),
        seed=draw(SEEDS),
    )


def rotary_grads(fn, case: RotaryCase, inputs: dict, dtype: torch.dtype, device="cpu"):
    """(y, {name: gradient}) of fn(x, M, w, s, offset=, layout=) for the output gradient dy, inputs
    on device in dtype: the gradients of x, M, w and s (a tensor), or of x, M and w (s a float)."""
    names = ("x", "M", "w", "s") if case.s_is_tensor else ("x", "M", "w")
    leaves = {name: inputs[name].detach().to(device, dtype).requires_grad_(True) for name in names}
    y = fn(leaves["x"], leaves["M"], leaves["w"], leaves.get("s", inputs["s"]), offset=case.offset,
           layout=case.layout)
    return y, dict(zip(names, torch.autograd.grad(y, list(leaves.values()), inputs["dy"].to(device, dtype))))


def rotary_gradient_terms(case: RotaryCase, inputs: dict) -> dict:
    """The size of the terms of dw and ds (see rel_err): both sum the angles' gradients dphi over every
    token, |dphi| s |pos| for dw and |dphi| |pos w| for ds, phi = s pos w; dx and dM do not cancel."""
    x, M, w, s = inputs["x"], inputs["M"], inputs["w"], torch.as_tensor(inputs["s"], dtype=torch.float64)
    pos = torch.arange(case.offset, case.offset + case.T)
    phi = reference.rope_angles(w, s, pos).expand(case.B, case.H, case.T, case.h // 2)  # one per token
    phi = phi.clone().requires_grad_(True)
    y = reference.apply_rope((x @ M).transpose(1, 2), phi, case.layout)  # (B, H, T, h)
    (dphi,) = torch.autograd.grad((y * inputs["dy"].transpose(1, 2)).sum(), phi)
    dphi_pos = (dphi.abs() * pos[:, None]).sum((0, 1, 2))  # (h/2,)
    return dict(x=0.0, M=0.0, w=(s.abs() * dphi_pos).norm().item(), s=(w.abs() * dphi_pos).sum().item())


# --------------------------------------------------------------------------------------------------
# orthogonal_product
# --------------------------------------------------------------------------------------------------

PAIR_KINDS = ("adjacent", "random", "disjoint", "all")


@dataclass(frozen=True)
class OrthogonalCase:
    h: int
    pairs: tuple[tuple[int, int], ...]
    kind: str
    theta_batch: tuple[int, ...]
    r_batch: tuple[int, ...]  # broadcasts with theta_batch
    givens_first: bool
    seed: int

    def inputs(self) -> dict:
        """float64 thetas (..., N) in [-4, 4], pairs (N, 2) int64, R (..., h, h), upstream gradient."""
        g = torch.Generator().manual_seed(self.seed)
        N, h = len(self.pairs), self.h
        batch = torch.broadcast_shapes(self.theta_batch, self.r_batch)
        return dict(
            thetas=(torch.rand(*self.theta_batch, N, generator=g, dtype=torch.float64) * 8 - 4),
            pairs=torch.tensor(self.pairs, dtype=torch.int64).reshape(N, 2),
            R=torch.randn(*self.r_batch, h, h, generator=g, dtype=torch.float64),
            dM=torch.randn(*batch, h, h, generator=g, dtype=torch.float64),
        )


@st.composite
def index_pairs(draw, h: int, kind: str, max_pairs: int):
    """(N, 2) pairs i != j: adjacent (k, k+1), random (overlapping), disjoint (perfect matchings one
    after another) or all (every i < j once, shuffled)."""
    if kind == "all":
        return tuple(draw(st.permutations(list(itertools.combinations(range(h), 2)))))
    N = draw(st.integers(0, max_pairs))
    if kind == "adjacent":
        first = draw(st.integers(0, h - 2))
        return tuple(((first + k) % (h - 1), (first + k) % (h - 1) + 1) for k in range(N))
    if kind == "random":
        rows = []
        for _ in range(N):
            i = draw(st.integers(0, h - 1))
            rows.append((i, (i + draw(st.integers(1, h - 1))) % h))
        return tuple(rows)
    rows = []
    while len(rows) < N:
        order = draw(st.permutations(range(h)))
        rows += [(order[2 * m], order[2 * m + 1]) for m in range(h // 2)]
    return tuple(rows[:N])


@st.composite
def orthogonal_cases(draw, head_width, max_pairs, max_all_h, max_batch_side=3):
    """OrthogonalCase: h drawn from the strategy head_width, every pair kind ("all" only up to
    h = max_all_h), both products, batch dims of thetas and R that broadcast (either may be missing or 1)."""
    h = draw(head_width)
    kind = draw(st.sampled_from([k for k in PAIR_KINDS if k != "all" or h <= max_all_h]))
    batches = mutually_broadcastable_shapes(num_shapes=2, max_dims=2, max_side=max_batch_side)
    theta_batch, r_batch = draw(batches).input_shapes
    return OrthogonalCase(h=h, pairs=draw(index_pairs(h, kind, max_pairs)), kind=kind,
                          theta_batch=theta_batch, r_batch=r_batch, givens_first=draw(st.booleans()),
                          seed=draw(SEEDS))
