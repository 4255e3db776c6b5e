"""echo_attention's Triton path at shapes the kernels are not built for: head widths other than
32, 64 and 128 (served zero-padded), wider heads (refused), and more (batch, head) pairs than a
CUDA grid's second axis holds (the launches use one axis)."""

from __future__ import annotations

import pytest
import torch
from attention_cases import assert_gradients_match, call, cast, grads, make_inputs
from numerics import rel_err

import echo_kernels
from echo_kernels import reference
from echo_kernels.attention import kernel_head_width
from echo_kernels.kernels import ATTENTION_HEAD_WIDTHS, attention_common
from echo_kernels.kernels import attention as kernel
from echo_kernels.kernels import attention_backward as kernel_bwd
from echo_kernels.kernels import attention_backward_keys as key_passes
from echo_kernels.kernels import attention_backward_queries as query_passes
from echo_kernels.kernels import attention_operands as operands

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


@pytest.fixture
def use_triton(monkeypatch):
    monkeypatch.setenv("ECHO_BACKEND", "triton")
    if not ON_GPU:
        monkeypatch.setattr(attention_common, "BLOCK_OVERRIDE", {"BLOCK_M": 16, "BLOCK_N": 16})


def test_kernel_head_widths():
    assert [kernel_head_width(h) for h in (2, 16, 32, 34, 48, 64, 80, 96, 128)] == \
        [32, 32, 32, 64, 64, 64, 128, 128, 128]
    assert ATTENTION_HEAD_WIDTHS == (32, 64, 128)


