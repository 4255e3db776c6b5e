"""Shared by tests/ and benches/: tests marked `gpu` run only where CUDA is present (the GPU script,
benches/gpu_run.sh, runs them); elsewhere they are reported as skipped with that reason."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device: runs in benches/gpu_run.sh")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
