"""plain_attention: the plain flash kernels (the floor echo_attention is measured against) against
float64 softmax attention, values and gradients, on ragged and tile-aligned sizes."""

from __future__ import annotations

import pytest
import torch

import echo_kernels
from echo_kernels.kernels import attention_common

from numerics import rel_err

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


@pytest.fixture
def use_triton(monkeypatch):
    monkeypatch.setenv("ECHO_BACKEND", "triton")
    if not ON_GPU:  # small tiles, so that a few dozen rows span full tiles and a ragged last one
        monkeypatch.setattr(attention_common, "BLOCK_OVERRIDE", {"BLOCK_M": 16, "BLOCK_N": 16})


def _softmax_attention(q, k, v):
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    return torch.softmax(scores, -1) @ v


@pytest.mark.parametrize("Tq, Tk", [(32, 48), (21, 37), (1, 5), (40, 16)])
@pytest.mark.parametrize("h", [32, 64])
def test_plain_attention_matches_float64(use_triton, Tq, Tk, h):
    gen = torch.Generator().manual_seed(Tq * 100 + Tk + h)
    q, k, v = (torch.randn(2, 3, T, h, generator=gen, dtype=torch.float64) for T in (Tq, Tk, Tk))
    do = torch.randn(2, 3, Tq, h, generator=gen, dtype=torch.float64)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    want_out = _softmax_attention(*leaves)
    want_out.backward(do)
    got_leaves = [x.float().to(DEVICE).requires_grad_() for x in (q, k, v)]
    got_out = echo_kernels.plain_attention(*got_leaves)
    got_out.backward(do.float().to(DEVICE))
    assert got_out.dtype == torch.float32
    assert rel_err(got_out, want_out) < 1e-5
    for name, got, leaf in zip("qkv", got_leaves, leaves):
        assert rel_err(got.grad, leaf.grad) < 1e-5, name


def test_plain_attention_without_kernels_is_torch_attention(monkeypatch):
    monkeypatch.setenv("ECHO_BACKEND", "reference")
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 9, 32, generator=gen, dtype=torch.float64) for _ in range(3))
    assert rel_err(echo_kernels.plain_attention(q, k, v), _softmax_attention(q, k, v)) < 1e-12


@pytest.mark.parametrize("shapes, message", [
    (((1, 2, 4, 32), (1, 2, 0, 32), (1, 2, 0, 32)), "at least one key"),
    (((1, 2, 4, 48), (1, 2, 4, 48), (1, 2, 4, 48)), "head width"),
    (((1, 2, 4, 32), (1, 3, 4, 32), (1, 3, 4, 32)), "k must have shape"),
    (((2, 4, 32), (2, 4, 32), (2, 4, 32)), "q must have shape"),
])
def test_plain_attention_refuses_bad_shapes(shapes, message):
    q, k, v = (torch.randn(s) for s in shapes)
    with pytest.raises(ValueError, match=message):
        echo_kernels.plain_attention(q, k, v)


def test_plain_attention_compiles_fullgraph(use_triton):
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 20, 32, generator=gen).to(DEVICE).requires_grad_() for _ in range(3))
    torch._dynamo.reset()
    compiled = torch.compile(echo_kernels.plain_attention, fullgraph=True, dynamic=False)
    out = compiled(q, k, v)
    out.square().sum().backward()
    grads = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    eager = echo_kernels.plain_attention(q, k, v)
    eager.square().sum().backward()
    assert torch.allclose(out, eager, atol=1e-6)
    for got, x in zip(grads, (q, k, v)):
        assert torch.allclose(got, x.grad, atol=1e-5)


@pytest.mark.gpu
def test_plain_attention_bf16_at_the_encoder_shape_gpu(use_triton):
    """bf16 at T = 1500 (a ragged last tile of 1500 = 23 x 64 + 28 keys), h = 64: values and gradients
    within bf16 rounding of float64 attention."""
    gen = torch.Generator().manual_seed(7)
    q, k, v, do = (torch.randn(1, 2, 1500, 64, generator=gen, dtype=torch.float64) for _ in range(4))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    want = _softmax_attention(*leaves)
    want.backward(do)
    got_leaves = [x.to(DEVICE, torch.bfloat16).requires_grad_() for x in (q, k, v)]
    got = echo_kernels.plain_attention(*got_leaves)
    got.backward(do.to(DEVICE, torch.bfloat16))
    assert rel_err(got, want) < 2e-2
    for name, g, leaf in zip("qkv", got_leaves, leaves):
        assert rel_err(g.grad, leaf.grad) < 3e-2, name
