"""Stage 5 — run: compiled attention as torch custom ops, modules and the CPU executor."""
from .build import load
from .compiled import CompiledAttention, UnsupportedPatternError, compile
from .linear_attention import ScatteredLinearAttention
from .nn import SparseAttention

__all__ = ["CompiledAttention", "ScatteredLinearAttention", "SparseAttention", "UnsupportedPatternError", "compile",
           "load"]
