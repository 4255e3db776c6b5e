"""Kernels and their launchers (Triton, and the blocked CPU attention); echo_kernels/<op>.py registers them."""
