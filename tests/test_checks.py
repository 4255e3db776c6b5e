"""Bad arguments to the public ops are ValueErrors that name the problem, raised before any maths."""

import pytest
import torch

import echo_kernels as ek
from echo_kernels import checks


def attention_args(B=1, H=2, T=5, h=4):
    q = torch.randn(B, H, T, h)
    return dict(q=q, k=q.clone(), v=q.clone(), M=torch.eye(h), w=torch.ones(h // 2), s=1.0,
                bias=torch.zeros(3, H))


def call_attention(**overrides):
    args = attention_args()
    kwargs = {k: overrides.pop(k) for k in list(overrides) if k not in args}
    args.update(overrides)
    return ek.echo_attention(args["q"], args["k"], args["v"], args["M"], args["w"], args["s"], args["bias"],
                             **kwargs)


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


# --------------------------------------------------------------------------------------------------
# Sizes past the Triton kernels' int32 offsets: refused before anything is allocated or launched

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the Triton kernels serve (CPU: interpreted)


@pytest.fixture
def small_offsets(monkeypatch):
    """The Triton backend, with the offsets' reach cut from 2**31 to 4096 elements, so that small tensors
    cross it."""
    monkeypatch.setenv("ECHO_BACKEND", "triton")
    monkeypatch.setattr(checks, "INT32_OFFSETS", 4096)


def test_span_counts_the_elements_a_tensors_strides_reach():
    x = torch.randn(4, 6, 8)
    assert checks.span(x) == x.numel() == checks.span(x.transpose(0, 2))
    assert checks.span(x[:, ::2, 1:3]) == 1 + 3 * 48 + 2 * 16 + 1  # shape (4, 3, 2), strides (48, 16, 1)
    assert checks.span(torch.randn(1, 8).expand(5, 8)) == 8
    assert checks.span(x[:, :0]) == 0


def test_int32_offsets_names_the_first_operand_past_them():
    checks.int32_offsets({"a": 2**31 - 1, "b": None, "c": torch.randn(3)})
    with pytest.raises(ValueError, match=r"b spans 2,147,483,648 elements.*split the batch"):
        checks.int32_offsets({"a": 5, "b": 2**31, "c": 2**40})


def test_echo_attention_refuses_launches_past_int32_offsets(small_offsets):
    q = torch.randn(1, 2, 40, 32, device=DEVICE)  # 2,560 elements
    w = torch.ones(16, device=DEVICE)
    assert ek.echo_attention(q, q, q, None, w, 1.0, None).shape == q.shape
    strided = torch.randn(1, 2, 40, 128, device=DEVICE)[..., ::4]  # 2,560 elements spanning 10,237
    with pytest.raises(ValueError, match="k spans 10,237 elements"):
        ek.echo_attention(q, strided, q, None, w, 1.0, None)
    longer = torch.randn(1, 1, 1, 32, device=DEVICE).expand(1, 2, 80, 32)  # 5,120 elements spanning 32
    with pytest.raises(ValueError, match=r"the \(B, H, T, h\) rows the launch writes spans 5,120"):
        ek.echo_attention(q, longer, longer, None, w, 1.0, None)


def test_echo_attention_refuses_broadcast_inputs_past_int32_offsets(monkeypatch):
    """At the real reach: q, k and v broadcast from one row span 32 elements, but the rows the launch
    would write number 2**32."""
    monkeypatch.setenv("ECHO_BACKEND", "triton")
    q = torch.randn(1, 1, 1, 32, device=DEVICE).expand(2**10, 16, 2**13, 32)
    with pytest.raises(ValueError, match="rows the launch writes spans 4,294,967,296 elements"):
        ek.echo_attention(q, q, q, None, torch.ones(16, device=DEVICE), 1.0, None)


def test_plain_attention_and_rotary_orthogonal_refuse_past_int32_offsets(small_offsets):
    q = torch.randn(1, 2, 80, 32, device=DEVICE)
    with pytest.raises(ValueError, match="q spans 5,120 elements"):
        ek.plain_attention(q, q[:, :, :40], q[:, :, :40])
    x = torch.randn(1, 80, 2, 32, device=DEVICE)
    M, w = torch.eye(32, device=DEVICE), torch.ones(16, device=DEVICE)
    with pytest.raises(ValueError, match="x spans 5,120 elements"):
        ek.rotary_orthogonal(x, M, w)
    with pytest.raises(ValueError, match="y spans 5,120 elements"):
        ek.rotary_orthogonal(torch.randn(1, 1, 1, 32, device=DEVICE).expand(1, 80, 2, 32), M, w)


def test_rotary_orthogonal_backward_refuses_a_gradient_past_int32_offsets(small_offsets):
    x = torch.randn(1, 40, 2, 32, device=DEVICE, requires_grad=True)
    y = ek.rotary_orthogonal(x, torch.eye(32, device=DEVICE), torch.ones(16, device=DEVICE))
    dy = torch.randn(1, 40, 2, 128, device=DEVICE)[..., ::4]  # 2,560 elements spanning 10,237
    with pytest.raises(ValueError, match="dy spans 10,237 elements"):
        y.backward(dy)


def test_echo_attention_backward_refuses_a_gradient_past_int32_offsets(small_offsets):
    q = torch.randn(1, 2, 40, 32, device=DEVICE, requires_grad=True)
    out = ek.echo_attention(q, q, q, None, torch.ones(16, device=DEVICE), 1.0, None)
    dout = torch.randn(1, 2, 40, 128, device=DEVICE)[..., ::4]  # 2,560 elements spanning 10,237
    with pytest.raises(ValueError, match="the output's gradient spans 10,237 elements"):
        out.backward(dout)


def test_the_dbias_scratch_is_refused_past_int32_offsets():
    from echo_kernels.kernels import attention_backward

    with pytest.raises(ValueError, match="dbias scratch"):
        attention_backward._diagonal_scratch(2**16, 128, 256, True, DEVICE)  # 2**31 elements, never allocated
