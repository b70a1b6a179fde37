"""Stage 5 — run: the fixed torch ops (``ops``), the objects that call them (compiled,
grouped and linear attention), their input checks, numerics checks and build directories."""
from .compiled import CompiledAttention, UnsupportedPatternError
from .grouped import GroupedAttention
from .linear_attention import ScatteredLinearAttention

__all__ = ["CompiledAttention", "GroupedAttention", "ScatteredLinearAttention", "UnsupportedPatternError"]
