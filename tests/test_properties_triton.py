"""Generated cases on the Triton kernels, in float32, against the float64 reference: echo_attention and
rotary_orthogonal, forward and every gradient.

Without a GPU the kernels run through the Triton interpreter (tests/conftest.py), so the shapes stay
small and the tiles are drawn from 16 and 32 rows, which puts ragged edges, several tiles per row and
skipped tiles within reach of T <= 32. tests/conftest.py prints how many cases each test generated
and fails the run if, the whole module having run, they are fewer than CASE_FLOOR.
"""

from __future__ import annotations

import os
from unittest import mock

import torch
from hypothesis import given
from hypothesis import strategies as st

import echo_kernels
from echo_kernels import reference
from echo_kernels.kernels import attention as attention_kernel
from echo_kernels.kernels import attention_backward, attention_common
from echo_kernels.kernels import rotary as rotary_kernels

from attention_strategies import attention_cases, attention_gradient_terms, attention_grads
from property_counts import counted
from numerics import rel_err
from property_strategies import property_settings, rotary_cases, rotary_gradient_terms, rotary_grads

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

CASE_FLOOR = 100

# The attention kernels take power-of-two head widths (tl.arange); rotary pads to one, so any even h.
ATTENTION_HEAD_WIDTHS = (16, 32, 64, 128)
ROTARY_HEAD_WIDTHS = (16, 32, 64, 80, 128)
FLOAT32_TOL = 2e-5  # the largest error seen over these cases is about 6e-6

# Tile rows (BLOCK_M, BLOCK_N) under the interpreter; on a GPU the kernels' own.
TILES = st.tuples(st.sampled_from((16, 32)), st.sampled_from((16, 32))) if INTERPRETED else st.none()


@property_settings(max_examples=60)
@given(case=attention_cases(ATTENTION_HEAD_WIDTHS, max_len=32), tiles=TILES, dq_in_key_pass=st.booleans())
@counted
def test_triton_attention_float32(case, tiles, dq_in_key_pass):
    """Output and gradients, dq summed by the dq pass or by the dk/dv pass."""
    inputs, do = case.inputs(), case.output_gradient()
    out_ref, want = attention_grads(reference.echo_attention, inputs, do, torch.float64, case.options())
    override = dict(BLOCK_M=tiles[0], BLOCK_N=tiles[1]) if tiles else {}
    forward = mock.patch.object(attention_kernel, "forward", wraps=attention_kernel.forward)
    with mock.patch.dict(os.environ, {"ECHO_BACKEND": "triton"}), \
            mock.patch.dict(attention_common.BLOCK_OVERRIDE, override), forward as spy, \
            attention_backward.dq_in_key_pass(dq_in_key_pass):
        out, got = attention_grads(echo_kernels.echo_attention, inputs, do, torch.float32, case.options(),
                                   DEVICE)
    assert spy.call_count == 1  # the kernel ran
    assert out.dtype == torch.float32 and out.shape == out_ref.shape
    assert rel_err(out, out_ref) < FLOAT32_TOL
    terms = attention_gradient_terms(case, inputs, do)
    for name, g in want.items():
        assert got[name].shape == g.shape, name
        err = rel_err(got[name], g, terms[name])
        assert err < FLOAT32_TOL, (name, err)


@property_settings(max_examples=80)
@given(case=rotary_cases(ROTARY_HEAD_WIDTHS, max_len=40))
@counted
def test_triton_rotary_float32(case):
    """y = RoPE(x M) and the gradients of x, M, w and s (s a tensor) or of x, M and w (s a float)."""
    inputs = case.inputs()
    y_ref, want = rotary_grads(reference.rotary_orthogonal, case, inputs, torch.float64)
    forward = mock.patch.object(rotary_kernels, "rotary_forward", wraps=rotary_kernels.rotary_forward)
    with mock.patch.dict(os.environ, {"ECHO_BACKEND": "triton"}), forward as spy:
        y, got = rotary_grads(echo_kernels.rotary_orthogonal, case, inputs, torch.float32, DEVICE)
    assert spy.call_count == 1  # the kernel ran
    assert y.dtype == torch.float32 and y.shape == y_ref.shape
    assert rel_err(y, y_ref) < FLOAT32_TOL
    terms = rotary_gradient_terms(case, inputs)
    for name, g in want.items():
        assert got[name].shape == g.shape, name
        err = rel_err(got[name], g, terms[name])
        assert err < FLOAT32_TOL, (name, err)
