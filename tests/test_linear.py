"""echo.linear: oneDNN's inner product on float32 CPU tensors against the float64 product, values and
every gradient, on generated shapes; which calls take it; the model's layers and logits run it."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st
from numerics import rel_err
from property_strategies import property_settings

from echo import Echo
from echo import linear as echo_linear
from echo.config import small_config
from echo.linear import Linear, linear, tied_logits, uses_inner_product

FLOAT32_TOL = 1e-5


@property_settings(max_examples=40)
@given(rows=st.sampled_from([(1,), (1, 1), (3, 1), (2, 7), (4, 33)]), d=st.sampled_from([1024, 1040]),
       out=st.integers(1024, 1100), with_bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_inner_product_matches_the_float64_product(rows, d, out, with_bias, seed):
    """Weights of at least MIN_WEIGHT_ELEMENTS take the inner product at any row count."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*rows, d, generator=g, requires_grad=True)
    weight = torch.randn(out, d, generator=g, requires_grad=True)
    bias = torch.randn(out, generator=g, requires_grad=True) if with_bias else None
    grad = torch.randn(*rows, out, generator=g)
    assert uses_inner_product(x, weight) == torch.backends.mkldnn.is_available()
    y = linear(x, weight, bias)
    y.backward(grad)
    x64, w64 = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_() if with_bias else None
    want = torch.nn.functional.linear(x64, w64, b64)
    want.backward(grad.double())
    assert y.dtype == torch.float32 and y.shape == want.shape
    assert rel_err(y, want) < FLOAT32_TOL
    assert rel_err(x.grad, x64.grad) < FLOAT32_TOL
    assert rel_err(weight.grad, w64.grad) < FLOAT32_TOL
    assert bias is None or rel_err(bias.grad, b64.grad) < FLOAT32_TOL


def test_which_calls_take_the_inner_product(monkeypatch):
    """Many rows or a large weight do; a few rows against a small weight, other dtypes and the
    reference backend keep F.linear, with the same result."""
    fast = torch.backends.mkldnn.is_available()
    small, large = torch.randn(16, 384), torch.randn(1024, 1024)
    assert uses_inner_product(torch.randn(1, 384), small) is False
    assert uses_inner_product(torch.randn(echo_linear.MIN_ROWS, 384), small) == fast
    assert uses_inner_product(torch.randn(1, 1024), large) == fast
    x = torch.randn(2, 3, 16)
    assert not uses_inner_product(x.double(), small.double())
    assert torch.equal(linear(x.double(), small[:, :16].double()), x.double() @ small[:, :16].double().T)
    monkeypatch.setenv("ECHO_BACKEND", "reference")
    assert not uses_inner_product(torch.randn(1, 1024), large)
    assert torch.equal(tied_logits(x, small[:, :16]), x @ small[:, :16].T)


def test_model_layers_and_logits_run_the_inner_product(monkeypatch):
    """Every projection and MLP Linear and the tied logits go through echo.linear.linear (here at any
    size), and the parameters behind them still learn."""
    monkeypatch.setattr(echo_linear, "MIN_ROWS", 1)
    torch.manual_seed(0)
    model = Echo(small_config())
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, Linear) for m in linears)
    taken = []
    real = echo_linear._InnerProduct.apply
    monkeypatch.setattr(echo_linear._InnerProduct, "apply", lambda *a: taken.append(a[1].shape) or real(*a))
    mel = torch.randn(1, model.config.n_mels, 2 * model.config.n_audio_ctx)
    out = model(input_features=mel, labels=torch.tensor([[3, 5, 7]]))
    out.loss.backward()
    fast = torch.backends.mkldnn.is_available()
    assert (model.decoder.token_embedding.weight.shape in taken) == fast
    assert all((m.weight.shape in taken) == fast for m in linears)
    assert model.decoder.token_embedding.weight.grad.abs().sum() > 0
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in linears)
