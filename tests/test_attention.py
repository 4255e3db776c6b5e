"""echo_attention: the fused Triton kernel against the float64 reference.

Without a GPU the kernel runs through the Triton interpreter (tests/conftest.py) on small shapes,
with 16 x 16 tiles so that ragged edges, several tiles per row and skipped tiles all happen at
T < 70. The ahead-of-time compile for sm_80/sm_90 runs in a background thread from the first test on,
since it is slow and mostly waits on a child process.
"""

from __future__ import annotations

import os
import re

import pytest
import torch
import triton

import echo_kernels
from echo_kernels import aot, reference
from echo_kernels.kernels import ATTENTION_HEAD_WIDTHS
from echo_kernels.kernels import attention as kernel
from echo_kernels.kernels import attention_backward, attention_common
from echo_kernels.kernels import attention_cpu
from echo_kernels.kernels.angles import MAX_ANGLE

from attention_cases import (CASES, GRAD_NAMES, ROTATIONS, assert_gradients_match, call, case_inputs, cast,
                             grads, make_inputs, options, s_error, with_keys_rotated)
from numerics import rel_err

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
pytestmark = pytest.mark.skipif(not (ON_GPU or INTERPRETED), reason="needs a GPU or TRITON_INTERPRET=1")


# --------------------------------------------------------------------------------------------------
# Ahead-of-time compile, started now, checked at the end
# --------------------------------------------------------------------------------------------------

# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def use_triton(monkeypatch):
    monkeypatch.setenv("ECHO_BACKEND", "triton")
    if not ON_GPU:
        monkeypatch.setattr(attention_common, "BLOCK_OVERRIDE", {"BLOCK_M": 16, "BLOCK_N": 16})


# --------------------------------------------------------------------------------------------------
# Forward: every mask kind and their combinations
# --------------------------------------------------------------------------------------------------

def _spread(case):
    """A layout and a rotation for each case, so that every one meets many cases at a third of the cost."""
    index = list(CASES).index(case)
    return ("half_split", "interleaved")[index % 2], ROTATIONS[index % 3]


@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_reference(use_triton, case):
    spread_layout, rotation = _spread(case)
    for layout in ("half_split", "interleaved") if case == "global" else (spread_layout,):
        inputs = case_inputs(case, rotation)
        opts = options(case, layout, rotation)
        want = call(reference.echo_attention, inputs, **opts)
        got = call(echo_kernels.echo_attention, cast(inputs, torch.float32), **opts)
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert torch.isfinite(got).all()
        assert rel_err(got, want) < 1e-5, case


# Roundings to the low dtype on the way to each result, when the dots take that dtype (float32
# accumulation is not counted). Forward: the bias, RoPE(q), P~, q P~, RoPE(k), the probabilities, the
# output. Backward, the longest path (dq): those of the bias, q P~ and RoPE(k) again, the probabilities,
# dS, dq~ stored, dq~ as an operand of the product with P~^T, dq stored.
FORWARD_ROUNDINGS = 7
BACKWARD_ROUNDINGS = 10


def _forward_roundings(dtype):
    """FORWARD_ROUNDINGS where the kernel's dots take `dtype`; else (bf16 under the interpreter) the
    output's rounding alone."""
    return FORWARD_ROUNDINGS if attention_common.dot_dtype(dtype) == dtype else 1


def _assert_low_precision_forward(case, dtype):
    """q, k, v rounded to dtype (M, w, s, bias float32) against the float64 reference on those values."""
    inputs = reference.round_activations(case_inputs(case), dtype)
    want = call(reference.echo_attention, inputs, **options(case))
    got = call(echo_kernels.echo_attention, cast(inputs, dtype, activations_only=True), **options(case))
    assert got.dtype == dtype
    err = rel_err(got, want)
    assert err < reference.rounding_tolerance(dtype, _forward_roundings(dtype)), (case, err)


@pytest.mark.parametrize("case", ["global_ragged_pad", "causal_window", "decode_window"])
def test_forward_fp16(use_triton, case):
    _assert_low_precision_forward(case, torch.float16)


def test_forward_bf16(use_triton):
    """bf16 in and out (under the interpreter the tl.dot operands are fp32)."""
    _assert_low_precision_forward("window_left_right", torch.bfloat16)


def test_window_edges_are_inclusive(use_triton):
    """Values v_j = one-hot(j): the output row i is the attention row, so kept keys show directly."""
    T, h = 20, 32
    inputs = make_inputs(Tq=T, h=h, bias=False)
    inputs["v"] = torch.zeros(1, 2, T, h, dtype=torch.float64)
    inputs["v"][0, :, torch.arange(T), torch.arange(T)] = 1.0
    out = call(echo_kernels.echo_attention, cast(inputs, torch.float32), window=(2, 3), q_offset=0)
    kept = out[0, 0].cpu() > 0
    i, j = torch.meshgrid(torch.arange(T), torch.arange(h), indexing="ij")
    assert torch.equal(kept, (j >= i - 2) & (j <= i + 3) & (j < T))


def test_rows_without_keys_give_zeros(use_triton):
    inputs = make_inputs(B=2, Tq=24, Tk=30, pad=False)
    mask = torch.zeros(2, 30, dtype=torch.bool)
    mask[1] = True  # the second batch has no key at all
    inputs["key_padding_mask"] = mask
    do = torch.randn(2, 2, 24, 32, dtype=torch.float64)
    out, g = grads(echo_kernels.echo_attention, inputs, torch.float32, do)
    assert torch.isfinite(out).all() and (out[1] == 0).all()
    assert all(torch.isfinite(t).all() for t in g.values())
    assert (g["q"][1] == 0).all() and (g["k"][1] == 0).all() and (g["v"][1] == 0).all()


