"""Triton kernels and their launchers; echo_kernels/<op>.py registers them as torch ops."""
