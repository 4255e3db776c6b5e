"""echo-kernels: fused kernels for Echo's positional machinery, with plain-PyTorch references.

    orthogonal_product(thetas, pairs, R, givens_first=True) -> M
    rotary_orthogonal(x, M, w, s=1.0, offset=0, layout="half_split") -> y
    echo_attention(q, k, v, M, w, s, bias, *, window=None, causal=False, ..., rotation="m_then_rope") -> out

`ECHO_BACKEND=reference|triton|auto` picks the implementation (see echo_kernels.backend).
"""

from .attention import echo_attention
from .orthogonal import orthogonal_product
from .rotary import rotary_orthogonal

__all__ = ["echo_attention", "orthogonal_product", "rotary_orthogonal"]
__version__ = "0.1.0"
