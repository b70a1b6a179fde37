"""``sf.nn``: drop-in attention modules built on compiled sparse attention."""
from .runtime.nn import SparseAttention

__all__ = ["SparseAttention"]
