"""kernels.attention_operands.near_bias_tiles: the tables of bias tiles the forward and the backward's passes
read for the tiles that straddle the diagonal, and the forward's for those that cross an edge of the band,
against the float64 reference's bias and band, and the NEAR and edge tiles of every (query tile, key
tile) pair that kernels.attention_common's regions make, each found in them.

Without a GPU the table's kernel runs through the Triton interpreter (tests/conftest.py); the passes
that read the tables are checked against the reference in tests/test_attention.py and
tests/test_properties_triton.py, whose tiles (16 or 32 rows each way) and offsets put every case here
within reach.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from property_strategies import property_settings

from echo_kernels import reference
from echo_kernels.kernels.attention_operands import near_bias_tiles

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
pytestmark = pytest.mark.skipif(not (ON_GPU or os.environ.get("TRITON_INTERPRET") == "1"),
                                reason="needs a GPU or TRITON_INTERPRET=1")
BLOCKS = st.sampled_from((16, 32, 64, 128)) if ON_GPU else st.sampled_from((16, 32))


@property_settings(max_examples=40)
@given(block_m=BLOCKS, block_n=BLOCKS, n=st.integers(1, 70), offset=st.integers(-300, 300),
       heads=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_each_tile_is_the_bias_at_its_offsets_and_every_near_tile_has_one(block_m, block_n, n, offset, heads,
                                                                          seed):
    bias = torch.randn(2 * n - 1, heads, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    table = near_bias_tiles(bias.to(DEVICE, torch.float32), n, offset, block_m, block_n)
    tiles, first, count = table.tiles, table.first, table.n_near
    step = min(block_m, block_n)
    # the NEAR tiles, then the two ends' constants; no band, no edge tiles
    assert tiles.shape == (heads, count + 2, block_m, block_n) and tiles.dtype == torch.float32

    # tile t holds bias[clamp(i - j)] at i - j = first + step t + r - c, entry (r, c)
    want = torch.stack([reference.relative_bias(bias, first + step * t + torch.arange(block_m),
                                                torch.arange(block_n))
                        for t in range(count)], 1)
    assert torch.equal(tiles[:, :count].cpu(), want.float())
    # then the PAST end row (i - j >= n - 1) and the FUTURE one (i - j <= 1 - n), each one value per head
    ends = bias[[2 * n - 2, 0]].T.float()  # (heads, 2)
    assert torch.equal(tiles[:, count:].cpu(), ends[:, :, None, None].expand(heads, 2, block_m, block_n))

    # The pairs a forward launch makes: query tiles from row offset (positions minus the key offset),
    # key tiles from column 0. A pair is NEAR unless all its i - j >= n - 1 or all <= 1 - n; its
    # top-left entry's i - j must be one of the table's, and the table spans the NEAR range and no more.
    deltas = {offset + row - col for row in range(0, 8 * block_m, block_m)
              for col in range(0, 8 * block_n, block_n)}
    near = {d for d in deltas if d - (block_n - 1) < n - 1 and d + (block_m - 1) > 1 - n}
    table = {first + step * t for t in range(count)}
    assert near <= table
    assert (first - step < 3 - n - block_m <= first
            and first + step * (count - 1) <= block_n + n - 3 < first + step * count)


@property_settings(max_examples=30)
@given(block_m=BLOCKS, block_n=BLOCKS, n=st.integers(1, 70), offset=st.integers(-300, 300),
       heads=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_the_reversed_table_holds_the_key_pass_tiles(block_m, block_n, n, offset, heads, seed):
    """The dk/dv pass holds its tiles as (keys, queries) and takes its table of the reversed bias rows (flip)
    at the key offset minus the query offset (kernels.attention_backward): tile t at entry (c, r) is the bias
    at j - i = first + step t + c - r, and every NEAR (key tile, query tile) pair's top-left j - i is in
    it."""
    bias = torch.randn(2 * n - 1, heads, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    table = near_bias_tiles(bias.to(DEVICE, torch.float32), n, -offset, block_n, block_m, flip=True)
    tiles, first, count = table.tiles, table.first, table.n_near
    step = min(block_m, block_n)
    assert tiles.shape == (heads, count + 2, block_n, block_m)  # the NEAR tiles, then the two ends' constants

    # queries r, keys first + step t + c: i - j = r - c - (first + step t), transposed to (keys, queries)
    want = torch.stack([reference.relative_bias(bias, torch.arange(block_m),
                                                first + step * t + torch.arange(block_n))
                        for t in range(count)], 1).transpose(2, 3)
    assert torch.equal(tiles[:, :count].cpu(), want.float())

    # key tiles from column 0, query tiles from row offset: j - i = c0 - offset - r0 at the top-left entry
    deltas = {col - offset - row for row in range(0, 8 * block_m, block_m)
              for col in range(0, 8 * block_n, block_n)}
    # i - j = r - c - d over the tile: NEAR unless all of it >= n - 1 or all <= 1 - n
    near = {d for d in deltas if -d - (block_n - 1) < n - 1 and block_m - 1 - d > 1 - n}
    assert near <= {first + step * t for t in range(count)}


SIDES = st.one_of(st.integers(0, 300), st.just(reference.UNBOUNDED))  # checks.window: sides are >= 0


@property_settings(max_examples=40)
@given(block_m=BLOCKS, block_n=BLOCKS, n=st.integers(1, 40), offset=st.integers(-300, 300), left=SIDES,
       right=SIDES, seed=st.integers(0, 2**16))
def test_the_band_is_in_the_tiles_and_every_edge_tile_has_one(block_m, block_n, n, offset, left, right, seed):
    """The forward's table (kernels.attention._band_bias reads it): the NEAR tiles and those of the band's
    edges hold the bias inside the band -right <= i - j <= left and -inf outside, the two constant tiles the
    bare end rows; and a far (query tile, key tile) pair that crosses an edge, as the forward finds one,
    has its top-left offset among that edge's tiles."""
    heads = 2
    bias = torch.randn(2 * n - 1, heads, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    table = near_bias_tiles(bias.to(DEVICE, torch.float32), n, offset, block_m, block_n, left, right)
    tiles, step, count = table.tiles.cpu(), min(block_m, block_n), table.n_near
    rows, cols = torch.arange(block_m), torch.arange(block_n)

    def banded(delta):  # (heads, block_m, block_n): the bias at i - j = delta + r - c, -inf outside the band
        keep = reference.attention_keep(delta + rows, cols, (left, right), False)
        return reference.relative_bias(bias, delta + rows, cols).masked_fill(~keep, float("-inf")).float()

    first_right = count + 2 + table.n_left
    edges = {"left": [table.left_edge0 + step * t for t in range(count + 2, first_right)],
             "right": [table.right_edge0 + step * t for t in range(first_right, tiles.shape[1])]}
    for t in range(count):
        assert torch.equal(tiles[:, t], banded(table.first + step * t))
    ends = bias[[2 * n - 2, 0]].T.float()  # (heads, 2): the PAST end row, then the FUTURE one
    assert torch.equal(tiles[:, count:count + 2], ends[:, :, None, None].expand(heads, 2, block_m, block_n))
    for t, delta in enumerate(edges["left"] + edges["right"], count + 2):
        assert torch.equal(tiles[:, t], banded(delta))
    assert (not edges["left"]) == (left == reference.UNBOUNDED)
    assert (not edges["right"]) == (right == reference.UNBOUNDED)

    # Pairs as the forward makes them: query tile at row r0 (positions offset + r0 ...), key tile at c0.
    for r0 in range(0, 6 * block_m, block_m):
        for c0 in range(0, 12 * block_n, block_n):
            delta = offset + r0 - c0
            rel = delta + rows[:, None] - cols[None, :]
            inside = (rel <= left) & (rel >= -right)
            if not inside.any() or not (delta - (block_n - 1) >= n - 1 or delta + block_m - 1 <= 1 - n):
                continue  # a tile no query of the tile reaches, or a NEAR one (the first test)
            if (rel > left).any():
                assert delta in edges["left"]
            if (rel < -right).any():
                assert delta in edges["right"]


@pytest.mark.parametrize("band", [(None, None), (9, 4)], ids=["global", "band"])
def test_a_table_in_the_dot_type_holds_the_fp32_tables_values_rounded(band):
    """The forward's table in fp16 (bf16 inputs take bf16 on a GPU; the interpreter has no bf16): the fp32
    table's values, -inf outside the band included, rounded; and the backward's, fp32, holding those very
    values (every pass adds the bias rounded to the dot type)."""
    left, right = band
    bias = torch.randn(2 * 5 - 1, 2, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    sides = {} if left is None else dict(left=left, right=right)
    exact = near_bias_tiles(bias, 5, 3, 16, 32, **sides)
    half = near_bias_tiles(bias, 5, 3, 16, 32, dtype=torch.float16, dot=torch.float16, **sides)
    assert half.tiles.dtype == torch.float16 and half[1:] == exact[1:]
    assert torch.equal(half.tiles, exact.tiles.to(torch.float16))
    rounded = near_bias_tiles(bias, 5, 3, 16, 32, dot=torch.float16, **sides)
    assert rounded.tiles.dtype == torch.float32 and not torch.equal(rounded.tiles, exact.tiles)
    assert torch.equal(rounded.tiles, half.tiles.float())
    assert left is None or bool(torch.isinf(half.tiles).any())



def test_the_bias_is_read_in_its_own_dtype():
    """The launchers pass the bias as it is (no copy per call): a float64 bias makes the table of its
    values rounded to the dot type, fp32 here, as its fp32 copy does."""
    bias = torch.randn(2 * 6 - 1, 3, generator=torch.Generator().manual_seed(5),
                       dtype=torch.float64).to(DEVICE)
    wide = near_bias_tiles(bias, 6, -2, 32, 16, 9, 4)
    assert torch.equal(wide.tiles, near_bias_tiles(bias.float(), 6, -2, 32, 16, 9, 4).tiles)
    past = wide.tiles[:, wide.n_near]  # the PAST end row's constant tile, per head
    assert torch.equal(past, bias[10].float()[:, None, None].expand_as(past))
