"""KernelOp, the template every op is registered with: its three ways in agree, its gradients are
summed over broadcast dims and cast, and a second output is not differentiable. A small op of its own
(y = x * a + b, with a broadcast and b optional, and a row sum as its second output) exercises it on
the CPU, without Triton."""

from __future__ import annotations

import contextlib
from typing import Optional

import pytest
import torch
from torch import Tensor

from echo_kernels.kernel_op import KernelOp

launches = []


def _forward(x: Tensor, a: Tensor, b: Optional[Tensor], scale: float) -> tuple[Tensor, Tensor]:
    launches.append("forward")
    y = x * a * scale + (b if b is not None else 0.0)
    return y, y.sum(-1)


def _forward_fake(x, a, b, scale):
    return torch.empty_like(x), x.new_empty(x.shape[:-1])


def _backward(dy: Tensor, x: Tensor, a: Tensor, b: Optional[Tensor], scale: float, y: Tensor, total: Tensor
              ) -> tuple[Tensor, Tensor, Tensor]:
    launches.append("backward")
    # da and db left at x's full shape, and in float64: the template sums and casts them
    db = dy.double() if b is not None else dy.new_empty((0,))
    return dy * a * scale, (dy * x * scale).double(), db


def _backward_fake(dy, x, a, b, scale, y, total):
    db = dy.new_empty(dy.shape, dtype=torch.float64) if b is not None else dy.new_empty((0,))
    return torch.empty_like(x), x.new_empty(x.shape, dtype=torch.float64), db


OP = KernelOp("kernel_op_example", _forward, _backward, forward_fake=_forward_fake,
              backward_fake=_backward_fake, differentiable=("x", "a", "b"), save_outputs=True)


def inputs(with_b: bool):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g, requires_grad=True)
    a = torch.randn(5, generator=g, requires_grad=True)  # broadcast over x's rows
    b = torch.randn(3, 5, generator=g, dtype=torch.float32, requires_grad=True) if with_b else None
    return x, a, b


@pytest.mark.parametrize("with_b", [True, False])
def test_eager_gradients_match_autograd(with_b):
    x, a, b = inputs(with_b)
    y, total = OP(x, a, b, 0.5)
    assert type(y.grad_fn).__name__ == "_EagerKernelOpBackward"
    assert not total.requires_grad  # the second output is not differentiable
    leaves = [t for t in (x, a, b) if t is not None]
    got = torch.autograd.grad(y.square().sum(), leaves)
    expected_y = x * a * 0.5 + (b if b is not None else 0.0)
    expected = torch.autograd.grad(expected_y.square().sum(), leaves)
    for g, e, leaf in zip(got, expected, leaves):
        assert g.shape == leaf.shape and g.dtype == leaf.dtype
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


def test_no_gradient_wanted_runs_the_launcher_alone():
    x, a, b = (t.detach() for t in inputs(True))
    launches.clear()
    y, _ = OP(x, a, b, 2.0)
    assert y.grad_fn is None and launches == ["forward"]
    torch.testing.assert_close(y, x * a * 2.0 + b)


def test_only_needed_gradients_are_returned():
    x, a, b = inputs(True)
    x.requires_grad_(False)
    y, _ = OP(x, a, b, 1.0)
    da, db = torch.autograd.grad(y.sum(), (a, b))
    torch.testing.assert_close(da, x.sum(0))
    torch.testing.assert_close(db, torch.ones_like(b))


@pytest.mark.parametrize("with_b", [True, False])
def test_opcheck(with_b):
    args = (*inputs(with_b), 0.5)
    torch.library.opcheck(torch.ops.echo_kernels.kernel_op_example.default, args)


def test_compiled_matches_eager():
    x, a, b = inputs(True)
    compiled = torch.compile(lambda x, a, b: OP(x, a, b, 0.5)[0].square().sum(), fullgraph=True)
    got = torch.autograd.grad(compiled(x, a, b), (x, a, b))
    expected = torch.autograd.grad(OP(x, a, b, 0.5)[0].square().sum(), (x, a, b))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def test_unknown_differentiable_name_is_refused():
    with pytest.raises(ValueError, match=r"\['c'\] are not inputs"):
        KernelOp("kernel_op_refused", _forward, _backward, forward_fake=_forward_fake,
                 backward_fake=_backward_fake, differentiable=("x", "c"))


def test_launchers_run_on_their_tensors_cuda_device(monkeypatch):
    """Both launchers enter the CUDA device of their first tensor, around the launch and only then (Triton
    launches on the current device): fake tensors of cuda:1 stand in for a second GPU's."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    @contextlib.contextmanager
    def device(d):
        launches.append(f"enter {d}")
        yield
        launches.append("exit")

    monkeypatch.setattr(torch.cuda, "device", device)
    launches.clear()
    with FakeTensorMode():
        x, a = torch.randn(3, 5, device="cuda:1"), torch.randn(5, device="cuda:1")
        y, total = OP.forward(x, a, None, 0.5)
        OP.backward(torch.ones_like(y), x, a, None, 0.5, y, total)
    assert launches == ["enter cuda:1", "forward", "exit", "enter cuda:1", "backward", "exit"]
    launches.clear()
    OP.forward(*inputs(with_b=False), 0.5)  # CPU tensors: no device entered
    assert launches == ["forward"]