def test_padding_flags_fill_whole_key_tiles():
    """The kernels load a key tile's flags with no mask: the rows run to whole tiles, padded past Tk,
    and a row without padding has its first padded key there, at Tk."""
    mask = torch.tensor([[False, True, False, False, False], [False] * 5])
    flags, batch_stride, key_stride, has_pad = attention_common._pad_arg(mask, None, torch.int32, tile=4)
    assert flags.dtype == torch.int32 and has_pad and (batch_stride, key_stride) == (8, 1)
    assert flags.tolist() == [[0, 1, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1, 1]]
    assert kernel.first_padded_key(flags).tolist() == [1, 5]
    whole, *_ = attention_common._pad_arg(mask[:, :4], None, torch.uint8, tile=4)
    assert (whole.tolist() == [[0, 1, 0, 0], [0, 0, 0, 0]]
            and kernel.first_padded_key(whole).tolist() == [1, 4])


def test_angles_beyond_exact_reduction_are_nan_not_wrong(use_triton):
    """The passes' sines and cosines are the rotary kernel's (kernels.angles): |phi| >= MAX_ANGLE is past
    what they reduce exactly, so a row rotated there is NaN, never a wrong rotation. Causal, at positions
    999..1002 with w = 1: queries 0 and 1 see only keys whose angles stay below it."""
    inputs = make_inputs(Tq=4, h=32, bias=False)
    inputs["w"] = torch.ones_like(inputs["w"])
    inputs["s"] = torch.tensor(MAX_ANGLE.value / 1000.5, dtype=torch.float64)
    out = call(echo_kernels.echo_attention, cast(inputs, torch.float32), causal=True, q_offset=999,
               k_offset=999)
    assert torch.isfinite(out[:, :, :2]).all() and torch.isnan(out[:, :, 2:]).all()


def test_strided_inputs(use_triton):
    """q, k, v as views of (B, T, H, h) projections and a non-contiguous bias, as the model has them."""
    inputs = make_inputs(B=2, Tq=29, pad=True)
    strided = dict(inputs)
    for name in ("q", "k", "v"):
        strided[name] = inputs[name].transpose(1, 2).contiguous().transpose(1, 2)
    strided["bias"] = inputs["bias"].T.contiguous().T
    assert not strided["q"].is_contiguous() and not strided["bias"].is_contiguous()
    want = call(reference.echo_attention, inputs, window=6)
    got = call(echo_kernels.echo_attention, cast(strided, torch.float32), window=6)
    assert rel_err(got, want) < 1e-5


# --------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------

GRAD_CASES = ["global_ragged_pad", "window_left_right", "causal_window", "cross_window_offsets", "decode",
              "rows_without_keys", "n1", "n_beyond_T", "no_bias"]


def _assert_low_precision_gradients(inputs, do, dtype, **opts):
    """Output and gradients of a run with q, k, v and dO rounded to dtype (M, w, s, bias float32)
    against the float64 reference on the same rounded values. dO's rounding is the run's input."""
    inputs, do = reference.round_activations(inputs, dtype), do.to(dtype).double()
    out_ref, want = grads(reference.echo_attention, inputs, torch.float64, do, **opts)
    out, got = grads(echo_kernels.echo_attention, inputs, dtype, do, activations_only=True, **opts)
    assert rel_err(out, out_ref) < reference.rounding_tolerance(dtype, _forward_roundings(dtype))
    tol = reference.rounding_tolerance(dtype, BACKWARD_ROUNDINGS if attention_common.dot_dtype(dtype) == dtype
                                       else 1)
    for name, g in want.items():
        err = s_error(got, want, inputs) if name == "s" else rel_err(got[name], g)
        assert err < tol, (name, err, tol)


