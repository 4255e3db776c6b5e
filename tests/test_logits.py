"""echo.logits.tied_logits, the decoder's output projection: oneDNN's inner product on float32 CPU
tensors against the float64 product, values and both gradients, on generated shapes."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from echo import Echo
from echo.config import small_config
from echo.logits import tied_logits, uses_inner_product

from numerics import rel_err
from property_strategies import property_settings

FLOAT32_TOL = 1e-5


@property_settings(max_examples=40)
@given(rows=st.sampled_from([(1,), (1, 1), (3, 1), (2, 7), (4, 33)]), d=st.sampled_from([8, 64, 72]),
       vocab=st.integers(1, 700), seed=st.integers(0, 2**31 - 1))
def test_inner_product_matches_the_float64_product(rows, d, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*rows, d, generator=g, requires_grad=True)
    embedding = torch.randn(vocab, d, generator=g, requires_grad=True)
    grad = torch.randn(*rows, vocab, generator=g)
    assert uses_inner_product(x, embedding) == torch.backends.mkldnn.is_available()
    logits = tied_logits(x, embedding)
    logits.backward(grad)
    x64, e64 = x.detach().double().requires_grad_(), embedding.detach().double().requires_grad_()
    want = x64 @ e64.T
    want.backward(grad.double())
    assert logits.dtype == torch.float32 and logits.shape == want.shape
    assert rel_err(logits, want) < FLOAT32_TOL
    assert rel_err(x.grad, x64.grad) < FLOAT32_TOL
    assert rel_err(embedding.grad, e64.grad) < FLOAT32_TOL


def test_reference_backend_and_other_dtypes_take_the_plain_product(monkeypatch):
    x, embedding = torch.randn(2, 3, 16), torch.randn(50, 16)
    monkeypatch.setenv("ECHO_BACKEND", "reference")
    assert not uses_inner_product(x, embedding)
    assert torch.equal(tied_logits(x, embedding), x @ embedding.T)
    monkeypatch.setenv("ECHO_BACKEND", "auto")
    assert not uses_inner_product(x.double(), embedding.double())
    assert torch.equal(tied_logits(x.double(), embedding), (x.double() @ embedding.double().T).float())


def test_decoder_logits_run_the_inner_product(monkeypatch):
    """The model's logits come from tied_logits, and the embedding still learns through them."""
    torch.manual_seed(0)
    model = Echo(small_config())
    calls = []
    monkeypatch.setattr("echo.model.tied_logits", lambda x, e: calls.append(uses_inner_product(x, e)) or tied_logits(x, e))
    mel = torch.randn(1, model.config.n_mels, 2 * model.config.n_audio_ctx)
    out = model(input_features=mel, labels=torch.tensor([[3, 5, 7]]))
    out.loss.backward()
    assert calls == [torch.backends.mkldnn.is_available()]
    assert model.decoder.token_embedding.weight.grad.abs().sum() > 0
