"""What this installation of echo_kernels can run: `python -m echo_kernels.info`."""

from __future__ import annotations

import os

import torch

from . import __version__, _extension
from .backend import TRITON_IMPORT_ERROR, requested_backend


def report() -> str:
    lines = [
        f"echo_kernels {__version__}, torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})"]
    if _extension.LOADED:
        lines.append(f"C++ extension: loaded from {_extension._C.__file__}")
        cpu = _extension.has_kernel("orthogonal_product", "CPU")
        cuda = _extension.cuda_compiled()
        lines.append(f"  orthogonal_product CPU kernel:  {'yes' if cpu else 'no'}")
        lines.append(f"  orthogonal_product CUDA kernel: "
                     f"{'yes' if cuda else 'no (built without the CUDA part)'}")
        attention = _extension.has_kernel("biased_attention_backward", "CPU")
        lines.append(f"  biased_attention_backward CPU kernel (echo_attention's CPU backward): "
                     f"{'yes' if attention else 'no'}")
        threads = torch.ops.echo_kernels.parallel_threads()
        lines.append(f"  CPU kernels' threads: {threads} of torch's {torch.get_num_threads()}")
    else:
        lines.append(f"C++ extension: missing ({_extension.LOAD_ERROR}); orthogonal_product runs the "
                     "reference, echo_attention's CPU backward the PyTorch blocked one")
    if TRITON_IMPORT_ERROR is None:
        import triton

        lines.append(f"Triton: {triton.__version__}")
    else:
        lines.append(f"Triton: missing ({TRITON_IMPORT_ERROR}); on a GPU, rotary_orthogonal and "
                     "echo_attention run the reference")
    cpp = _extension.LOADED and _extension.has_kernel("orthogonal_product", "CPU")
    lines.append(f"CPU tensors under ECHO_BACKEND=auto: orthogonal_product "
                 f"{'in C++' if cpp else 'on the reference'}, "
                 "echo_attention by kernels/attention_cpu.py, rotary_orthogonal on the reference")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    lines.append(f"CUDA device: {gpu}")
    lines.append(f"ECHO_BACKEND={requested_backend()}, "
                 f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
