"""Stage 5 — run: compiled attention as torch custom ops, modules and the CPU executor."""
from .build import load
from .compiled import CompiledAttention, UnsupportedPatternError, compile
from .nn import SparseAttention

__all__ = ["CompiledAttention", "SparseAttention", "UnsupportedPatternError", "compile", "load"]
