"""How the attention passes deal a program's tiles to their loops (kernels.attention_common: _split_regions,
_loop_stages, _far_masked_tiles, _skip), against the tiles' regions counted one by one: every tile of the
range goes to exactly one loop, in order, and each loop's far tiles know their side.

A pass's tiles start at lo, lo + BLOCK, ... < hi. A tile is inside the band when no mask can bite it
(its start in [inner_lo, inner_hi), whole tiles), PAST when it starts at most last_past, FUTURE when at
least first_future, NEAR between. The forward and the dk/dv pass run the far tiles inside the band, the
NEAR tiles inside it, then every other tile (masked); the passes that sum dbias (dq, and dk/dv summing dq)
run the far tiles inside the band, every NEAR tile, then the far tiles left (masked).

Without a GPU the dealing kernel runs through the Triton interpreter (tests/conftest.py); on one, compiled,
in benches/gpu_run.sh's correctness step.
"""

from __future__ import annotations

import os

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given
from hypothesis import strategies as st

from echo_kernels.kernels.attention_common import _far_masked_tiles, _loop_stages, _skip, _split_regions

from property_strategies import property_settings

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
pytestmark = pytest.mark.skipif(not (ON_GPU or os.environ.get("TRITON_INTERPRET") == "1"),
                                reason="needs a GPU (benches/gpu_run.sh runs it) or TRITON_INTERPRET=1")
BLOCK = 16
SLOTS = 32  # per loop: more than the tiles of any drawn range


@triton.jit
def _record(Out, loop, count, start, past, SLOTS: tl.constexpr):
    """Out[loop, count] = 2 start + past (past: 1 for a PAST tile, 0 otherwise)."""
    tl.store(Out + loop * SLOTS + count, 2 * start + tl.where(past, 1, 0))
    return count + 1


@triton.jit
def _deal_kernel(Out, lo, hi, inner_lo, inner_hi, last_past, first_future, BLOCK: tl.constexpr,
                 SLOTS: tl.constexpr):
    """The starts each loop of the passes takes, as the kernels compute them: Out rows 0 the far tiles
    inside the band (side from the loop's own count, as its bias and sums take it), 1 every NEAR tile,
    2 the NEAR tiles inside the band, 3 the far tiles left (side from the start), 4 every tile but those
    inside the band."""
    d1, d2 = _split_regions(lo, hi, last_past, first_future, BLOCK)
    inner, inner_end, near_lo, near_hi = _loop_stages(lo, hi, inner_lo, inner_hi, d1, d2)
    count = 0
    for t in range(inner, inner_end - (near_hi - near_lo), BLOCK):
        count = _record(Out, 0, count, _skip(t, near_lo, near_hi - near_lo), t < near_lo, SLOTS)
    count = 0
    for t in range(d1, d2, BLOCK):
        count = _record(Out, 1, count, t, t < 0, SLOTS)
    count = 0
    for t in range(near_lo, near_hi, BLOCK):
        count = _record(Out, 2, count, t, t < 0, SLOTS)
    end, skip_at, skip, skip_at2, skip2 = _far_masked_tiles(lo, hi, inner, inner_end, near_lo, near_hi, d1,
                                                            d2)
    count = 0
    for t in range(lo, end, BLOCK):
        start = _skip(_skip(t, skip_at, skip), skip_at2, skip2)
        count = _record(Out, 3, count, start, start < d1, SLOTS)
    count = 0
    for t in range(lo, hi - (inner_end - inner), BLOCK):
        count = _record(Out, 4, count, _skip(t, inner, inner_end - inner), t < 0, SLOTS)


def dealt(lo, hi, inner_lo, inner_hi, last_past, first_future) -> list[list[int]]:
    out = torch.full((5, SLOTS), -1, dtype=torch.int32, device=DEVICE)
    _deal_kernel[(1,)](out, lo, hi, inner_lo, inner_hi, last_past, first_future, BLOCK=BLOCK, SLOTS=SLOTS)
    return [[x for x in row if x >= 0] for row in out.tolist()]


@st.composite
def ranges(draw):
    lo = BLOCK * draw(st.integers(0, 6))
    hi = lo + draw(st.integers(-BLOCK, 12 * BLOCK))  # ragged or empty too
    whole = max(hi, 0) // BLOCK  # the band's whole tiles end before hi
    inner_lo = BLOCK * draw(st.integers(0, whole + 2))
    inner_hi = BLOCK * draw(st.integers(0, whole))
    last_past = draw(st.integers(lo - 3 * BLOCK, lo + 14 * BLOCK))
    first_future = last_past + draw(st.integers(1, 6 * BLOCK))
    return lo, hi, inner_lo, inner_hi, last_past, first_future


@property_settings(max_examples=60)
@given(case=ranges())
def test_every_tile_goes_to_one_loop_of_each_pass_in_order(case):
    lo, hi, inner_lo, inner_hi, last_past, first_future = case
    starts = range(lo, hi, BLOCK)
    inside = [s for s in starts if inner_lo <= s < inner_hi]
    near = [s for s in starts if last_past < s < first_future]
    tagged = lambda tiles: [2 * s + (s <= last_past) for s in tiles]
    far_inside, every_near, near_inside, far_masked, masked = dealt(*case)
    assert far_inside == tagged([s for s in inside if s not in near])
    assert every_near == [2 * s for s in near]
    assert near_inside == [2 * s for s in inside if s in near]
    assert far_masked == tagged([s for s in starts if s not in inside and s not in near])
    assert masked == [2 * s for s in starts if s not in inside]
