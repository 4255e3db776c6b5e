"""The reference maths against float64 hand computations written the slow, obvious way."""

import math

import pytest
import torch

from echo_kernels import reference

import brute_force

f64 = torch.float64


def givens(h, i, j, theta):
    """Dense G(i, j, theta) as docs/model.md, Givens-orthogonal matrix, writes it."""
    G = torch.eye(h, dtype=f64)
    c, s = math.cos(theta), math.sin(theta)
    G[i, i], G[i, j], G[j, i], G[j, j] = c, -s, s, c
    return G


def random_pairs(h, n, generator):
    pairs = []
    while len(pairs) < n:
        i, j = torch.randint(0, h, (2,), generator=generator).tolist()
        if i != j:
            pairs.append((i, j))
    return torch.tensor(pairs, dtype=torch.int64)


# --------------------------------------------------------------------------------------------------
# orthogonal_product
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("givens_first", [True, False])
@pytest.mark.parametrize("h,n", [(4, 1), (6, 9), (8, 28)])
def test_orthogonal_product_is_the_product_of_dense_givens(givens_first, h, n):
    g = torch.Generator().manual_seed(h * 100 + n)
    thetas = torch.randn(n, dtype=f64, generator=g)
    pairs = random_pairs(h, n, g)  # overlapping pairs on purpose
    R = torch.randn(h, h, dtype=f64, generator=g)
    G = torch.eye(h, dtype=f64)
    for k in range(n):
        G = G @ givens(h, int(pairs[k, 0]), int(pairs[k, 1]), float(thetas[k]))
    expected = G @ R if givens_first else R @ G
    M = reference.orthogonal_product(thetas, pairs, R, givens_first)
    torch.testing.assert_close(M, expected, rtol=1e-12, atol=1e-12)


def test_orthogonal_product_row_convention():
    """u @ G(i, j) gives u_i cos + u_j sin and -u_i sin + u_j cos (docs/model.md, Givens)."""
    theta = 0.3
    M = reference.orthogonal_product(torch.tensor([theta], dtype=f64), torch.tensor([[1, 3]]),
                                     torch.eye(4, dtype=f64))
    u = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=f64)
    c, s = math.cos(theta), math.sin(theta)
    expected = torch.tensor([1.0, 2 * c + 4 * s, 3.0, -2 * s + 4 * c], dtype=f64)
    torch.testing.assert_close(u @ M, expected, rtol=1e-14, atol=1e-14)


def test_orthogonal_product_broadcasts_leading_dims():
    g = torch.Generator().manual_seed(0)
    thetas = torch.randn(3, 1, 5, dtype=f64, generator=g)
    R = torch.randn(2, 6, 6, dtype=f64, generator=g)
    pairs = random_pairs(6, 5, g)
    M = reference.orthogonal_product(thetas, pairs, R)
    assert M.shape == (3, 2, 6, 6)
    for a in range(3):
        for b in range(2):
            torch.testing.assert_close(M[a, b], reference.orthogonal_product(thetas[a, 0], pairs, R[b]))


def test_orthogonal_product_keeps_orthogonality():
    g = torch.Generator().manual_seed(1)
    R, _ = torch.linalg.qr(torch.randn(8, 8, dtype=f64, generator=g))
    M = reference.orthogonal_product(torch.randn(12, dtype=f64, generator=g), random_pairs(8, 12, g), R,
                                     False)
    torch.testing.assert_close(M @ M.T, torch.eye(8, dtype=f64), rtol=0, atol=1e-12)


def test_orthogonal_product_gradcheck():
    g = torch.Generator().manual_seed(2)
    thetas = torch.randn(2, 7, dtype=f64, generator=g, requires_grad=True)
    R = torch.randn(5, 5, dtype=f64, generator=g, requires_grad=True)
    pairs = random_pairs(5, 7, g)
    for givens_first in (True, False):
        assert torch.autograd.gradcheck(lambda t, r: reference.orthogonal_product(t, pairs, r, givens_first),
                                        (thetas, R))


def test_orthogonal_product_half_precision_computes_in_float32():
    g = torch.Generator().manual_seed(3)
    thetas, R = torch.randn(4, generator=g), torch.randn(6, 6, generator=g)
    pairs = random_pairs(6, 4, g)
    M = reference.orthogonal_product(thetas.to(torch.bfloat16), pairs, R.to(torch.bfloat16))
    assert M.dtype == torch.bfloat16
    expected = reference.orthogonal_product(thetas.to(torch.bfloat16).double(), pairs,
                                            R.to(torch.bfloat16).double())
    # float32 inside: only the output's rounding to bf16 is left
    assert (M.double() - expected).norm() / expected.norm() < reference.rounding_tolerance(torch.bfloat16, 1)


# --------------------------------------------------------------------------------------------------
# rotary_orthogonal
# --------------------------------------------------------------------------------------------------


