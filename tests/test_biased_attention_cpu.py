"""echo_kernels::biased_attention_backward, the C++ backward of the CPU attention
(csrc/biased_attention_cpu.cpp), called directly: its gradients of q, k, v and the bias table against float64
autograd of the same attention, on drawn shapes that cross its query and key blocks, with bands, padding,
offsets and rows without keys.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from echo_kernels import _extension, reference

from numerics import rel_err
from property_counts import counted
from property_strategies import property_settings

CASE_FLOOR = 100
UNBOUNDED = reference.UNBOUNDED
op = torch.ops.echo_kernels.biased_attention_backward if _extension.LOADED else None


def attention(q, k, v, bias, key_padding_mask, left: int, right: int, shift: int):
    """(out, lse) of softmax(q k^T + bias + masks) v, the op's forward: query i sees key j when
    i + shift - left <= j <= i + shift + right and j is not padded; a query with no key gives 0 and lse 0."""
    q_pos, k_pos = torch.arange(q.shape[2]) + shift, torch.arange(k.shape[2])
    logits = q @ k.transpose(-1, -2)
    if bias is not None:
        logits = logits + reference.relative_bias(bias, q_pos, k_pos)
    keep = reference.attention_keep(q_pos, k_pos, (left, right), causal=False)[None, None]
    if key_padding_mask is not None:
        keep = keep & ~key_padding_mask[:, None, None, :]
    logits = logits.masked_fill(~keep, float("-inf"))
    has_key = keep.any(-1, keepdim=True)
    probs = torch.softmax(logits.masked_fill(~has_key, 0.0), -1).masked_fill(~keep, 0.0)
    return probs @ v, torch.logsumexp(logits, -1).masked_fill(~has_key[..., 0], 0.0)


@st.composite
def cases(draw):
    B, H = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    # past 256 queries and 512 keys: more than one block of each
    Tq, Tk = draw(st.sampled_from([1, 5, 40, 300])), draw(st.sampled_from([1, 7, 60, 600]))
    n = draw(st.sampled_from([None, 1, 2, 5, 15]))
    left = draw(st.sampled_from([UNBOUNDED, 0, 3, 40, -2]))
    right = draw(st.sampled_from([UNBOUNDED, 0, 3, 40]))
    shift = draw(st.sampled_from([0, 1, -9, Tk - Tq, 250]))
    padded = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return dict(B=B, H=H, Tq=Tq, Tk=Tk, h=draw(st.sampled_from([8, 32])), n=n, left=left, right=right,
                shift=shift, padded=padded, seed=seed, scale=draw(st.sampled_from([0.3, 1.0, 4.0])))


def inputs(c):
    """float64 q, k, v, bias, padding and upstream gradient of case c; padded keys' k and v zeroed, as the
    CPU attention gives them."""
    g = torch.Generator().manual_seed(c["seed"])
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    q, k, v = rnd(c["B"], c["H"], c["Tq"], c["h"]) * c["scale"], rnd(c["B"], c["H"], c["Tk"], c["h"]), rnd(
        c["B"], c["H"], c["Tk"], c["h"])
    bias = rnd(2 * c["n"] - 1, c["H"]) if c["n"] is not None else None
    padding = torch.rand(c["B"], c["Tk"], generator=g) < 0.3 if c["padded"] else None
    if padding is not None:
        k, v = (t.masked_fill(padding[:, None, :, None], 0.0) for t in (k, v))
    return q, k, v, bias, padding, rnd(c["B"], c["H"], c["Tq"], c["h"])


def check(c, dtype, tol):
    q, k, v, bias, padding, dout = inputs(c)
    leaves = [t.requires_grad_(True) for t in (q, k, v, bias) if t is not None]
    out, lse = attention(q, k, v, bias, padding, c["left"], c["right"], c["shift"])
    want = torch.autograd.grad(out, leaves, dout, allow_unused=True)
    args = [t.detach().to(dtype) if t is not None else None for t in (dout, q, k, v, out, lse, bias)]
    got = op(*args, padding, c["left"], c["right"], c["shift"])
    assert got[3].shape == (bias.shape if bias is not None else (0, c["H"]))
    # The size of the score gradients' terms: where a gradient's sum cancels (dq and dk of a query that sees
    # one key, dbias with n = 1, which sums whole softmax rows), its rounding is of their size.
    terms = (dout.abs() @ v.abs().transpose(-1, -2)).sum().item()
    for name, g, w in zip(("q", "k", "v", "bias"), got, want):
        assert g.dtype == dtype and g.shape == w.shape, name
        assert rel_err(g, w, terms) < tol, (name, rel_err(g, w, terms))


def test_extension_has_the_op():
    assert _extension.has_kernel("biased_attention_backward", "CPU"), _extension.LOAD_ERROR


@property_settings(max_examples=80)
@given(c=cases())
@counted
def test_gradients_match_float64_autograd(c):
    check(c, torch.float64, 1e-11)


@property_settings(max_examples=40)
@given(c=cases())
@counted
def test_float32_gradients(c):
    """float32 throughout, the exponentials by the kernel's own vectorized exp."""
    check(c, torch.float32, 2e-5)


