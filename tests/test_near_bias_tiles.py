"""kernels.attention.near_bias_tiles: the tables of bias tiles the forward and the backward's passes read
for the tiles that straddle the diagonal, against the float64 reference's bias, and the NEAR tiles of
every (query tile, key tile) pair that kernels.attention_common's regions make, each found in them.

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

from echo_kernels import reference
from echo_kernels.kernels.attention import near_bias_tiles

from property_strategies import property_settings

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
pytestmark = pytest.mark.skipif(not (ON_GPU or os.environ.get("TRITON_INTERPRET") == "1"),
                                reason="needs a GPU or TRITON_INTERPRET=1")
BLOCKS = st.sampled_from((16, 32, 64, 128)) if ON_GPU else st.sampled_from((16, 32))


@property_settings(max_examples=40)
@given(block_m=BLOCKS, block_n=BLOCKS, n=st.integers(1, 70), offset=st.integers(-300, 300),
       heads=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_each_tile_is_the_bias_at_its_offsets_and_every_near_tile_has_one(block_m, block_n, n, offset, heads, seed):
    bias = torch.randn(2 * n - 1, heads, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    tiles, first = near_bias_tiles(bias.to(DEVICE, torch.float32), n, offset, block_m, block_n)
    step = min(block_m, block_n)
    count = tiles.shape[1] - 2  # the NEAR tiles, then the two ends' constants
    assert tiles.shape == (heads, count + 2, block_m, block_n) and tiles.dtype == torch.float32

    # tile t holds bias[clamp(i - j)] at i - j = first + step t + r - c, entry (r, c)
    want = torch.stack([reference.relative_bias(bias, first + step * t + torch.arange(block_m), torch.arange(block_n))
                        for t in range(count)], 1)
    assert torch.equal(tiles[:, :count].cpu(), want.float())
    # then the PAST end row (i - j >= n - 1) and the FUTURE one (i - j <= 1 - n), each one value per head
    ends = bias[[2 * n - 2, 0]].T.float()  # (heads, 2)
    assert torch.equal(tiles[:, count:].cpu(), ends[:, :, None, None].expand(heads, 2, block_m, block_n))

    # The pairs a forward launch makes: query tiles from row offset (positions minus the key offset),
    # key tiles from column 0. A pair is NEAR unless all its i - j >= n - 1 or all <= 1 - n; its
    # top-left entry's i - j must be one of the table's, and the table spans the NEAR range and no more.
    deltas = {offset + row - col for row in range(0, 8 * block_m, block_m) for col in range(0, 8 * block_n, block_n)}
    near = {d for d in deltas if d - (block_n - 1) < n - 1 and d + (block_m - 1) > 1 - n}
    table = {first + step * t for t in range(count)}
    assert near <= table
    assert first - step < 3 - n - block_m <= first and first + step * (count - 1) <= block_n + n - 3 < first + step * count


@property_settings(max_examples=30)
@given(block_m=BLOCKS, block_n=BLOCKS, n=st.integers(1, 70), offset=st.integers(-300, 300),
       heads=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_the_reversed_table_holds_the_key_pass_tiles(block_m, block_n, n, offset, heads, seed):
    """The dk/dv pass holds its tiles as (keys, queries) and takes its table of the reversed bias rows at the
    key offset minus the query offset (kernels.attention_backward): tile t at entry (c, r) is the bias at
    j - i = first + step t + c - r, and every NEAR (key tile, query tile) pair's top-left j - i is in it."""
    bias = torch.randn(2 * n - 1, heads, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    tiles, first = near_bias_tiles(bias.flip(0).to(DEVICE, torch.float32), n, -offset, block_n, block_m)
    step = min(block_m, block_n)
    count = tiles.shape[1] - 2  # the NEAR tiles, then the two ends' constants
    assert tiles.shape == (heads, count + 2, block_n, block_m)

    # queries r, keys first + step t + c: i - j = r - c - (first + step t), transposed to (keys, queries)
    want = torch.stack([reference.relative_bias(bias, torch.arange(block_m), first + step * t + torch.arange(block_n))
                        for t in range(count)], 1).transpose(2, 3)
    assert torch.equal(tiles[:, :count].cpu(), want.float())

    # key tiles from column 0, query tiles from row offset: j - i = c0 - offset - r0 at the top-left entry
    deltas = {col - offset - row for row in range(0, 8 * block_m, block_m) for col in range(0, 8 * block_n, block_n)}
    # i - j = r - c - d over the tile: NEAR unless all of it >= n - 1 or all <= 1 - n
    near = {d for d in deltas if -d - (block_n - 1) < n - 1 and block_m - 1 - d > 1 - n}
    assert near <= {first + step * t for t in range(count)}
