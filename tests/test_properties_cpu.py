"""Generated cases on the CPU paths: the CPU attention (float64 and float32; its backward in C++, and in
PyTorch as without the extension) and the C++ orthogonal_product (float64) against the float64 reference, and
the reference itself against the brute-force formulas of tests/brute_force.py. Forward and every gradient.

Hypothesis draws the cases (tests/attention_strategies.py, tests/property_strategies.py) derandomized;
tests/conftest.py prints how many each test generated and fails the run if, the whole module having
run, they are fewer than CASE_FLOOR.
"""

from __future__ import annotations

import os
from unittest import mock

import torch
from hypothesis import given
from hypothesis import strategies as st

import echo_kernels
from echo_kernels import _extension, backend, reference
from echo_kernels.kernels import attention_cpu

import brute_force
from attention_strategies import attention_cases, attention_gradient_terms, attention_grads
from numerics import rel_err
from property_counts import counted
from property_strategies import (
    orthogonal_cases,
    property_settings,
    rotary_cases,
    rotary_gradient_terms,
    rotary_grads,
)

CASE_FLOOR = 500

HEAD_WIDTHS = (16, 32, 64, 80, 128)
FLOAT64_TOL = 1e-10
FLOAT32_TOL = 2e-5  # the largest error seen over these cases is about 5e-6


# How the CPU attention runs a case: its backward in C++ or in PyTorch (as without the extension), with the
# default blocks or blocks of 16 query rows, which start inside the band and add up dbias across blocks.
CPU_PATHS = ("compiled", "compiled_small_blocks", "python_small_blocks")


def _assert_attention_matches(case, dtype, tol, path):
    """echo_attention on CPU tensors of dtype (attention_cpu under ECHO_BACKEND=auto) against the float64
    reference: the output and the gradients of q, k, v, M, w, s and bias."""
    inputs, do = case.inputs(), case.output_gradient()
    out_ref, want = attention_grads(reference.echo_attention, inputs, do, torch.float64, case.options())
    cpu_path = mock.patch.object(attention_cpu, "attention", wraps=attention_cpu.attention)
    compiled = mock.patch.object(attention_cpu, "_compiled_backward", wraps=attention_cpu._compiled_backward)
    elements = attention_cpu.BLOCK_ELEMENTS if path == "compiled" else 1
    with mock.patch.dict(os.environ, {"ECHO_BACKEND": "auto"}), cpu_path as spy, compiled as compiled_spy, \
            mock.patch.object(attention_cpu, "BLOCK_ELEMENTS", elements), \
            mock.patch.object(attention_cpu, "COMPILED_BACKWARD", path != "python_small_blocks"), \
            mock.patch.object(backend, "_warned", {"biased_attention_backward"}):
        out, got = attention_grads(echo_kernels.echo_attention, inputs, do, dtype, case.options())
    assert spy.call_count == 1  # the CPU path ran, not the reference
    assert compiled_spy.call_count == (path != "python_small_blocks")
    assert out.dtype == dtype and out.shape == out_ref.shape
    assert rel_err(out, out_ref) < tol
    terms = attention_gradient_terms(case, inputs, do)
    for name, g in want.items():
        assert got[name].dtype == dtype and got[name].shape == g.shape, name
        err = rel_err(got[name], g, terms[name])
        assert err < tol, (name, err)


@property_settings(max_examples=200)
@given(case=attention_cases(HEAD_WIDTHS, max_len=48), path=st.sampled_from(CPU_PATHS))
@counted
def test_cpu_attention_float64(case, path):
    _assert_attention_matches(case, torch.float64, FLOAT64_TOL, path)


@property_settings(max_examples=150)
@given(case=attention_cases(HEAD_WIDTHS, max_len=48), path=st.sampled_from(CPU_PATHS))
@counted
def test_cpu_attention_float32(case, path):
    _assert_attention_matches(case, torch.float32, FLOAT32_TOL, path)


def value_and_grads(fn, leaves, upstream):
    """(fn(*leaves), the gradients of every leaf for the upstream gradient); unused leaves get zeros."""
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    out = fn(*leaves)
    return out, torch.autograd.grad(out, leaves, upstream, allow_unused=True, materialize_grads=True)


@property_settings(max_examples=200)
@given(case=orthogonal_cases(st.one_of(st.integers(2, 24), st.sampled_from(HEAD_WIDTHS)), max_pairs=48,
                             max_all_h=12))
@counted
def test_cpp_orthogonal_product_float64(case):
    """The C++ op against the reference: M and the gradients of thetas and R (summed over broadcast
    dims; with N = 0 the reference never reads thetas, whose gradient is then the empty (..., 0))."""
    assert _extension.LOADED, _extension.LOAD_ERROR
    x = case.inputs()
    product = lambda op: lambda thetas, R: op(thetas, x["pairs"], R, case.givens_first)
    leaves = (x["thetas"], x["R"])
    M, got = value_and_grads(product(torch.ops.echo_kernels.orthogonal_product), leaves, x["dM"])
    expected, want = value_and_grads(product(reference.orthogonal_product), leaves, x["dM"])
    assert M.dtype == torch.float64 and M.shape == expected.shape
    assert rel_err(M, expected) < FLOAT64_TOL
    for name, g, w in zip(("thetas", "R"), got, want):
        assert g.shape == w.shape, name
        assert rel_err(g, w) < FLOAT64_TOL, name


# --------------------------------------------------------------------------------------------------
# The reference against brute force
# --------------------------------------------------------------------------------------------------


@property_settings(max_examples=80)
@given(case=orthogonal_cases(st.integers(2, 10), max_pairs=20, max_all_h=6, max_batch_side=2))
@counted
def test_reference_orthogonal_product_is_dense_givens(case):
    x = case.inputs()
    product = lambda impl: lambda thetas, R: impl(thetas, x["pairs"], R, case.givens_first)
    M, got = value_and_grads(product(reference.orthogonal_product), (x["thetas"], x["R"]), x["dM"])
    expected, want = value_and_grads(product(brute_force.orthogonal_product), (x["thetas"], x["R"]), x["dM"])
    assert rel_err(M, expected) < FLOAT64_TOL
    for name, g, w in zip(("thetas", "R"), got, want):
        assert rel_err(g, w) < FLOAT64_TOL, name


@property_settings(max_examples=80)
@given(case=rotary_cases((2, 4, 6, 8, 16), max_len=6, max_heads=2, max_offset=30))
@counted
def test_reference_rotary_is_dense_rotation(case):
    inputs = case.inputs()
    y, got = rotary_grads(reference.rotary_orthogonal, case, inputs, torch.float64)
    expected, want = rotary_grads(brute_force.rotary_orthogonal, case, inputs, torch.float64)
    assert rel_err(y, expected) < FLOAT64_TOL
    terms = rotary_gradient_terms(case, inputs)
    for name, g in want.items():
        assert rel_err(got[name], g, terms[name]) < FLOAT64_TOL, name


@property_settings(max_examples=80)
@given(case=attention_cases((2, 4, 6, 8), max_len=6, max_offset=12))
@counted
def test_reference_attention_is_per_logit(case):
    inputs, do = case.inputs(), case.output_gradient()
    out, got = attention_grads(reference.echo_attention, inputs, do, torch.float64, case.options())
    expected, want = attention_grads(brute_force.attention, inputs, do, torch.float64, case.options())
    assert rel_err(out, expected) < FLOAT64_TOL
    terms = attention_gradient_terms(case, inputs, do)
    for name, g in want.items():
        err = rel_err(got[name], g, terms[name])
        assert err < FLOAT64_TOL, (name, err)
