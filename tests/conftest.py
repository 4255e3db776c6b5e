"""Test setup: Triton kernels run through the interpreter where there is no GPU.

TRITON_INTERPRET must be set before any Triton kernel is defined, so it is set here, at import time
of the test session, ahead of echo_kernels' own imports in the test modules.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, os.cpu_count() or 1))
