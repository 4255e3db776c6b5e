"""Sines and cosines of RoPE's angles, the one implementation every Triton kernel uses (the rotary
kernel, the attention rotation pass and the backward's passes that undo it), so that a pass and the one
that undoes it rotate by the very same bits (docs/model.md, Rotary embedding)."""

import triton
import triton.language as tl

# Largest |phi| whose sine and cosine _sincos computes exactly (within fp32 rounding): the quadrant
# index j = round(phi / (pi/2)) must stay below 2**32 for the three-part reduction to be exact.
MAX_ANGLE = tl.constexpr(2.0**32 * 1.5707963267948966)


@triton.jit
def _sincos(phi):
    """sin and cos of fp32 phi, within 1e-7 of the exact values for |phi| < MAX_ANGLE; NaN beyond.

    The argument is reduced to r in [-pi/4, pi/4] in fp64, by Cody-Waite with pi/2 split in three
    parts: the first two have 21 significant bits, so j * part is exact for |j| < 2**32 and the
    subtractions lose nothing, with or without fused multiply-adds (the interpreter does not fuse
    tl.fma; the GPU does). An fp32 reduction is exact only up to |phi| ~ 1e5, which a long audio at
    a large learned s can pass. r then goes through Cephes' sinf/cosf minimax polynomials in fp32.

    tl.sin/tl.cos would be libdevice calls: one reduction for both here, where each of those carries,
    inlined per element, a rarely taken slow path (Payne-Hanek, with a table walked through the stack)
    that alone costs the rotary kernel all 255 registers, and would double what an attention rotation
    pass executes."""
    x = phi.to(tl.float64)
    j = tl.floor(x * 0.6366197723675814 + 0.5)  # nearest multiple of pi/2
    r = tl.fma(j, -1.570796012878418, x)
    r = tl.fma(j, -3.139164164167596e-07, r)
    r = tl.fma(j, -6.223372171896613e-14, r).to(tl.float32)
    r2 = r * r
    sin_r = tl.fma(tl.fma(tl.fma(r2, -1.95152959e-04, 8.33216087e-03), r2, -1.66666546e-01) * r2, r, r)
    cos_r = tl.fma(tl.fma(tl.fma(tl.fma(r2, 2.44331571e-05, -1.38873163e-03), r2, 4.16666457e-02), r2, -0.5),
                   r2, 1.0)
    quadrant = (j - 4.0 * tl.floor(j * 0.25)).to(tl.int32)  # j mod 4, exact in fp64
    odd = (quadrant & 1) != 0
    sin = tl.where(odd, cos_r, sin_r)
    cos = tl.where(odd, sin_r, cos_r)
    sin = tl.where((quadrant & 2) != 0, -sin, sin)
    cos = tl.where(((quadrant + 1) & 2) != 0, -cos, cos)
    in_range = tl.abs(x) < MAX_ANGLE  # beyond it, a loud NaN rather than a wrong rotation
    return tl.where(in_range, sin, float("nan")), tl.where(in_range, cos, float("nan"))