@pytest.mark.parametrize("h, layout, rotation", [
    (16, "half_split", "rope_then_m"),
    (48, "interleaved", "m_then_rope"),
    (80, "half_split", "no_m"),
    (80, "interleaved", "rope_then_m"),
])
def test_other_head_widths_run_padded_and_match_reference(use_triton, h, layout, rotation):
    """The padded launch computes the h-wide attention: output and every gradient (dM and dw at the
    original size) against the float64 reference."""
    inputs = make_inputs(B=2, H=2, Tq=21, Tk=27, h=h, n=4, pad=True, seed=h)
    if rotation == "no_m":
        inputs["M"] = None
    options = dict(window=(6, 3), layout=layout, rotation="m_then_rope" if rotation == "no_m" else rotation)
    do = torch.randn(2, 2, 21, h, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    want_out, want = grads(reference.echo_attention, inputs, torch.float64, do, **options)
    got_out, got = grads(echo_kernels.echo_attention, inputs, torch.float32, do, **options)
    assert got_out.shape == (2, 2, 21, h)
    assert rel_err(got_out, want_out) < 1e-5
    assert {name: g.shape for name, g in got.items()} == {name: g.shape for name, g in want.items()}
    assert_gradients_match(got, want, f"h={h}", inputs)


def test_wider_heads_are_refused_with_the_supported_widths(use_triton):
    inputs = cast(make_inputs(Tq=3, h=130), torch.float32)
    with pytest.raises(ValueError, match=r"head width h = 130 is wider than the Triton attention kernels "
                                         r"serve \(h <= 128; built for 32, 64, 128\)"):
        call(echo_kernels.echo_attention, inputs)


class _GridRecorder:
    """Stands in for a kernel: records the name and grid of each launch, then launches the kernel."""

    def __init__(self, fn, grids):
        self.fn, self.grids = fn, grids

    def __getitem__(self, grid):
        self.grids.append((self.fn.fn.__name__, grid))
        return self.fn[grid]


@pytest.mark.parametrize("dq_in_key_pass", [False, True], ids=["dq_pass", "dq_in_key_pass"])
def test_every_launch_uses_one_grid_axis(use_triton, monkeypatch, dq_in_key_pass):
    """CUDA caps a grid's second and third axes at 65535, which B * H can pass; the first takes 2**31 - 1."""
    grids = []
    for module, names in ((operands, ["_rope_rows_kernel", "_near_bias_kernel"]),
                          (kernel, ["_attn_fwd_kernel"]),
                          (kernel_bwd, [n for n in dir(kernel_bwd) if n.startswith("_attn_bwd_")])):
        for name in names:
            monkeypatch.setattr(module, name, _GridRecorder(getattr(module, name), grids))
    inputs = make_inputs(B=2, H=3, Tq=20, h=32, n=4, pad=True)
    do = torch.randn(2, 3, 20, 32, dtype=torch.float64)
    with kernel_bwd.dq_in_key_pass(dq_in_key_pass):
        grads(echo_kernels.echo_attention, inputs, torch.float32, do, window=5, rotation="rope_then_m")
    # q'' and RoPE(k), NEAR bias tiles, forward, delta, q'' and RoPE(k) again, dkdv's NEAR bias tiles, dkdv,
    # unrope, dq's NEAR bias tiles and dq (with dbias; neither when dkdv sums dq), RoPE(q) for dP~,
    # dq_unrotate
    names = [name for name, _ in grids]
    tables = ["_near_bias_kernel"] * (2 if dq_in_key_pass else 3)
    assert [name for name in names if name != "_near_bias_kernel"] == [
        "_rope_rows_kernel", "_rope_rows_kernel", "_attn_fwd_kernel", "_attn_bwd_delta_kernel",
        "_rope_rows_kernel", "_rope_rows_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_unrope_kernel",
        *([] if dq_in_key_pass else ["_attn_bwd_dq_kernel"]), "_rope_rows_kernel",
        "_attn_bwd_dq_unrotate_kernel"]
    assert [name for name in names if name == "_near_bias_kernel"] == tables
    assert all(len(grid) == 1 for _, grid in grids), grids
    # every (batch, head) has its programs; a NEAR bias table is one per head, which all batches read
    assert all(grid[0] % (3 if name == "_near_bias_kernel" else 2 * 3) == 0 for name, grid in grids), grids


@pytest.mark.gpu
def test_more_batch_heads_than_a_grid_axis_holds_gpu(use_triton):
    """B * H = 70000 > 65535: forward and backward run and match the reference."""
    inputs = make_inputs(B=2, H=35000, Tq=2, Tk=3, h=32, n=2, pad=False)
    do = torch.randn(2, 35000, 2, 32, dtype=torch.float64)
    want_out, want = grads(reference.echo_attention, inputs, torch.float64, do, device=DEVICE)
    got_out, got = grads(echo_kernels.echo_attention, inputs, torch.float32, do, device=DEVICE)
    assert rel_err(got_out, want_out) < 1e-5
    for name in ("q", "k", "v"):
        assert rel_err(got[name], want[name]) < 1e-5, name


# These count the loops' visits by wrapping the kernels' Python, which only the interpreter runs (CI runs
# them); compiled for a GPU, the same loops are checked in the AOT report's tests.
_interpreter_only = pytest.mark.skipif(
    ON_GPU,
    reason="counts loop visits through the interpreter's Python; compiled loops: the AOT report tests")


def _watch_unmasked_loops(monkeypatch) -> dict[str, int]:
    """{pass: the 16-wide tiles its loops with no mask take}, counted as the interpreter runs them."""
    visits = {"forward": 0, "dq": 0, "dkdv": 0}

    def watch(module, name, part, lo_at):
        inner = getattr(module, name)

        def watched(*args):
            lo, hi = args[lo_at], args[lo_at + 1]  # the tile range, after the accumulators
            visits[part] += (int(hi.handle.data[0]) - int(lo.handle.data[0])) // 16
            return inner(*args)

        monkeypatch.setattr(module, name, watched)

    watch(kernel, "_fwd_inner_tiles", "forward", 3)
    watch(query_passes, "_dq_inner_tiles", "dq", 3)
    watch(key_passes, "_dkdv_inner_tiles", "dkdv", 4)
    return visits


@_interpreter_only
@pytest.mark.parametrize("dq_in_key_pass", [False, True], ids=["dq_pass", "dq_in_key_pass"])
@pytest.mark.parametrize("padding, inner_keys", [(None, 64), ("suffix", 32), ("first", 0)])
def test_tiles_inside_the_band_run_the_unmasked_loops(use_triton, monkeypatch, padding, inner_keys,
                                                     dq_in_key_pass):
    """Global attention, 64 queries and keys in 16-wide tiles, n = 2: the loops with no mask take exactly
    the (query tile, key tile) pairs whose key tile lies before the first padded key (none padded: 4 key
    tiles; padded from key 40 on: 2; key 0 padded: none): the forward's and the dk/dv pass's those on the
    diagonal too (whose bias each reads from its table), the dq pass's (and the dk/dv pass's when it sums
    dq, the dq pass then not running) only those off it, where the bias is one value, since they sum a
    diagonal tile's dS along its diagonals in the masked loop. Values and gradients are the reference's."""
    visits = _watch_unmasked_loops(monkeypatch)
    inputs = make_inputs(B=1, Tq=64, n=2)
    if padding is not None:
        mask = torch.zeros(1, 64, dtype=torch.bool)
        mask[:, 40:] = padding == "suffix"
        mask[:, 0] = padding == "first"
        inputs["key_padding_mask"] = mask
    do = torch.randn(1, 2, 64, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want_out, want = grads(reference.echo_attention, inputs, torch.float64, do)
    with kernel_bwd.dq_in_key_pass(dq_in_key_pass):
        got_out, got = grads(echo_kernels.echo_attention, inputs, torch.float32, do)
    assert rel_err(got_out, want_out) < 1e-5
    assert_gradients_match(got, want, padding, inputs)
    key_tiles = inner_keys // 16
    pairs = 2 * key_tiles * 4  # 2 heads, every query tile
    off_diagonal = 2 * (key_tiles * 4 - key_tiles)
    assert visits == {"forward": pairs, "dq": 0 if dq_in_key_pass else off_diagonal,
                      "dkdv": off_diagonal if dq_in_key_pass else pairs}


@_interpreter_only
@pytest.mark.parametrize("dq_in_key_pass", [False, True], ids=["dq_pass", "dq_in_key_pass"])
def test_the_dkdv_pass_takes_its_ragged_key_tile_unmasked(use_triton, monkeypatch, dq_in_key_pass):
    """Global attention, 56 queries and keys in 16-wide tiles (the last of each 8 long), n = 2: a key's dS
    reaches only its own rows of dk and dv, and those past Tk are not stored, so the dk/dv pass takes its
    ragged key tile unmasked, as the others: each key tile with each whole query tile, 2 heads x 4 x 3.
    Summing dq, it sums dS over the keys, so the ragged key tile and the diagonal's take the masked loop:
    2 x (3 x 3 - 3). The forward takes only whole key tiles: 2 x 3 x 4. The bias table's far rows are large,
    so that a key past Tk left in a sum would show. Values and gradients are the reference's."""
    visits = _watch_unmasked_loops(monkeypatch)
    inputs = make_inputs(B=1, Tq=56, n=2)
    inputs["bias"] = inputs["bias"] + torch.tensor([[8.0], [0.0], [8.0]], dtype=inputs["bias"].dtype)
    do = torch.randn(1, 2, 56, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    want_out, want = grads(reference.echo_attention, inputs, torch.float64, do)
    with kernel_bwd.dq_in_key_pass(dq_in_key_pass):
        got_out, got = grads(echo_kernels.echo_attention, inputs, torch.float32, do)
    assert rel_err(got_out, want_out) < 1e-5
    assert_gradients_match(got, want, "ragged", inputs)
    assert visits["forward"] == 2 * 3 * 4
    assert visits["dkdv"] == (2 * (3 * 3 - 3) if dq_in_key_pass else 2 * 4 * 3)
