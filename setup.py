"""Build of echo-kernels: the Python packages, and (from csrc/) the C++/CUDA extension echo_kernels._C.

The CPU part of the extension is always built. The CUDA part is built when torch is a CUDA build and
a CUDA toolkit (nvcc) is found; ECHO_KERNELS_CUDA=0 or 1 forces it off or on. TORCH_CUDA_ARCH_LIST
defaults to "8.0;9.0+PTX": machine code for sm_80 (which sm_86 and sm_89 run) and sm_90, and sm_90's
PTX, which the driver compiles for newer GPUs (Blackwell) on first use. The toolkit is CUDA_HOME
(or CUDA_PATH) when set, else the folder of the real nvcc behind the one on PATH (which may be a
wrapper script naming it), else /usr/local/cuda. Headers that torch includes but a bare toolkit lacks
(cuBLAS, cuSPARSE, cuSOLVER) are taken from the pip packages `nvidia-*` that come with the CUDA
build of torch.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(message: str) -> None:
    print(f"echo-kernels build: {message}", file=sys.stderr)


def _real_nvcc(path: str) -> str | None:
    """The nvcc binary behind `path`: itself, or the toolkit nvcc a small wrapper script execs."""
    path = os.path.realpath(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if head.startswith(b"\x7fELF"):
        return path
    if head.startswith(b"#!"):
        for candidate in re.findall(rb"(/[^\s\"';]*?/bin/nvcc)\b", head):
            candidate = os.path.realpath(candidate.decode())
            if candidate != path and os.path.isfile(candidate):
                return _real_nvcc(candidate)
    return None


def find_cuda_home() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return home
    on_path = shutil.which("nvcc")
    if on_path:
        real = _real_nvcc(on_path)
        if real:
            return os.path.dirname(os.path.dirname(real))
    for home in ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]:
        if os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return home
    return None


def pip_cuda_include_dirs() -> list[str]:
    """include/ folders of the pip-installed CUDA libraries (nvidia/cu13/include, nvidia/*/include)."""
    try:
        import nvidia  # namespace package installed with the CUDA build of torch
    except ImportError:
        return []
    dirs = []
    for base in nvidia.__path__:
        dirs += sorted(d for d in glob.glob(os.path.join(base, "*", "include")) if os.path.isdir(d))
    return dirs


def extension_modules():
    try:
        import torch
    except ImportError:
        _log("torch is not installed: building the Python packages only (install torch first, then rebuild)")
        return [], {}

    want = os.environ.get("ECHO_KERNELS_CUDA", "").strip()
    if want not in ("", "0", "1"):
        raise SystemExit(f"ECHO_KERNELS_CUDA must be 0 or 1, got {want!r}")
    cuda_home = find_cuda_home() if want != "0" else None
    if want == "1" and torch.version.cuda is None:
        raise SystemExit("ECHO_KERNELS_CUDA=1, but torch is not a CUDA build")
    if want == "1" and cuda_home is None:
        raise SystemExit("ECHO_KERNELS_CUDA=1, but no CUDA toolkit (nvcc) was found; set CUDA_HOME")
    with_cuda = want == "1" or (want == "" and torch.version.cuda is not None and cuda_home is not None)

    if with_cuda:
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    from torch.utils import cpp_extension

    if with_cuda:
        cpp_extension.CUDA_HOME = cuda_home

    sources = ["csrc/orthogonal.cpp", "csrc/biased_attention_cpu.cpp", "csrc/parallel_threads.cpp"]
    cxx = ["-O3", "-DECHO_KERNELS_PYTHON_MODULE"]
    nvcc = ["-O3", "-lineinfo", "-DECHO_KERNELS_PYTHON_MODULE"]
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        # ATen's at::parallel_for is compiled into the caller: without OpenMP it runs every chunk on the
        # calling thread. The OpenMP calls resolve to the runtime libtorch_cpu loads (none linked here).
        cxx.append("-fopenmp")
    if with_cuda:
        sources.append("csrc/orthogonal_cuda.cu")
        for d in pip_cuda_include_dirs():  # after the toolkit's own headers, like CPATH
            cxx += ["-idirafter", d]
            nvcc += ["-Xcompiler", f"-idirafter{d}"]
        _log(f"CUDA part on: toolkit {cuda_home}, TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
        make = cpp_extension.CUDAExtension
        args = {"cxx": cxx, "nvcc": nvcc}
    else:
        reason = "ECHO_KERNELS_CUDA=0" if want == "0" else (
            "torch is a CPU build" if torch.version.cuda is None else "no CUDA toolkit (nvcc) found")
        _log(f"CUDA part off ({reason}): building the CPU part only")
        make = cpp_extension.CppExtension
        args = {"cxx": cxx}
    ext = make(
        name="echo_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args=args,
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


def _readme() -> str:
    path = os.path.join(ROOT, "README.md")
    return open(path, encoding="utf-8").read() if os.path.exists(path) else ""


ext_modules, cmdclass = extension_modules()

setup(
    name="echo-kernels",
    version="0.1.0",
    description=("Fused kernels and a drop-in model for Echo: Givens-orthogonal rotary and windowed biased "
                 "attention"),
    long_description=_readme(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["echo_kernels", "echo_kernels.*", "echo", "echo.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.6",
        "numpy",
        "safetensors>=0.4",
        "transformers>=5.0",
        "tqdm>=4.60",  # echo.train's progress bars; transformers needs it as well
    ],
    extras_require={
        "triton": ["triton>=3.6"],
        "test": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6.100", "ninja", "pybind11", "matplotlib"],
        # audio front end and tokenizer (openai-whisper), word error rate, Trainer;
        # loading audio files also needs the ffmpeg binary, --synthetic training the espeak-ng binary
        "speech": ["openai-whisper>=20240930", "jiwer>=3.0", "accelerate>=1.1"],
    },
)