def rope_by_hand(u, w, s, position, layout):
    """One vector u (h,) at one position, pair by pair."""
    h = u.shape[0]
    a, b = [], []
    for m in range(h // 2):
        phi = s * position * float(w[m])
        a.append(float(u[2 * m]) * math.cos(phi) - float(u[2 * m + 1]) * math.sin(phi))
        b.append(float(u[2 * m]) * math.sin(phi) + float(u[2 * m + 1]) * math.cos(phi))
    out = a + b if layout == "half_split" else [v for pair in zip(a, b) for v in pair]
    return torch.tensor(out, dtype=f64)


@pytest.mark.parametrize("layout", reference.LAYOUTS)
def test_rotary_orthogonal_by_hand(layout):
    g = torch.Generator().manual_seed(4)
    B, T, H, h, s, offset = 2, 5, 3, 8, 0.7, 11
    x = torch.randn(B, T, H, h, dtype=f64, generator=g)
    M = torch.randn(h, h, dtype=f64, generator=g)
    w = torch.rand(h // 2, dtype=f64, generator=g)
    y = reference.rotary_orthogonal(x, M, w, s, offset, layout)
    for b in range(B):
        for t in range(T):
            for head in range(H):
                expected = rope_by_hand(x[b, t, head] @ M, w, s, offset + t, layout)
                torch.testing.assert_close(y[b, t, head], expected, rtol=1e-12, atol=1e-12)


def test_rotary_orthogonal_frequencies_from_base():
    """At offset 0, position 0 is untouched by RoPE: y = x @ M in half_split order."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 1, 2, 6, dtype=f64, generator=g)
    M = torch.randn(6, 6, dtype=f64, generator=g)
    w = 10000.0 ** (-torch.arange(0, 6, 2, dtype=f64) / 6)
    u = x @ M
    torch.testing.assert_close(reference.rotary_orthogonal(x, M, w),
                               torch.cat([u[..., 0::2], u[..., 1::2]], -1))


def test_rotary_orthogonal_gradcheck():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, 4, 2, 6, dtype=f64, generator=g, requires_grad=True)
    M = torch.randn(6, 6, dtype=f64, generator=g, requires_grad=True)
    w = torch.rand(3, dtype=f64, generator=g, requires_grad=True)
    s = torch.tensor(1.3, dtype=f64, requires_grad=True)
    for layout in reference.LAYOUTS:
        assert torch.autograd.gradcheck(lambda *a: reference.rotary_orthogonal(*a, 2, layout), (x, M, w, s))


# --------------------------------------------------------------------------------------------------
# echo_attention
# --------------------------------------------------------------------------------------------------


ATTENTION_CASES = {
    "global": dict(),
    "causal": dict(causal=True),
    "window_int": dict(window=2),
    "window_left_right": dict(window=(3, 1)),
    "causal_window": dict(window=2, causal=True),
    "cross_offsets": dict(Tk=9, q_offset=4, k_offset=2),
    "decode_one_query": dict(Tq=1, Tk=8, q_offset=7, causal=True),
    "padding": dict(padding=True),
    "padding_window_empty_rows": dict(padding=True, window=(0, 0)),
    "interleaved": dict(layout="interleaved"),
    "n1_bias": dict(n=1),
    "n_beyond_T": dict(n=20),
    "no_bias": dict(n=None),
}


@pytest.mark.parametrize("rotation", ["m_then_rope", "rope_then_m", "no_m"])
@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_echo_attention_by_hand(case, rotation):
    opts = dict(Tq=7, Tk=7, n=3, window=None, causal=False, q_offset=0, k_offset=0, padding=False,
                layout="half_split")
    opts.update(ATTENTION_CASES[case])
    g = torch.Generator().manual_seed(7)
    B, H, h = 2, 2, 6
    q = torch.randn(B, H, opts["Tq"], h, dtype=f64, generator=g)
    k = torch.randn(B, H, opts["Tk"], h, dtype=f64, generator=g)
    v = torch.randn(B, H, opts["Tk"], h, dtype=f64, generator=g)
    M = torch.randn(h, h, dtype=f64, generator=g) if rotation != "no_m" else None
    rotation = "m_then_rope" if rotation == "no_m" else rotation
    w = torch.rand(h // 2, dtype=f64, generator=g)
    s = 0.8
    bias = torch.randn(2 * opts["n"] - 1, H, dtype=f64, generator=g) if opts["n"] else None
    mask = None
    if opts["padding"]:
        mask = torch.zeros(B, opts["Tk"], dtype=torch.bool)
        mask[0, 4:] = True  # batch 0 has 4 real keys; with window (0, 0) its rows 4.. see none
    kwargs = dict(window=opts["window"], causal=opts["causal"], q_offset=opts["q_offset"],
                  k_offset=opts["k_offset"], key_padding_mask=mask, layout=opts["layout"], rotation=rotation)
    expected = brute_force.attention(q, k, v, M, w, s, bias, **kwargs)
    for chunk in (256, 3):  # one chunk, and several chunks with partial key ranges
        out = reference.echo_attention(q, k, v, M, w, s, bias, query_chunk=chunk, **kwargs)
        torch.testing.assert_close(out, expected, rtol=1e-11, atol=1e-11)


def test_echo_attention_empty_rows_are_zero_without_nan_gradients():
    g = torch.Generator().manual_seed(8)
    q = torch.randn(1, 1, 4, 4, dtype=f64, generator=g, requires_grad=True)
    k = torch.randn(1, 1, 4, 4, dtype=f64, generator=g, requires_grad=True)
    bias = torch.randn(3, 1, dtype=f64, generator=g, requires_grad=True)
    mask = torch.tensor([[True, True, True, True]])
    out = reference.echo_attention(q, k, k, torch.eye(4, dtype=f64), torch.ones(2, dtype=f64), 1.0, bias,
                                   key_padding_mask=mask)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    for t in (q, k, bias):
        assert torch.isfinite(t.grad).all()


def test_the_orders_differ_and_m_none_is_the_identity():
    """The two orders compute different attention for a general M and agree for M = I and M = None."""
    g = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(1, 2, 6, 4, dtype=f64, generator=g) for _ in range(3))
    w, bias = torch.rand(2, dtype=f64, generator=g), torch.randn(3, 2, dtype=f64, generator=g)
    M = torch.randn(4, 4, dtype=f64, generator=g)
    run = lambda M, rotation: reference.echo_attention(q, k, v, M, w, 0.7, bias, rotation=rotation)
    assert not torch.allclose(run(M, "m_then_rope"), run(M, "rope_then_m"), atol=1e-3)
    eye = torch.eye(4, dtype=f64)
    for rotation in ("m_then_rope", "rope_then_m"):
        torch.testing.assert_close(run(eye, rotation), run(None, rotation), rtol=1e-14, atol=1e-14)


def test_only_m_then_rope_sees_the_givens_angles():
    """With M = R G_1 ... G_N ("rope_then_m"), q' k'^T = RoPE(q) R G G^T R^T RoPE(k)^T: the angles
    cancel. With M = G_1 ... G_N R ("m_then_rope") they choose the basis RoPE acts in, and matter."""
    g = torch.Generator().manual_seed(11)
    h, n = 6, 3
    q, k, v = (torch.randn(1, 2, 7, h, dtype=f64, generator=g) for _ in range(3))
    w, bias = torch.rand(h // 2, dtype=f64, generator=g), torch.randn(5, 2, dtype=f64, generator=g)
    R = torch.randn(h, h, dtype=f64, generator=g)
    pairs = torch.stack([torch.arange(n), torch.arange(n) + 1], dim=1)
    angles = [torch.zeros(n, dtype=f64), torch.randn(n, dtype=f64, generator=g)]
    for rotation, givens_first in (("m_then_rope", True), ("rope_then_m", False)):
        matrices = [reference.orthogonal_product(t, pairs, R, givens_first) for t in angles]
        out = [reference.echo_attention(q, k, v, M, w, 0.9, bias, rotation=rotation) for M in matrices]
        if rotation == "m_then_rope":
            assert (out[0] - out[1]).abs().max() > 1e-3
        else:
            torch.testing.assert_close(out[0], out[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rotation", ["m_then_rope", "rope_then_m"])
def test_echo_attention_gradcheck(rotation):
    g = torch.Generator().manual_seed(9)
    B, H, T, h = 1, 2, 5, 4
    q = torch.randn(B, H, T, h, dtype=f64, generator=g, requires_grad=True)
    k = torch.randn(B, H, T, h, dtype=f64, generator=g, requires_grad=True)
    v = torch.randn(B, H, T, h, dtype=f64, generator=g, requires_grad=True)
    M = torch.randn(h, h, dtype=f64, generator=g, requires_grad=True)
    w = torch.rand(h // 2, dtype=f64, generator=g, requires_grad=True)
    s = torch.tensor(0.9, dtype=f64, requires_grad=True)
    bias = torch.randn(5, H, dtype=f64, generator=g, requires_grad=True)
    fn = lambda *a: reference.echo_attention(*a, window=(2, 1), causal=False, q_offset=1, query_chunk=2,
                                             rotation=rotation)
    assert torch.autograd.gradcheck(fn, (q, k, v, M, w, s, bias))


def test_echo_attention_window_cost_is_banded(monkeypatch):
    """With a window, each query chunk looks at O(chunk + window) keys, not all Tk."""
    seen = []
    original = reference.relative_bias

    def spy(bias, q_pos, k_pos):
        seen.append(len(k_pos))
        return original(bias, q_pos, k_pos)

    monkeypatch.setattr(reference, "relative_bias", spy)
    T = 64
    x = torch.randn(1, 1, T, 4)
    reference.echo_attention(x, x, x, torch.eye(4), torch.ones(2), 1.0, torch.zeros(3, 1), window=4,
                             query_chunk=8)
    assert len(seen) == T // 8 and max(seen) <= 8 + 2 * 4
