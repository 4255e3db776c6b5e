"""echo_attention's CPU paths (echo_kernels.kernels.attention_cpu) against the float64 reference: the
fused forward (scaled_dot_product_attention), the C++ backward (echo_kernels::biased_attention_backward,
whose own cases are in test_biased_attention_cpu.py) and the PyTorch blocked one.

Every mask case runs three ways: with the default blocks (usually one block here) and with blocks forced
down to 16 query rows, so that keys are cut by the band and blocks start mid-band, both with the C++
backward; and with the blocked backward in PyTorch at 16 rows, whose bias gradient is summed across blocks.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from attention_cases import (CASES, ROTATIONS, call, case_inputs, cast, grads, make_inputs, options,
                             with_keys_rotated)
from numerics import rel_err

from echo_kernels import backend, reference
from echo_kernels.kernels import attention_cpu


def blocked(q, k, v, M, w, s, bias, *, key_padding_mask=None, window=None, causal=False, q_offset=0,
            k_offset=0, layout="half_split", rotation="m_then_rope", keys_rotated=False):
    """attention_cpu.attention with echo_attention's keyword arguments."""
    left, right = reference.window_bounds(window, causal)
    return attention_cpu.attention(q, k, v, M, w, s, bias, key_padding_mask, left, right, q_offset, k_offset,
                                   layout, rotation, keys_rotated)


@pytest.fixture(params=["default_blocks", "small_blocks", "python_backward"])
def block_size(request, monkeypatch):
    if request.param != "default_blocks":
        monkeypatch.setattr(attention_cpu, "BLOCK_ELEMENTS", 1)  # 16 query rows per block
    if request.param == "python_backward":
        python_backward(monkeypatch)
    return request.param


@pytest.fixture(params=["compiled_backward", "python_backward"])
def backward(request, monkeypatch):
    if request.param == "python_backward":
        python_backward(monkeypatch)
    return request.param


def python_backward(monkeypatch):
    """Take the PyTorch blocked backward, as without the extension (its warning already said)."""
    monkeypatch.setattr(attention_cpu, "COMPILED_BACKWARD", False)
    monkeypatch.setattr(backend, "_warned", {"biased_attention_backward"})


def _layout(case):
    return ("half_split", "interleaved")[list(CASES).index(case) % 2]