def test_encoder_sized_peaked_rows_float32():
    """Whisper tiny's encoder length and head width, logits up to ~60 apart: the exponentials span the
    float32 range, three key blocks and six query blocks."""
    check(dict(B=1, H=2, Tq=1500, Tk=1500, h=64, n=15, left=UNBOUNDED, right=UNBOUNDED, shift=0, padded=False,
               seed=3, scale=1.5), torch.float32, 2e-5)


def test_is_deterministic():
    c = dict(B=2, H=3, Tq=300, Tk=600, h=32, n=5, left=40, right=UNBOUNDED, shift=0, padded=True, seed=1,
             scale=1.0)
    q, k, v, bias, padding, dout = (t.float() if t is not None and t.is_floating_point() else t
                                    for t in inputs(c))
    out, lse = attention(q, k, v, bias, padding, c["left"], c["right"], c["shift"])
    first = op(dout, q, k, v, out, lse, bias, padding, c["left"], c["right"], c["shift"])
    second = op(dout, q, k, v, out, lse, bias, padding, c["left"], c["right"], c["shift"])
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.fixture
def torch_threads():
    """Sets torch's intra-op thread count for a test, restored after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_kernels_run_on_torchs_threads(torch_threads):
    """at::parallel_for gives the extension's CPU kernels as many threads as torch has (setup.py says why
    that needs -fopenmp)."""
    for threads in (1, 2, 3):
        torch_threads(threads)
        assert torch.ops.echo_kernels.parallel_threads() == threads


def test_same_bits_on_any_number_of_threads(torch_threads):
    """Each head belongs to one thread and its products run on that thread alone: the thread count
    changes nothing, also for inputs that require grad (worker threads start with autograd on)."""
    c = dict(B=2, H=3, Tq=300, Tk=600, h=32, n=5, left=40, right=UNBOUNDED, shift=0, padded=True, seed=4,
             scale=1.0)
    q, k, v, bias, padding, dout = (t.float() if t is not None and t.is_floating_point() else t
                                    for t in inputs(c))
    out, lse = attention(q, k, v, bias, padding, c["left"], c["right"], c["shift"])
    q, k, v, bias = (t.requires_grad_() for t in (q, k, v, bias))
    got = {}
    for threads in (1, 2, 4):
        torch_threads(threads)
        got[threads] = op(dout, q, k, v, out, lse, bias, padding, c["left"], c["right"], c["shift"])
    assert all(torch.equal(a, b) for a, b in zip(got[1], got[2]))
    assert all(torch.equal(a, b) for a, b in zip(got[1], got[4]))


def test_opcheck():
    """Schema, fake (torch.compile traces it) and dispatcher registration agree with the kernel."""
    c = dict(B=2, H=2, Tq=20, Tk=30, h=8, n=3, left=4, right=UNBOUNDED, shift=2, padded=True, seed=2,
             scale=1.0)
    q, k, v, bias, padding, dout = (t.float() if t is not None and t.is_floating_point() else t
                                    for t in inputs(c))
    out, lse = attention(q, k, v, bias, padding, c["left"], c["right"], c["shift"])
    torch.library.opcheck(op, (dout, q, k, v, out, lse, bias, padding, 4, UNBOUNDED, 2))
    torch.library.opcheck(op, (dout, q, k, v, out, lse, None, None, UNBOUNDED, UNBOUNDED, 0))


@pytest.mark.parametrize("bad, message", [
    (lambda a: {**a, "q": a["q"].bfloat16()}, "float32 or float64"),
    (lambda a: {**a, "k": a["k"][:, :, :, :4]}, "k and v must be"),
    (lambda a: {**a, "out": a["out"][:, :, :-1]}, "dout and out must be"),
    (lambda a: {**a, "lse": a["lse"][..., None]}, "lse must be"),
    (lambda a: {**a, "bias": a["bias"][:2]}, "bias must be"),
    (lambda a: {**a, "bias": a["bias"].double()}, "bias must be q's dtype"),
    (lambda a: {**a, "key_padding_mask": a["key_padding_mask"].float()}, "key_padding_mask must be"),
])
def test_bad_arguments_are_refused(bad, message):
    c = dict(B=1, H=2, Tq=6, Tk=9, h=8, n=3, left=UNBOUNDED, right=UNBOUNDED, shift=0, padded=True, seed=0,
             scale=1.0)
    q, k, v, bias, padding, dout = (t.float() if t is not None and t.is_floating_point() else t
                                    for t in inputs(c))
    out, lse = attention(q, k, v, bias, padding, UNBOUNDED, UNBOUNDED, 0)
    args = bad(dict(dout=dout, q=q, k=k, v=v, out=out, lse=lse, bias=bias, key_padding_mask=padding))
    with pytest.raises(RuntimeError, match=message):
        op(*args.values(), UNBOUNDED, UNBOUNDED, 0)
