"""Bad arguments to the public ops are ValueErrors that name the problem, raised before any maths."""

import pytest
import torch

import echo_kernels as ek


def attention_args(B=1, H=2, T=5, h=4):
    q = torch.randn(B, H, T, h)
    return dict(q=q, k=q.clone(), v=q.clone(), M=torch.eye(h), w=torch.ones(h // 2), s=1.0, bias=torch.zeros(3, H))


def call_attention(**overrides):
    args = attention_args()
    kwargs = {k: overrides.pop(k) for k in list(overrides) if k not in args}
    args.update(overrides)
    return ek.echo_attention(args["q"], args["k"], args["v"], args["M"], args["w"], args["s"], args["bias"], **kwargs)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(q=torch.randn(2, 5, 4)), "q must have shape"),
        (dict(k=torch.randn(1, 3, 5, 4)), "k must have shape"),
        (dict(v=torch.randn(1, 2, 6, 4)), "v must have shape"),
        (dict(q=torch.randn(1, 2, 5, 4).double()), "share a dtype"),
        (dict(q=torch.ones(1, 2, 5, 4, dtype=torch.int64)), "floating-point"),
        (dict(M=torch.eye(5)), "M must have shape"),
        (dict(w=torch.ones(3)), "w must have shape"),
        (dict(bias=torch.zeros(4, 2)), "bias must have shape"),
        (dict(bias=torch.zeros(3, 3)), "bias must have shape"),
        (dict(s=torch.ones(2)), "s must be a scalar"),
        (dict(window=-1), "window"),
        (dict(window=(2, -1)), "window right"),
        (dict(window=2.5), "window"),
        (dict(q_offset=-3), "q_offset"),
        (dict(key_padding_mask=torch.zeros(1, 5)), "bool"),
        (dict(key_padding_mask=torch.zeros(1, 4, dtype=torch.bool)), "key_padding_mask must have shape"),
        (dict(layout="zigzag"), "layout"),
        (dict(rotation="m_only"), "rotation must be one of"),
        (dict(causal=1), "causal must be a bool"),
        (dict(keys_rotated="yes"), "keys_rotated must be a bool"),
        (dict(M=torch.eye(4)[None]), "M must have shape"),
        (dict(M=torch.eye(4, device="meta")), "one device"),
    ],
)
def test_echo_attention_rejects(overrides, message):
    with pytest.raises(ValueError, match=message):
        call_attention(**overrides)


@pytest.mark.parametrize(
    "args,message",
    [
        ((torch.randn(2, 5, 4), torch.eye(4), torch.ones(2)), "x must have shape"),
        ((torch.randn(1, 5, 2, 3), torch.eye(3), torch.ones(1)), "h even"),
        ((torch.randn(1, 5, 2, 4), torch.eye(6), torch.ones(2)), "M must have shape"),
        ((torch.randn(1, 5, 2, 4), torch.eye(4), torch.ones(4)), "w must have shape"),
        ((torch.randn(1, 5, 2, 4), torch.eye(4, dtype=torch.int32), torch.ones(2)), "M must be a floating"),
    ],
)
def test_rotary_orthogonal_rejects(args, message):
    with pytest.raises(ValueError, match=message):
        ek.rotary_orthogonal(*args)


def test_rotary_orthogonal_rejects_offset_and_layout():
    x, M, w = torch.randn(1, 3, 2, 4), torch.eye(4), torch.ones(2)
    with pytest.raises(ValueError, match="offset"):
        ek.rotary_orthogonal(x, M, w, 1.0, -1)
    with pytest.raises(ValueError, match="layout"):
        ek.rotary_orthogonal(x, M, w, 1.0, 0, "half")


@pytest.mark.parametrize(
    "pairs,message",
    [
        (torch.tensor([[0, 1], [2, 2]]), r"pairs\[1\] = \(2, 2\)"),
        (torch.tensor([[0, 1], [2, 4]]), "pairs must index rows 0..3"),
        (torch.tensor([[0, -1], [2, 3]]), "pairs must index rows 0..3"),
        (torch.tensor([[0, 1]]), "pairs must have shape"),
        (torch.tensor([[0.0, 1.0], [2.0, 3.0]]), "int64"),
    ],
)
def test_orthogonal_product_rejects_bad_pairs(pairs, message):
    with pytest.raises(ValueError, match=message):
        ek.orthogonal_product(torch.zeros(2), pairs, torch.eye(4))


def test_orthogonal_product_rejects_shapes_and_dtypes():
    pairs = torch.tensor([[0, 1]])
    with pytest.raises(ValueError, match="R must have shape"):
        ek.orthogonal_product(torch.zeros(1), pairs, torch.ones(4, 3))
    with pytest.raises(ValueError, match="do not broadcast"):
        ek.orthogonal_product(torch.zeros(3, 1), pairs, torch.ones(2, 4, 4))
    with pytest.raises(ValueError, match="thetas must be a floating"):
        ek.orthogonal_product(torch.zeros(1, dtype=torch.int64), pairs, torch.eye(4))
