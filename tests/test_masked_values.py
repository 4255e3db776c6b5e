"""Keys no query may see contribute nothing, not even 0 * NaN.

A padded key (or a key past the band for a query) gets probability 0, but 0 * NaN is NaN: a
non-finite value there would reach every query through the product with the values. Here such keys
hold NaN and inf, and the outputs and gradients must be those of the same inputs with finite values
there. On the Triton kernels padded keys are not read at all (their k and v load as zeros); see
echo_kernels.attention for the band inside one key tile.
"""

from __future__ import annotations

import math

import pytest
import torch

import echo_kernels
from echo_kernels import reference
from echo_kernels.kernels import attention_common

from attention_cases import GRAD_NAMES, call, grads, make_inputs

NON_FINITE = (math.nan, math.inf, -math.inf)
CPU_PATHS = ("reference", "auto")  # the float64 reference, and the blocked CPU path ECHO_BACKEND=auto takes


def poisoned(inputs, keys, names=("v",)):
    """inputs with the rows `keys` (B, Tk) bool of each tensor in `names` set to NaN, inf and -inf in turn."""
    out = dict(inputs)
    for name in names:
        t = inputs[name].clone()
        rows = t[keys.unsqueeze(1).expand(t.shape[:3])]
        fill = torch.tensor(NON_FINITE, dtype=t.dtype).repeat(rows.numel() // len(NON_FINITE) + 1)
        t[keys.unsqueeze(1).expand(t.shape[:3])] = fill[:rows.numel()].view(rows.shape)
        out[name] = t
    return out


def padded_inputs(seed=0):
    inputs = make_inputs(B=2, H=2, Tq=29, Tk=34, h=16, n=4, pad=True, seed=seed)
    assert inputs["key_padding_mask"].any() and not inputs["key_padding_mask"].all(-1).any()
    return inputs


@pytest.mark.parametrize("backend", CPU_PATHS)
@pytest.mark.parametrize("rotation", ["m_then_rope", "rope_then_m"])
def test_non_finite_values_of_padded_keys_change_nothing(monkeypatch, backend, rotation):
    monkeypatch.setenv("ECHO_BACKEND", backend)
    clean = padded_inputs()
    dirty = poisoned(clean, clean["key_padding_mask"])
    assert not torch.isfinite(dirty["v"]).all()
    options = dict(window=(7, 5), rotation=rotation)
    do = torch.randn(2, 2, 29, 16, dtype=torch.float64)
    want, want_grads = grads(echo_kernels.echo_attention, clean, torch.float64, do, device="cpu", **options)
    got, got_grads = grads(echo_kernels.echo_attention, dirty, torch.float64, do, device="cpu", **options)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for name in GRAD_NAMES:
        expected = want_grads[name]
        if name == "v":  # a padded key's value gets no gradient, finite or not
            expected = expected.masked_fill(clean["key_padding_mask"][:, None, :, None], 0.0)
        torch.testing.assert_close(got_grads[name], expected, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("backend", CPU_PATHS)
@pytest.mark.parametrize("value", NON_FINITE)
def test_a_non_finite_future_value_reaches_only_the_queries_that_see_it(monkeypatch, backend, value):
    """Causal: the last key is the future of every query but the last, which alone turns non-finite."""
    monkeypatch.setenv("ECHO_BACKEND", backend)
    clean = make_inputs(B=1, H=2, Tq=40, h=16, n=4, seed=1)
    dirty = dict(clean, v=clean["v"].clone())
    dirty["v"][:, :, -1, 3] = value
    want = call(echo_kernels.echo_attention, clean, causal=True)
    got = call(echo_kernels.echo_attention, dirty, causal=True)
    torch.testing.assert_close(got[:, :, :-1], want[:, :, :-1], rtol=1e-12, atol=1e-12)
    assert not torch.isfinite(got[:, :, -1, 3]).any()
    expected_last = value if math.isinf(value) else None  # p * inf is inf; p * NaN is NaN
    if expected_last is None:
        assert torch.isnan(got[:, :, -1, 3]).all()
    else:
        assert (got[:, :, -1, 3] == expected_last).all()
    torch.testing.assert_close(got[:, :, -1, :3], want[:, :, -1, :3], rtol=1e-12, atol=1e-12)


def test_weighted_values_with_finite_values_is_the_plain_product():
    g = torch.Generator().manual_seed(3)
    probs = torch.rand(2, 5, 7, generator=g, dtype=torch.float64)
    v = torch.randn(2, 7, 4, generator=g, dtype=torch.float64)
    keep = torch.rand(5, 7, generator=g) < 0.5
    torch.testing.assert_close(reference.weighted_values(probs * keep, v, keep), (probs * keep) @ v)
    v[1, 2, 0] = math.nan
    out = reference.weighted_values(probs * keep, v, keep)
    seen = keep[:, 2]  # the queries that keep key 2 see its NaN in column 0 of batch row 1, no others
    assert torch.isnan(out[1, seen, 0]).all() and torch.isfinite(out[1, ~seen, 0]).all()
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[:, :, 1:]).all()


def test_triton_reads_no_padded_key(monkeypatch):
    """The kernels load a padded key's k and v as zeros: NaN and inf there change no output or gradient."""
    monkeypatch.setenv("ECHO_BACKEND", "triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        monkeypatch.setattr(attention_common, "BLOCK_OVERRIDE", {"BLOCK_M": 16, "BLOCK_N": 16})
    clean = padded_inputs(seed=2)
    dirty = poisoned(clean, clean["key_padding_mask"], names=("k", "v"))
    do = torch.randn(2, 2, 29, 16, dtype=torch.float64)
    options = dict(window=(7, 5), rotation="rope_then_m")
    want, want_grads = grads(echo_kernels.echo_attention, clean, torch.float32, do, device=device, **options)
    got, got_grads = grads(echo_kernels.echo_attention, dirty, torch.float32, do, device=device, **options)
    assert torch.isfinite(want).all()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    pad = clean["key_padding_mask"][:, None, :, None].to(device)
    for name in GRAD_NAMES:
        expected = want_grads[name]
        if name in ("k", "v"):  # a padded key gets no gradient, finite or not
            expected = expected.masked_fill(pad, 0.0)
        torch.testing.assert_close(got_grads[name], expected, rtol=0, atol=0, msg=name)
