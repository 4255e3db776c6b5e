"""echo-kernels: fused kernels for Echo's positional machinery, with plain-PyTorch references.

    orthogonal_product(thetas, pairs, R, givens_first=True) -> M
    rotary_orthogonal(x, M, w, s=1.0, offset=0, layout="half_split") -> y
    echo_attention(q, k, v, M, w, s, bias, *, window=None, causal=False, ..., keys_rotated=False) -> out
    plain_attention(q, k, v) -> out         softmax(q k^T / sqrt(h)) v: the floor echo_attention is
                                            measured against

`ECHO_BACKEND=reference|triton|auto` picks the implementation (see echo_kernels.backend).
"""

from .attention import echo_attention
from .orthogonal import orthogonal_product
from .plain_attention import plain_attention
from .rotary import rotary_orthogonal

__all__ = ["echo_attention", "orthogonal_product", "plain_attention", "rotary_orthogonal"]
__version__ = "0.1.0"
