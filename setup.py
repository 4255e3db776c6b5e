"""Build of echo-kernels: the Python packages, and (from csrc/) the C++/CUDA extension."""

from setuptools import find_packages, setup

setup(
    name="echo-kernels",
    version="0.1.0",
    description="Fused kernels and a drop-in model for Echo: Givens-orthogonal rotary and windowed biased attention",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["echo_kernels", "echo_kernels.*", "echo", "echo.*"]),
    install_requires=[
        "torch>=2.6",
        "numpy",
        "safetensors>=0.4",
        "transformers>=5.0",
    ],
    extras_require={
        "triton": ["triton>=3.6"],
        "test": ["pytest>=8", "pytest-benchmark>=4", "ninja", "pybind11"],
    },
)