@pytest.mark.parametrize("rotation", ROTATIONS)
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_gradients_match_reference_float64(block_size, case, rotation):
    inputs = case_inputs(case, rotation, B=2)
    do = torch.randn(inputs["q"].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    opts = options(case, _layout(case), rotation)
    out_ref, want = grads(reference.echo_attention, inputs, torch.float64, do, device="cpu", **opts)
    out, got = grads(blocked, inputs, torch.float64, do, device="cpu", **opts)
    assert out.dtype == torch.float64 and rel_err(out, out_ref) < 1e-12
    for name, g in want.items():
        if g.norm() < 1e-12:  # dbias with n = 1 sums whole softmax rows: exactly 0 up to rounding
            assert got[name].abs().max() < 1e-12, name
        else:
            assert rel_err(got[name], g) < 1e-11, (case, name, rel_err(got[name], g))


@pytest.mark.parametrize("case, rotation", [
    ("global_ragged_pad", "m_then_rope"), ("causal_window", "rope_then_m"), ("cross_window_offsets", "no_m"),
    ("rows_without_keys", "m_then_rope")])
def test_float32_matches_reference(block_size, case, rotation):
    inputs = case_inputs(case, rotation, B=2)
    do = torch.randn(inputs["q"].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    opts = options(case, rotation=rotation)
    _, want = grads(reference.echo_attention, inputs, torch.float64, do, device="cpu", **opts)
    out, got = grads(blocked, inputs, torch.float32, do, device="cpu", **opts)
    assert out.dtype == torch.float32
    for name, g in want.items():
        tol = 5e-5 if name in ("s", "w") else 1e-5  # s and w sum position-weighted terms with cancellation
        assert rel_err(got[name], g) < tol, (case, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_computed_in_float32(dtype):
    """q, k, v rounded to bf16/fp16 (M, w, s, bias float32), then float32 inside: against the float64
    reference on the same rounded values, only the output's rounding is left."""
    inputs = reference.round_activations(case_inputs("causal_window"), dtype)
    want = call(reference.echo_attention, inputs, **options("causal_window"))
    got = call(blocked, cast(inputs, dtype, "cpu", activations_only=True), **options("causal_window"))
    assert got.dtype == dtype and rel_err(got, want) < reference.rounding_tolerance(dtype, 1)


@pytest.mark.parametrize("rotation", ["m_then_rope", "rope_then_m"])
def test_gradcheck(backward, rotation):
    inputs = make_inputs(B=1, H=2, Tq=9, Tk=11, h=8, n=3, pad=True)
    inputs["key_padding_mask"][0, :3] = False
    leaves = [inputs[name].requires_grad_(True) for name in ("q", "k", "v", "M", "w", "s", "bias")]

    def fn(q, k, v, M, w, s, bias):
        return blocked(q, k, v, M, w, s, bias, key_padding_mask=inputs["key_padding_mask"], window=(3, 2),
                       q_offset=1, k_offset=0, layout="interleaved", rotation=rotation)

    assert torch.autograd.gradcheck(fn, leaves)


def test_rows_without_keys_give_zeros(backward):
    inputs = make_inputs(B=2, Tq=24, Tk=30)
    inputs["key_padding_mask"] = torch.zeros(2, 30, dtype=torch.bool)
    inputs["key_padding_mask"][1] = True  # the second batch has no key at all
    do = torch.randn(2, 2, 24, 32, dtype=torch.float64)
    out, g = grads(blocked, inputs, torch.float32, do, device="cpu")
    assert torch.isfinite(out).all() and (out[1] == 0).all()
    assert all(torch.isfinite(t).all() for t in g.values())
    assert (g["q"][1] == 0).all() and (g["k"][1] == 0).all() and (g["v"][1] == 0).all()


def test_backward_keeps_no_logits():
    """What autograd saves is O(T h): inputs and output, never the Tq x Tk probabilities."""
    B, H, T, h = 1, 2, 300, 16
    inputs = cast(make_inputs(B=B, H=H, Tq=T, h=h, n=4), torch.float32, "cpu")
    for name in ("q", "k", "v", "M", "bias"):
        inputs[name].requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        call(blocked, inputs)
    assert saved and max(saved) <= B * H * T * h


def test_a_window_visits_only_its_band():
    """With a window w, the blocks pair each query with O(w + block rows) keys, not all T."""
    T, w, rows = 4096, 32, 16
    visited = sum((b - a) * (hi - lo) for a, b, lo, hi in attention_cpu.blocks(T, T, w, w, 0, 1 << 30))
    assert visited <= T * (2 * w + 1 + rows)
    assert sum((b - a) * (hi - lo) for a, b, lo, hi
               in attention_cpu.blocks(T, T, reference.UNBOUNDED, reference.UNBOUNDED, 0, 1)) == T * T


def test_relative_bias_block_is_the_gathered_bias():
    bias = torch.randn(9, 3, dtype=torch.float64)
    q_pos, k_pos = torch.arange(40, 57), torch.arange(30, 71)
    d0 = int(q_pos[0] - k_pos[0])
    got = attention_cpu.relative_bias_block(bias, len(q_pos), len(k_pos), d0)
    assert torch.equal(got, reference.relative_bias(bias, q_pos, k_pos))


def test_is_deterministic(backward):
    inputs = make_inputs(B=2, Tq=40, pad=True)
    do = torch.randn(2, 2, 40, 32, dtype=torch.float64)
    _, first = grads(blocked, inputs, torch.float32, do, device="cpu", window=8)
    _, second = grads(blocked, inputs, torch.float32, do, device="cpu", window=8)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_torch_compile_fullgraph(backward, monkeypatch):
    """torch.compile traces the blocked path whole, forward and backward, with the same results."""
    import echo_kernels

    monkeypatch.setenv("ECHO_BACKEND", "auto")  # CPU tensors take the blocked path

    inputs = make_inputs(B=2, Tq=40, pad=True)
    do = torch.randn(2, 2, 40, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    # Static shapes: another test compiling the same function first would otherwise make dynamo retrace
    # it with symbolic sizes, and the float32 sums would then round differently depending on test order.
    torch._dynamo.reset()
    compiled = torch.compile(echo_kernels.echo_attention, fullgraph=True, dynamic=False)
    _, want = grads(reference.echo_attention, inputs, torch.float64, do, device="cpu", window=8)
    _, got = grads(compiled, inputs, torch.float32, do, device="cpu", window=8)
    for name, g in want.items():
        tol = 5e-5 if name in ("s", "w") else 1e-5  # s and w sum position-weighted terms with cancellation
        assert rel_err(got[name], g) < tol, name


@pytest.mark.parametrize("rotation", ROTATIONS)
@pytest.mark.parametrize("case", list(CASES))
def test_fused_forward_matches_reference_float64(block_size, case, rotation):
    """Without gradients the output comes from scaled_dot_product_attention, one additive mask per block."""
    inputs = case_inputs(case, rotation, B=2)
    opts = options(case, _layout(case), rotation)
    want = call(reference.echo_attention, inputs, **opts)
    with torch.no_grad():
        got = call(blocked, inputs, **opts)
    assert got.dtype == torch.float64 and rel_err(got, want) < 1e-12, (case, rel_err(got, want))


@pytest.mark.parametrize("case",
                         ["global", "cross", "decode", "offsets_causal", "rows_without_keys", "n_beyond_T"])
def test_fused_forward_float32(case):
    inputs = case_inputs(case, B=2)
    want = call(reference.echo_attention, inputs, **options(case))
    with torch.no_grad():
        got = call(blocked, cast(inputs, torch.float32, "cpu"), **options(case))
    assert got.dtype == torch.float32 and rel_err(got, want) < 1e-5


def test_fused_forward_everywhere_blocked_backward_with_gradients():
    """The forward is always the fused kernel's; only a call that wants gradients keeps a graph, whose
    backward is the blocked one (exact bias gradient, probabilities recomputed from the logsumexp)."""
    inputs = case_inputs("causal_window")
    out = call(blocked, inputs, **options("causal_window"))
    with torch.no_grad():
        also = call(blocked, {**inputs, "q": inputs["q"].clone().requires_grad_(True)},
                    **options("causal_window"))
    assert out.grad_fn is None and also.grad_fn is None
    trained = call(blocked, {**inputs, "bias": inputs["bias"].clone().requires_grad_(True)},
                   **options("causal_window"))
    assert type(trained.grad_fn).__name__ == "_BlockedAttentionBackward"
    assert torch.equal(trained.detach(), out)


def test_compiled_backward_has_it_all():
    """Every backward after the fused forward is the C++ one, whose dbias comes from the pass that holds the
    score gradients; as in the model (M folded into the projections), q, k and v come as head views of
    (B, T, H, h) projections, so the output of the fused forward is such a view too."""

    def heads_of_projections(q, k, v, *args, **options):
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
        return blocked(q, k, v, *args, **options)

    assert attention_cpu.COMPILED_BACKWARD  # the extension is built (test_orthogonal.py says why if not)
    inputs = {**make_inputs(B=2, Tq=40, Tk=300, n=5, pad=True), "M": None}
    do = torch.randn(inputs["q"].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _, want = grads(reference.echo_attention, inputs, torch.float64, do, device="cpu", q_offset=7,
                    window=(30, 90))
    compiled = mock.patch.object(attention_cpu, "_compiled_backward", wraps=attention_cpu._compiled_backward)
    blocks = mock.patch.object(attention_cpu, "blocks", wraps=attention_cpu.blocks)
    with compiled as compiled_spy, blocks as blocks_spy:
        _, got = grads(heads_of_projections, inputs, torch.float64, do, device="cpu", q_offset=7,
                       window=(30, 90))
    assert compiled_spy.call_count == 1
    assert blocks_spy.call_count == 1  # the forward's: the band cuts keys
    for name, g in want.items():
        assert rel_err(got[name], g) < 1e-11, (name, rel_err(got[name], g))


def test_missing_compiled_backward_is_said_once(monkeypatch):
    monkeypatch.setattr(attention_cpu, "COMPILED_BACKWARD", False)
    monkeypatch.setattr(backend, "_warned", set())
    inputs = make_inputs(B=1, Tq=20, n=4)
    do = torch.randn(inputs["q"].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _, want = grads(reference.echo_attention, inputs, torch.float64, do, device="cpu")
    with pytest.warns(UserWarning, match="biased_attention_backward") as said:
        _, got = grads(blocked, inputs, torch.float64, do, device="cpu")
        grads(blocked, inputs, torch.float64, do, device="cpu")
    assert len([w for w in said if "biased_attention_backward" in str(w.message)]) == 1
    for name, g in want.items():
        assert rel_err(got[name], g) < 1e-11, name


def test_fused_rows_without_keys_give_zeros():
    inputs = make_inputs(B=2, Tq=24, Tk=30)
    inputs["key_padding_mask"] = torch.zeros(2, 30, dtype=torch.bool)
    inputs["key_padding_mask"][1] = True  # the second batch has no key at all
    with torch.no_grad():
        out = call(blocked, cast(inputs, torch.float32, "cpu"), window=(3, 2), k_offset=10)
    want = call(reference.echo_attention, inputs, window=(3, 2), k_offset=10)
    assert torch.isfinite(out).all() and (out[1] == 0).all() and (out[0, :, :8] == 0).all()
    assert rel_err(out, want) < 1e-5


@pytest.mark.parametrize("where", ["k", "v"])
def test_fused_non_finite_past_the_band_stays_out(where):
    """An additive -inf mask would turn a NaN at a causal-future key into a NaN row; such inputs are
    computed by the blocked path, which leaves masked keys out exactly, as the reference does."""
    inputs = case_inputs("causal")
    inputs[where] = inputs[where].clone()
    inputs[where][0, 0, -1] = float("nan")  # the last key: only the last query sees it
    want = call(reference.echo_attention, inputs, **options("causal"))
    with torch.no_grad():
        got = call(blocked, inputs, **options("causal"))
    assert torch.isnan(got[0, 0, -1]).all() and torch.isfinite(got[0, 0, :-1]).all()
    assert rel_err(got[0, 0, :-1], want[0, 0, :-1]) < 1e-12
    q = inputs["q"].clone().requires_grad_(True)
    trained = call(blocked, {**inputs, "q": q}, **options("causal"))  # the blocked forward, no logsumexp
    assert torch.equal(trained.detach()[0, 0, :-1], got[0, 0, :-1])


def test_non_finite_value_past_the_band_keeps_gradients_finite(backward):
    inputs = case_inputs("causal")
    inputs["v"] = inputs["v"].clone()
    inputs["v"][0, 0, -1] = float("nan")
    q = inputs["q"].clone().requires_grad_(True)
    out = call(blocked, {**inputs, "q": q}, **options("causal"))
    out[0, 0, :-1].sum().backward()
    assert torch.isfinite(q.grad[0, 0, :-1]).all()  # the last query sees the NaN: its gradient is NaN


@pytest.mark.parametrize("layout", ["half_split", "interleaved"])
@pytest.mark.parametrize("rotation", ROTATIONS)
@pytest.mark.parametrize("case", ["decode_window", "cross_window_offsets"])
def test_keys_given_rotated(case, rotation, layout):
    """keys_rotated: k given as k' and only q rotated. The reference gives the output of the raw keys,
    the same gradients of q, v and the bias, and a dk' that the keys' rotation takes back to dk; the CPU
    path gives the reference's output and every gradient (float64)."""
    inputs = case_inputs(case, rotation, B=2)
    opts = options(case, layout, rotation)
    do = torch.randn(inputs["q"].shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out_raw, want_raw = grads(reference.echo_attention, inputs, torch.float64, do, **opts)
    rotated = with_keys_rotated(inputs, opts)
    out_ref, want = grads(reference.echo_attention, rotated, torch.float64, do, keys_rotated=True, **opts)
    assert rel_err(out_ref, out_raw) < 1e-12
    for name in ("q", "v", "bias"):
        assert rel_err(want[name], want_raw[name]) < 1e-10, name
    k = inputs["k"].clone().requires_grad_(True)
    (dk,) = torch.autograd.grad(with_keys_rotated(dict(inputs, k=k), opts)["k"], k, want["k"])
    assert rel_err(dk, want_raw["k"]) < 1e-10
    out, got = grads(blocked, rotated, torch.float64, do, keys_rotated=True, **opts)
    assert rel_err(out, out_ref) < 1e-12
    assert got.keys() == want.keys()
    for name, g in got.items():
        assert rel_err(g, want[name]) < 1e-10, name


@pytest.mark.parametrize("rotation", ["m_then_rope", "rope_then_m"])
@pytest.mark.parametrize("case", ["global_ragged_pad", "decode_window", "cross_window_offsets"])
def test_keys_rotated_beforehand(case, rotation):
    """w=None: q and k come rotated (RoPE at their positions, then M in the "rope_then_m" order) and
    the op does no RoPE, with or without gradients."""
    inputs = case_inputs(case)
    opts = options(case, "interleaved", rotation)
    want = call(reference.echo_attention, inputs, **opts)
    Tq, Tk = inputs["q"].shape[2], inputs["k"].shape[2]
    phi_q = reference.rope_angles(inputs["w"], inputs["s"],
                                  torch.arange(opts["q_offset"], opts["q_offset"] + Tq))
    phi_k = reference.rope_angles(inputs["w"], inputs["s"],
                                  torch.arange(opts["k_offset"], opts["k_offset"] + Tk))
    M = inputs["M"]
    if rotation == "m_then_rope":  # the op applies M to what it is given, before no RoPE: fold it here
        q, k = (reference.apply_rope(inputs["q"] @ M, phi_q, "interleaved"),
                reference.apply_rope(inputs["k"] @ M, phi_k, "interleaved"))
        M = None
    else:
        q, k = (reference.apply_rope(inputs["q"], phi_q, "interleaved"),
                reference.apply_rope(inputs["k"], phi_k, "interleaved"))
    rotated = {**inputs, "q": q, "k": k, "M": M, "w": None}
    for fn in (reference.echo_attention, blocked):
        assert rel_err(call(fn, rotated, **opts), want) < 1e-12, fn
    with torch.no_grad():
        assert rel_err(call(blocked, rotated, **opts), want) < 1e-12
