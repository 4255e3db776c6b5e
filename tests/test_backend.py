"""ECHO_BACKEND picks the implementation, and a missing kernel is never hidden."""

import pytest
import torch

import echo_kernels as ek
from echo_kernels import backend


def test_unknown_backend_is_rejected(monkeypatch):
    monkeypatch.setenv("ECHO_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="ECHO_BACKEND='cuda-please'"):
        ek.rotary_orthogonal(torch.randn(1, 2, 1, 4), torch.eye(4), torch.ones(2))


def test_triton_backend_without_kernel_raises(monkeypatch):
    monkeypatch.setenv("ECHO_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="no compiled no_such_op for cpu"):
        backend.use_kernel("no_such_op", torch.device("cpu"))


def test_auto_warns_once_when_a_device_lacks_its_kernel(monkeypatch):
    monkeypatch.setenv("ECHO_BACKEND", "auto")
    monkeypatch.setattr(backend, "_warned", set())
    with pytest.warns(UserWarning, match="no compiled no_such_op for cuda"):
        assert not backend.use_kernel("no_such_op", torch.device("cuda"))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not backend.use_kernel("no_such_op", torch.device("cuda"))


def test_auto_leaves_cpu_tensors_to_the_reference_for_gpu_only_kernels(monkeypatch):
    monkeypatch.setenv("ECHO_BACKEND", "auto")
    monkeypatch.setitem(backend._KERNELS, "gpu_op", (lambda device: True, False))
    monkeypatch.setitem(backend._KERNELS, "cpu_op", (lambda device: True, True))
    assert not backend.use_kernel("gpu_op", torch.device("cpu"))
    assert backend.use_kernel("gpu_op", torch.device("cuda"))
    assert backend.use_kernel("cpu_op", torch.device("cpu"))


def test_reference_backend_never_uses_a_kernel(monkeypatch):
    monkeypatch.setenv("ECHO_BACKEND", "reference")
    monkeypatch.setitem(backend._KERNELS, "any_op", (lambda device: True, True))
    assert not backend.use_kernel("any_op", torch.device("cuda"))