@pytest.mark.parametrize("dq_in_key_pass", [False, True], ids=["dq_pass", "dq_in_key_pass"])
@pytest.mark.parametrize("case", GRAD_CASES)
def test_gradients_match_reference(use_triton, case, dq_in_key_pass):
    """Every gradient against the float64 reference, dq summed by the dq pass and by the dk/dv pass."""
    layout = "interleaved" if case in ("window_left_right", "n1") else "half_split"
    rotation = ROTATIONS[GRAD_CASES.index(case) % 3]
    inputs = case_inputs(case, rotation, B=2)
    B, H, Tq, h = inputs["q"].shape
    do = torch.randn(B, H, Tq, h, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _, want = grads(reference.echo_attention, inputs, torch.float64, do, **options(case, layout, rotation))
    with attention_backward.dq_in_key_pass(dq_in_key_pass):
        _, got = grads(echo_kernels.echo_attention, inputs, torch.float32, do,
                       **options(case, layout, rotation))
    assert ("M" in got) == (rotation != "no_m")
    assert_gradients_match(got, want, case, inputs)


@pytest.mark.parametrize("rotation", ROTATIONS)
@pytest.mark.parametrize("case", ["cross_window_offsets", "decode_window"])
def test_every_rotation_matches_reference(use_triton, case, rotation):
    """Each order (and no M) on ragged lengths, a window, offsets and padding (Tq = 1 in decode_window):
    output and every gradient against the float64 reference."""
    inputs = case_inputs(case, rotation, B=2)
    do = torch.randn(inputs["q"].shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    opts = options(case, rotation=rotation)
    out_ref, want = grads(reference.echo_attention, inputs, torch.float64, do, **opts)
    out, got = grads(echo_kernels.echo_attention, inputs, torch.float32, do, **opts)
    assert rel_err(out, out_ref) < 1e-5
    assert_gradients_match(got, want, case, inputs)


@pytest.mark.parametrize("layout", ["half_split", "interleaved"])
@pytest.mark.parametrize("rotation", ROTATIONS)
@pytest.mark.parametrize("case", ["cross_window_offsets", "decode_window"])
def test_keys_given_rotated(use_triton, case, rotation, layout):
    """keys_rotated: k given as k' (a decoding cache's keys), as a head view of a (B, Tk, H, h) tensor that
    the kernel reads in place, and only q rotated: the output and every gradient against the float64
    reference, and the output against the op rotating the raw keys itself."""
    inputs = case_inputs(case, rotation, B=2)
    opts = options(case, layout, rotation)
    rotated = with_keys_rotated(inputs, opts)
    rotated["k"] = rotated["k"].transpose(1, 2).contiguous().transpose(1, 2)
    do = torch.randn(inputs["q"].shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out_ref, want = grads(reference.echo_attention, rotated, torch.float64, do, keys_rotated=True, **opts)
    out, got = grads(echo_kernels.echo_attention, rotated, torch.float32, do, keys_rotated=True, **opts)
    assert rel_err(out, out_ref) < 1e-5
    assert_gradients_match(got, want, case, inputs)
    assert rel_err(out, call(echo_kernels.echo_attention, cast(inputs, torch.float32), **opts)) < 1e-5


@pytest.mark.parametrize("layout, w_given",
                         [("half_split", True), ("interleaved", True), ("half_split", False)])
def test_keys_given_rotated_at_a_padded_head_width(use_triton, layout, w_given):
    """h = 48 runs on the h = 64 kernels: rotated keys are widened where RoPE's outputs of the widened
    pairs land (each half of a "half_split" row), M's rows and columns likewise; without w (no RoPE:
    q' = q M, k given as k M) where the entries themselves are."""
    inputs = make_inputs(B=2, Tq=19, Tk=45, h=48, pad=True)
    if not w_given:
        inputs["w"] = None
    opts = dict(window=(4, 6), q_offset=30, k_offset=2, layout=layout, rotation="rope_then_m")
    rotated = with_keys_rotated(inputs, opts)
    do = torch.randn(inputs["q"].shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out_ref, want = grads(reference.echo_attention, rotated, torch.float64, do, keys_rotated=True, **opts)
    out, got = grads(echo_kernels.echo_attention, rotated, torch.float32, do, keys_rotated=True, **opts)
    assert rel_err(out, out_ref) < 1e-5
    if not w_given:  # s is then unused: no gradient from the reference, zeros from the kernels
        assert want.pop("s") is None and got.pop("s").abs().max() == 0
    assert_gradients_match(got, want, "h48", inputs)


def test_m_then_rope_runs_the_kernel_without_m(use_triton, monkeypatch):
    """RoPE(q M) . RoPE(k M) reaches the kernel as q M and k M with M = None: no product with P."""
    seen = []
    launch = kernel.forward
    monkeypatch.setattr(kernel, "forward", lambda *args: seen.append(args[3]) or launch(*args))
    inputs = cast(make_inputs(Tq=20), torch.float32)
    call(echo_kernels.echo_attention, inputs, rotation="m_then_rope")
    call(echo_kernels.echo_attention, inputs, rotation="rope_then_m")
    assert seen[0] is None and seen[1] is inputs["M"]


def test_gradients_fp16(use_triton):
    inputs = case_inputs("causal_window")
    do = torch.randn(1, 2, 60, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _assert_low_precision_gradients(inputs, do, torch.float16, **options("causal_window"))


def test_half_inputs_take_the_bias_rounded_to_their_dtype(use_triton):
    """fp16 inputs: every pass, forward and backward, adds the bias rounded to fp16 (the forward's table holds
    it in fp16, the backward's in fp32): the same output and gradients, bit for bit, as for that bias given
    rounded, across NEAR tiles, far ones and the band's edges."""
    inputs = case_inputs("causal_window")
    do = torch.randn(1, 2, 60, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rounded = dict(inputs, bias=inputs["bias"].to(torch.float16).double())
    assert not torch.equal(rounded["bias"], inputs["bias"])
    got = grads(echo_kernels.echo_attention, inputs, torch.float16, do, activations_only=True,
                **options("causal_window"))
    want = grads(echo_kernels.echo_attention, rounded, torch.float16, do, activations_only=True,
                 **options("causal_window"))
    assert torch.equal(got[0], want[0])
    assert got[1].keys() == want[1].keys() and all(torch.equal(got[1][n], want[1][n]) for n in got[1])


@pytest.mark.parametrize("dq_in_key_pass", [False, True], ids=["dq_pass", "dq_in_key_pass"])
def test_backward_is_deterministic(use_triton, dq_in_key_pass):
    inputs = make_inputs(B=2, Tq=40, pad=True)
    do = torch.randn(2, 2, 40, 32, dtype=torch.float64)
    with attention_backward.dq_in_key_pass(dq_in_key_pass):
        _, first = grads(echo_kernels.echo_attention, inputs, torch.float32, do, window=8)
        _, second = grads(echo_kernels.echo_attention, inputs, torch.float32, do, window=8)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def _poisoned_empty(empty):
    """torch.empty whose tensors come filled with NaN (integers with their largest value, bools with
    True): an output the kernels leave partly unwritten, or scratch they read before writing, shows."""
    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        if t.is_floating_point():
            return t.fill_(float("nan"))
        return t.fill_(True if t.dtype == torch.bool else torch.iinfo(t.dtype).max)
    return poisoned


@pytest.mark.parametrize("dq_in_key_pass", [False, True], ids=["dq_pass", "dq_in_key_pass"])
@pytest.mark.parametrize("case, rotation", [("rows_without_keys", "no_m"),
                                            ("cross_window_offsets", "rope_then_m"),
                                            ("decode_window", "m_then_rope"), ("global_ragged_pad", "no_m")])
def test_every_output_is_written(use_triton, monkeypatch, case, rotation, dq_in_key_pass):
    """Every buffer the launchers allocate starts as NaN: the output, dq, dk, dv and the other gradients
    still match the float64 reference (rows with no key, key tiles no query reaches, ragged and padded
    edges, decoding), so the kernels write every element they return and read only what they wrote."""
    inputs = case_inputs(case, rotation, B=2)
    B, H, Tq, h = inputs["q"].shape
    do = torch.randn(B, H, Tq, h, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out_want, want = grads(reference.echo_attention, inputs, torch.float64, do,
                           **options(case, rotation=rotation))
    with attention_backward.dq_in_key_pass(dq_in_key_pass), monkeypatch.context() as poison:
        poison.setattr(torch, "empty", _poisoned_empty(torch.empty))
        out, got = grads(echo_kernels.echo_attention, inputs, torch.float32, do,
                         **options(case, rotation=rotation))
    assert rel_err(out, out_want) < 1e-5
    assert_gradients_match(got, want, case, inputs)


@pytest.mark.parametrize("Tq, Tk", [(0, 20), (20, 0), (0, 0)])
def test_empty_sequences(use_triton, Tq, Tk):
    """No query or no key: the output has its shape (zeros where a query has no key), and every
    gradient is zeros of its input's shape (each an empty sum)."""
    inputs = make_inputs(Tq=Tq, Tk=Tk)
    do = torch.randn(1, 2, Tq, 32, dtype=torch.float64)
    out, got = grads(echo_kernels.echo_attention, inputs, torch.float32, do, window=4)
    assert out.shape == (1, 2, Tq, 32) and torch.equal(out, torch.zeros_like(out))
    assert sorted(got) == sorted(GRAD_NAMES)
    for name, g in got.items():
        assert g.shape == inputs[name].shape and torch.equal(g, torch.zeros_like(g)), name


def test_key_pass_sums_dq_by_groups_of_key_tiles(use_triton, monkeypatch):
    """The dk/dv pass summing dq, one (batch, head) split into 3 programs of key tiles (5 tiles: 2, 2
    and 1), each with its own dq sum: no dq pass launches (each pass takes its row once), every
    gradient matches the float64 reference, and a second run gives the same bits."""
    groups, rows = [], []
    monkeypatch.setattr(attention_backward, "_multiprocessors", lambda device: 3)
    count = attention_backward._key_groups_per_head
    monkeypatch.setattr(attention_backward, "_key_groups_per_head",
                        lambda *args: groups.append(count(*args)) or groups[-1])
    launch = attention_backward.with_override
    monkeypatch.setattr(attention_backward, "with_override", lambda row: rows.append(row) or launch(row))
    arch = attention_common.tile_arch(torch.device(DEVICE))
    with attention_backward.dq_in_key_pass(True):  # the rows fp32 inputs take
        table = attention_backward.default_blocks(32, arch, torch.float32)
    key_pass = table["dkdv"]
    T = 5 * (key_pass["BLOCK_N"] if ON_GPU else 16) - 10
    inputs = make_inputs(B=1, H=1, Tq=T, pad=True)
    do = torch.randn(1, 1, T, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    opts = dict(window=(T // 3, T // 7), rotation="rope_then_m")
    _, want = grads(reference.echo_attention, inputs, torch.float64, do, **opts)
    with attention_backward.dq_in_key_pass(True):
        _, got = grads(echo_kernels.echo_attention, inputs, torch.float32, do, **opts)
        _, again = grads(echo_kernels.echo_attention, inputs, torch.float32, do, **opts)
    assert groups == [3, 3]
    assert rows[:5] == [table["delta"], table["unrope"], table["unrotate"], table["unrotate_no_m"], key_pass]
    assert len(rows) == 12  # and the forward's RoPE(k) row, each run
    assert_gradients_match(got, want, "groups", inputs)
    for name in got:
        assert torch.equal(got[name], again[name]), name


# --------------------------------------------------------------------------------------------------
# Tile tables (attention_common.tile_arch): each at its own tile sizes
# --------------------------------------------------------------------------------------------------

def test_tile_table_of_a_device():
    """The interpreter takes the sm_80 table (as does every GPU but Hopper); tiles_of forces one,
    nested, and refuses a table that does not exist."""
    cpu = torch.device("cpu")
    assert attention_common.tile_arch(cpu) == 80
    with attention_common.tiles_of(90):
        assert attention_common.tile_arch(cpu) == 90
        with attention_common.tiles_of(80):
            assert attention_common.tile_arch(cpu) == 80
        assert attention_common.tile_arch(cpu) == 90
    assert attention_common.tile_arch(cpu) == 80
    with pytest.raises(ValueError, match="sm_75"):
        with attention_common.tiles_of(75):
            pass


@pytest.mark.gpu
def test_hopper_takes_the_sm90_table_gpu():
    major = torch.cuda.get_device_capability()[0]
    assert attention_common.tile_arch(torch.device("cuda")) == (90 if major == 9 else 80)


@pytest.fixture
def launched_rows(monkeypatch) -> tuple[list[dict], list[dict]]:
    """(forward rows, backward rows): the tile-table row of each launch the Triton backend makes, in
    launch order, taken as it is (no test override)."""
    monkeypatch.setenv("ECHO_BACKEND", "triton")
    forward_rows, backward_rows = [], []
    monkeypatch.setattr(kernel, "with_override", lambda row: forward_rows.append(row) or dict(row))
    monkeypatch.setattr(attention_backward, "with_override",
                        lambda row: backward_rows.append(row) or dict(row))
    return forward_rows, backward_rows


@pytest.mark.parametrize("dq_in_key_pass", [False, True], ids=["dq_pass", "dq_in_key_pass"])
@pytest.mark.parametrize("window", [None, (200, 150)])
@pytest.mark.parametrize("h", ATTENTION_HEAD_WIDTHS)
@pytest.mark.parametrize("arch", attention_common.TILE_TABLES)
def test_each_tile_table_matches_reference(launched_rows, arch, h, window, dq_in_key_pass):
    """Each table's own tiles at each built head width (no test override), dq summed either way: T =
    300 spans several query and key tiles of either, the window (200, 150) leaves key tiles wholly
    inside the band and cuts others, Echo's bias table (n = 15) and padding in one batch only (so the
    other runs the unmasked loop). Output and every gradient against the float64 reference, every
    launch taking its row of the table: the rows of 2-byte inputs, the GPU's fast way, on the fp32 inputs
    the interpreter runs (attention_common.rows_of; test_fp32_rows_match_reference runs fp32's own)."""
    from echo_kernels.kernels import ECHO_MAX_REL_DIST

    forward_rows, backward_rows = launched_rows
    inputs = make_inputs(B=2, H=2, Tq=300, h=h, n=ECHO_MAX_REL_DIST, pad=True)
    inputs["key_padding_mask"][0] = False
    inputs["M"] = None if window else inputs["M"]
    opts = dict(window=window, rotation="rope_then_m")
    do = torch.randn(inputs["q"].shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out_ref, want = grads(reference.echo_attention, inputs, torch.float64, do, **opts)
    with attention_common.tiles_of(arch), attention_backward.dq_in_key_pass(dq_in_key_pass), \
            attention_common.rows_of(torch.bfloat16):
        out, got = grads(echo_kernels.echo_attention, inputs, torch.float32, do, **opts)
    assert rel_err(out, out_ref) < 1e-5
    assert_gradients_match(got, want, f"sm_{arch}", inputs)
    with attention_common.tiles_of(arch), attention_backward.dq_in_key_pass(dq_in_key_pass):
        forward_row = kernel.default_blocks(h, arch, torch.bfloat16)
        backward_table = attention_backward.default_blocks(h, arch, torch.bfloat16)
    assert forward_rows == [forward_row]
    assert forward_row == kernel._FORWARD_BLOCKS[h, arch] != kernel.default_blocks(h, arch, torch.float32)
    assert ("dq" in backward_table) != dq_in_key_pass
    # each backward pass's row, then the forward's key tiles for the rotation pass (q'' and RoPE(k))
    assert backward_rows == [*backward_table.values(), forward_row]


@pytest.mark.parametrize("dq_in_key_pass", [False, True], ids=["dq_pass", "dq_in_key_pass"])
@pytest.mark.parametrize("h", ATTENTION_HEAD_WIDTHS)
def test_fp32_rows_match_reference(launched_rows, h, dq_in_key_pass):
    """fp32 inputs take rows of their own (the _FP32 tables: exact products on fused multiply-adds, the
    same on both tile tables): at each built head width, T = 300 over several of their tiles, M, a
    window, Echo's bias table and padding, output and every gradient against the float64 reference, each
    launch on its fp32 row."""
    from echo_kernels.kernels import ECHO_MAX_REL_DIST

    forward_rows, backward_rows = launched_rows
    inputs = make_inputs(B=2, H=1, Tq=300, h=h, n=ECHO_MAX_REL_DIST, pad=True)
    opts = {"window": (200, 150), "rotation": "rope_then_m"}
    do = torch.randn(inputs["q"].shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out_ref, want = grads(reference.echo_attention, inputs, torch.float64, do, **opts)
    with attention_backward.dq_in_key_pass(dq_in_key_pass):
        out, got = grads(echo_kernels.echo_attention, inputs, torch.float32, do, **opts)
    assert rel_err(out, out_ref) < 1e-5
    assert_gradients_match(got, want, "fp32 rows", inputs)
    light = attention_backward._LIGHT_BLOCKS_FP32[h]
    heavy = ([attention_backward._KEY_PASS_BLOCKS_FP32[h]] if dq_in_key_pass else
             list(attention_backward._HEAVY_BLOCKS_FP32[h].values()))
    assert forward_rows == [kernel._FORWARD_BLOCKS_FP32[h]]
    assert backward_rows == [*light.values(), *heavy, kernel._FORWARD_BLOCKS_FP32[h]]


# --------------------------------------------------------------------------------------------------
# On a GPU: real shapes and default tiles
# --------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dq_in_key_pass", [False, True], ids=["dq_pass", "dq_in_key_pass"])
@pytest.mark.parametrize("window", [None, 256])
def test_encoder_shape_bf16_gpu(use_triton, window, dq_in_key_pass):
    """Echo encoder head width at T = 1500 in bf16, forward and gradients, against the reference,
    dq summed either way."""
    inputs = make_inputs(B=2, H=4, Tq=1500, h=64, n=15, pad=True)
    do = torch.randn(2, 4, 1500, 64, dtype=torch.float64)
    with attention_backward.dq_in_key_pass(dq_in_key_pass):
        _assert_low_precision_gradients(inputs, do, torch.bfloat16, window=window)


@pytest.mark.gpu
def test_long_window_memory_gpu(use_triton):
    """T = 16384, window 256, M folded upstream (M = None, as the model calls it): beyond q, k, v and
    out the forward holds RoPE(k) in the dot type and lse (B, H, T) fp32, and nothing of size T^2."""
    B, H, T, h = 1, 16, 16384, 64
    q, k, v = (torch.randn(B, H, T, h, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    w = torch.rand(h // 2, device="cuda")
    bias = torch.randn(29, H, device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = echo_kernels.echo_attention(q, k, v, None, w, 1.0, bias, window=256)
    torch.cuda.synchronize()
    size = q.numel() * q.element_size()
    extra = torch.cuda.max_memory_allocated() - base - out.numel() * out.element_size()
    assert extra <= size + B * H * T * 4 + 2**20, (extra, size)  # and under 1 MiB of small tensors (s, ...)


# --------------------------------------------------------------------------------------------------
# Against FlexAttention (no rotation: M = I, s = 0)
# --------------------------------------------------------------------------------------------------


def _flex_case():
    """Inputs without rotation (M = I, s = 0) and FlexAttention's score_mod and block mask for them."""
    from torch.nn.attention.flex_attention import create_block_mask

    T, H, n, left, right = 48, 2, 6, 5, 3
    inputs = make_inputs(Tq=T, H=H, n=n)
    inputs["M"] = torch.eye(32, dtype=torch.float64)
    inputs["s"] = torch.tensor(0.0, dtype=torch.float64)
    x = cast(inputs, torch.float32)

    def score_mod(score, b, head, i, j):
        return score + x["bias"][torch.clamp(i - j, -(n - 1), n - 1) + n - 1, head]

    def band(b, head, i, j):
        return (j >= i - left) & (j <= i + right)

    block_mask = create_block_mask(band, None, None, T, T, device=DEVICE)
    return x, score_mod, block_mask, (left, right)


def test_matches_flex_attention_without_rotation(use_triton):
    from torch.nn.attention.flex_attention import flex_attention

    x, score_mod, block_mask, window = _flex_case()
    want = flex_attention(x["q"], x["k"], x["v"], score_mod=score_mod, block_mask=block_mask)
    got = call(echo_kernels.echo_attention, x, window=window)
    assert rel_err(got, want) < 1e-5


def test_bias_gradient_matches_flex_attention_without_rotation(use_triton):
    from torch.nn.attention.flex_attention import flex_attention

    x, score_mod, block_mask, window = _flex_case()
    x["bias"].requires_grad_(True)
    want = flex_attention(x["q"], x["k"], x["v"], score_mod=score_mod, block_mask=block_mask)
    (dbias_flex,) = torch.autograd.grad(want.sum(), [x["bias"]])
    got = call(echo_kernels.echo_attention, x, window=window)
    (dbias,) = torch.autograd.grad(got.sum(), [x["bias"]])
    assert rel_err(dbias, dbias_flex) < 1e-4


# --------------------------------------------------------------------------------------------------
# Registration, dispatch, compile
# --------------------------------------------------------------------------------------------------


def test_opcheck(use_triton):
    inputs = cast(make_inputs(Tq=20, Tk=24, pad=True), torch.float32)
    for name in GRAD_NAMES:
        inputs[name].requires_grad_(True)
    i = inputs
    for keys_rotated in (False, True):
        args = (i["q"], i["k"], i["v"], i["M"], i["w"], i["s"], i["bias"], i["key_padding_mask"], 4, 2, 3, 0,
                "half_split", keys_rotated)
        torch.library.opcheck(torch.ops.echo_kernels.echo_attention.default, args)
    args = (i["q"], i["k"], i["v"], i["M"], i["w"], i["s"], None, None, reference.UNBOUNDED, 0, 0, 0,
            "interleaved", True)
    torch.library.opcheck(torch.ops.echo_kernels.echo_attention.default, args)
    args = (i["q"], i["k"], i["v"], None, i["w"], i["s"], i["bias"], i["key_padding_mask"], 4, 2, 3, 0,
            "half_split", False)
    torch.library.opcheck(torch.ops.echo_kernels.echo_attention.default, args)

    detached = {name: t.detach() if t is not None else None for name, t in i.items()}
    d = detached
    for M in (d["M"], None):
        out, lse = torch.ops.echo_kernels.echo_attention(d["q"], d["k"], d["v"], M, d["w"], d["s"], d["bias"],
                                                         d["key_padding_mask"], 4, 2, 3, 0, "half_split",
                                                         False)
        args = (torch.randn_like(out), d["q"], d["k"], d["v"], M, d["w"], d["s"], d["bias"],
                d["key_padding_mask"], 4, 2, 3, 0, "half_split", False, out, lse)
        torch.library.opcheck(torch.ops.echo_kernels.echo_attention_backward.default, args)


@pytest.mark.parametrize("rotation", ["m_then_rope", "rope_then_m"])
def test_torch_compile_fullgraph(use_triton, rotation):
    """The default order with an M compiles as q M, k M and the op without M; the other as the op with M."""
    inputs = make_inputs(Tq=30, pad=True)
    do = torch.randn(1, 2, 30, 32, dtype=torch.float64)
    compiled = torch.compile(echo_kernels.echo_attention, fullgraph=True)
    opts = dict(window=(6, 2), q_offset=1, rotation=rotation)
    out_c, g_c = grads(compiled, inputs, torch.float32, do, **opts)
    out_e, g_e = grads(echo_kernels.echo_attention, inputs, torch.float32, do, **opts)
    assert torch.allclose(out_c, out_e, atol=1e-6)
    for name in g_e:
        assert torch.allclose(g_c[name], g_e[name], atol=1e-5), name


def test_dispatch(monkeypatch):
    inputs = cast(make_inputs(Tq=8), torch.float32)
    want = call(reference.echo_attention, inputs)
    monkeypatch.setenv("ECHO_BACKEND", "reference")
    assert torch.equal(call(echo_kernels.echo_attention, inputs), want)
    if not ON_GPU:
        # auto: CPU tensors take the blocked CPU path; Triton reaches them only when asked
        calls = []
        blocked = attention_cpu.attention
        monkeypatch.setattr(attention_cpu, "attention", lambda *args: calls.append(1) or blocked(*args))
        monkeypatch.setenv("ECHO_BACKEND", "auto")
        assert rel_err(call(echo_kernels.echo_attention, inputs), want) < 1e-6 and calls == [1]
        monkeypatch.setenv("ECHO_BACKEND", "triton")
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            call(echo_kernels.echo_attention, inputs)


# --------------------------------------------------------------------------------------------------
# Ahead-of-time compile for sm_80 / sm_90
# --------------------------------------------------------------------------------------------------


def test_aot_compile_report(aot_reports):
    """Every launch compiles for both targets, its dots become tensor-core instructions (wgmma on
    sm_90) but fp32's (exact fused multiply-adds), shared memory stays within a block's on the GPUs
    each table serves and a CTA fits an SM, the forward's key loops hold its products, and its spills
    and main loops' instruction counts are those that the committed report of the installed Triton
    records (h = 32, 64, 128; bf16, fp16, fp32)."""
    rows = [r for r in aot_reports if r.name.startswith("attention_")]
    names = {r.name for r in rows}
    recorded = aot.recorded_spills(triton.__version__)
    recorded_loops = aot.recorded_loops(triton.__version__)
    forward = [r for r in rows if r.name.startswith("attention_fwd_") and not r.name.endswith("_fp32")]
    assert forward and all(r.main_loops and all(c.tensor_core > 0 for c in r.main_loops) for r in forward)
    parts = ("rope", "rope_p", "near_bias", "fwd", "bwd_delta", "bwd_dkdv", "bwd_dkdv_dq", "bwd_unrope",
             "bwd_dq", "bwd_dq_unrotate", "bwd_dq_unrotate_no_m")
    assert {f"attention_{part}_h{h}_{dt}" for part in parts for h in (32, 64, 128)
            for dt in ("bf16", "fp16", "fp32")} | {"attention_fwd_decode_h64_bf16"} <= names
    # Elementwise passes, no matrix product: the RoPE undo of dk, D = rowsum(O dO), and without M the
    # queries' RoPE undo (no product with P); the rotation of keys and queries without P and the NEAR bias
    # tiles, which hold no tile in shared memory either.
    unstaged = ("attention_rope_h", "attention_near_bias_")
    no_dot = ("attention_bwd_unrope_", "attention_bwd_delta_", "attention_bwd_dq_unrotate_no_m_", *unstaged)
    for r in rows:
        assert {x.arch for x in rows if x.name == r.name} == set(aot.TARGETS), r.name
        # every pass stages tiles in shared memory but the forward's two elementwise ones
        assert (r.shared_bytes > 0) != r.name.startswith(unstaged), r.name
        assert r.registers > 0, r.name
        assert r.shared_bytes <= SHARED_PER_BLOCK[r.arch], r.name
        assert r.spilled_bytes == recorded[(r.name, r.arch)], r.name  # as the committed report says
        # kernels with no loop have no rows
        assert r.main_loops == recorded_loops.get((r.name, r.arch), []), r.name
        assert r.ctas_per_sm >= 1, r.name
        if r.name.startswith(no_dot) or r.name.endswith("_fp32"):
            assert not r.mma, r.name
            continue
        assert r.mma, r.name
        # products of fewer than 64 rows are below wgmma's, mma.sync there: decoding's 16-row tiles, and the
        # unrotate pass with M at h = 64 (32-row tiles; its dP~ products have h / 2 = 32)
        assert r.wgmma == (r.arch == 90 and "decode" not in r.name and not r.name.startswith(
            "attention_bwd_dq_unrotate_h64_")), r.name


# The shared memory a block may take on the smallest GPU each tile table serves: the sm_80 table
# serves every GPU but Hopper, down to sm_86's and sm_89's 99 KB (an A100 gives 163 KB); H100's 227 KB.
SHARED_PER_BLOCK = {80: 99 * 1024, 90: 227 * 1024}


def test_aot_compiles_the_bias_diagonals_of_echos_table():
    """The report's launches carry the bias table of Echo's default configuration, so the diagonal sums
    of the dq kernel and of the dk/dv kernel summing dq are compiled at the width the model runs them
    (2n - 3 = 27 rows in a 32-wide tile)."""
    from echo import EchoConfig
    from echo_kernels.kernels import ECHO_MAX_REL_DIST

    assert ECHO_MAX_REL_DIST == EchoConfig().max_rel_dist
    summing = [s for arch in aot.TARGETS for s in aot.all_specs(arch)
               if s.name.startswith(("attention_bwd_dq_h", "attention_bwd_dkdv_dq_h"))]
    assert len(summing) == 2 * 3 * 2 * len(ATTENTION_HEAD_WIDTHS)  # 2 kernels, 3 dtypes, 2 targets
    assert all(s.constexprs["N_DIAG"] == 32 for s in summing)
    assert [attention_backward.inner_diagonals(n) for n in (1, 2, 3, 15, 16, 17)] == [1, 1, 4, 32, 32, 32]


def test_fused_loops_against_the_plain_flash_kernel(aot_reports):
    """Static targets (sm_90, bf16, h = 64, read from the SASS), against echo_kernels.plain_attention
    at the same tiles: no spills; the plain kernels' loops, and the fused forward's and dk/dv pass's,
    load every tile (and the forward its padding flags) asynchronously; each fused pass's loop over the
    tiles inside the band (no mask and no synchronous load: the dq pass's masked loops wait on the
    padding mask's bytes) executes at most 1.25x (forward) and 1.4x (dq, dk/dv) the plain pass's
    instructions per tensor-core instruction."""
    at = {r.name: r for r in aot_reports if r.arch == 90}
    for fused, plain, bound in (("fwd", "fwd", 1.25), ("bwd_dq", "bwd_dq", 1.4),
                                ("bwd_dkdv", "bwd_dkdv", 1.4)):
        ours, floor = at[f"attention_{fused}_h64_bf16"], at[f"plain_attention_{plain}_h64_bf16"]
        assert ours.spilled_bytes == 0 and floor.spilled_bytes == 0, fused
        assert floor.main_loops and all(loop.sync_loads == 0 for loop in floor.main_loops), plain
        unmasked = [loop.per_tensor_core for loop in ours.main_loops if loop.sync_loads == 0]
        assert unmasked, fused
        assert min(unmasked) <= bound * min(loop.per_tensor_core for loop in floor.main_loops), fused
    for name in ("fwd", "bwd_dkdv"):
        assert all(loop.sync_loads == 0 for loop in at[f"attention_{name}_h64_bf16"].main_loops), name


def test_fused_forward_code_stays_small(aot_reports):
    """The forward's code, on both targets at every head width (bf16, with a bias table and a padding
    mask), is at most 2.5 times the plain forward's at the same tiles (under Triton 3.8 at most 2.31; 3.6
    makes up to 2.96): its query tile arrives rotated and its loops are three (docs/model.md, "Kernels"),
    where a rotation on chip and nine loops made it 7.3 times at the benches' launch (sm_90, h = 64, no
    padding mask, Triton 3.8)."""
    at = {(r.name, r.arch): r for r in aot_reports}
    for arch in aot.TARGETS:
        for h in ATTENTION_HEAD_WIDTHS:
            ours, floor = at[f"attention_fwd_h{h}_bf16", arch], at[f"plain_attention_fwd_h{h}_bf16", arch]
            assert 0 < ours.code <= 2.5 * floor.code, (arch, h, ours.code, floor.code)


def test_fused_backward_code_stays_small(aot_reports):
    """The dq and dk/dv passes' code, on both targets at every head width (bf16, with a bias table and a
    padding mask), is at most 4 times the plain passes' at the same tiles (under Triton 3.8 at most 3.68,
    the dq pass at h = 32, whose plain pass is the smallest kernel; 3.6 makes up to 4.04): three loops each
    (docs/model.md, "Kernels"), where nine and seven made them up to 6.6 times (the dk/dv pass on sm_90 at
    h = 32, Triton 3.8)."""
    at = {(r.name, r.arch): r for r in aot_reports}
    for arch in aot.TARGETS:
        for h in ATTENTION_HEAD_WIDTHS:
            for name in ("bwd_dq", "bwd_dkdv"):
                ours, floor = (at[f"attention_{name}_h{h}_bf16", arch],
                               at[f"plain_attention_{name}_h{h}_bf16", arch])
                assert 0 < ours.code <= 4 * floor.code, (name, arch, h, ours.code, floor.code)


def _warp_instructions_per_pair(report) -> float:
    """Warp-instructions per (query, key) pair of a pass's loop over the tiles inside the band, the
    fewest of its main loops' (one tile of BLOCK_M x BLOCK_N pairs per iteration, num_warps warps)."""
    tiles, warps = report.launch.split("/")[:2]
    rows, cols = map(int, tiles.split("x"))
    return min(loop.instructions for loop in report.main_loops) * int(warps[:-1]) / (rows * cols)


def test_key_pass_against_the_dkdv_and_dq_passes(aot_reports):
    """The dk/dv pass summing dq, statically (sm_90, bf16, h = 32 and 64, docs/model.md, "Backward
    passes"): every loop loads its query tiles asynchronously and runs on warpgroup MMA, and the one
    inside the band executes fewer warp-instructions per (query, key) pair than the dk/dv and dq
    passes' together, by at least a fifth (it makes five products where they make seven). Its
    synchronous loads are the dq sums it adds to."""
    at = {r.name: r for r in aot_reports if r.arch == 90}
    for h in (32, 64):
        key_pass = at[f"attention_bwd_dkdv_dq_h{h}_bf16"]
        assert key_pass.wgmma and all(loop.async_loads > 0 for loop in key_pass.main_loops)
        two_passes = (_warp_instructions_per_pair(at[f"attention_bwd_dkdv_h{h}_bf16"])
                      + _warp_instructions_per_pair(at[f"attention_bwd_dq_h{h}_bf16"]))
        assert _warp_instructions_per_pair(key_pass) < 0.8 * two_passes, h


def test_sm80_loops_wait_on_no_load(aot_reports):
    """On sm_80's tile table, at every head width and dtype, with a key-padding mask, no main loop of
    the forward, dk/dv or dq pass waits on a global load: the backward reads the mask as int32 flags
    there (attention_backward._PAD_FLAGS), which leave q'' and dO asynchronous copies too."""
    heavy = re.compile(r"attention_(fwd|bwd_dkdv|bwd_dq)_h\d+_(bf16|fp16)$")
    rows = [r for r in aot_reports if r.arch == 80 and heavy.match(r.name)]
    assert len(rows) == 3 * 2 * len(ATTENTION_HEAD_WIDTHS)
    for r in rows:
        assert r.main_loops and all(loop.sync_loads == 0 for loop in r.main_loops), r.name


def test_sm90_loops_inside_the_band_load_asynchronously(aot_reports):
    """On sm_90's tile table, at every head width and dtype, the forward's, dk/dv's and dq's loop over
    the key tiles inside the band waits on no global load (every tile an asynchronous copy) and runs
    on warpgroup MMA; every loop of the forward and of dk/dv does, masked ones included (the forward
    loads the padding as int32 flags, which are copied asynchronously too). The dq pass's masked
    loops wait on the padding's bytes, and on nothing else: its NEAR loop, whose bias tile is copied
    asynchronously, waits on as many loads as the others."""
    heavy = re.compile(r"attention_(fwd|bwd_dkdv|bwd_dq)_h\d+_(bf16|fp16)$")
    rows = [r for r in aot_reports if r.arch == 90 and heavy.match(r.name)]
    assert len(rows) == 3 * 2 * len(ATTENTION_HEAD_WIDTHS)
    for r in rows:
        assert r.wgmma and any(loop.sync_loads == 0 for loop in r.main_loops), r.name
    whole = [r for r in rows if not r.name.startswith("attention_bwd_dq_")]
    assert len(whole) == 2 * 2 * len(ATTENTION_HEAD_WIDTHS)
    for r in whole:
        assert all(loop.sync_loads == 0 for loop in r.main_loops), r.name
    dq = [r for r in rows if r not in whole]
    assert len(dq) == 2 * len(ATTENTION_HEAD_WIDTHS)
    for r in dq:
        masked = {loop.sync_loads for loop in r.main_loops} - {0}
        assert len(masked) == 1, (r.name, [loop.sync_loads for loop in r.main_loops])
