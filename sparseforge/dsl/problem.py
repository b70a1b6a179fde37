"""The problem a pattern is applied to: token grid, heads, head dim, dtype."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .args import positive_int

DTYPES: dict[str, torch.dtype] = {
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp64": torch.float64, "float64": torch.float64, "double": torch.float64,
}
DTYPE_NAMES: dict[torch.dtype, str] = {torch.float16: "fp16", torch.bfloat16: "bf16",
                                       torch.float32: "fp32", torch.float64: "fp64"}


def as_dtype(value) -> torch.dtype:
    """A torch floating dtype from a dtype or one of the names in ``DTYPES``."""
    if isinstance(value, torch.dtype):
        if value not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {sorted(set(DTYPE_NAMES.values()))}, got {value}")
        return value
    if isinstance(value, str) and value.lower() in DTYPES:
        return DTYPES[value.lower()]
    raise ValueError(f"dtype must be a torch float dtype or one of {sorted(DTYPES)}, got {value!r}")


def as_grid(value) -> tuple[int, ...] | None:
    """A token grid: an int (1-D sequence) or a tuple of ints, each >= 1; None for grid-free patterns."""
    if value is None:
        return None
    if isinstance(value, (tuple, list)):
        if not 1 <= len(value) <= 3:
            raise ValueError(f"grid must have 1, 2 or 3 dimensions, got {tuple(value)!r}")
        return tuple(positive_int(f"grid[{i}]", v) for i, v in enumerate(value))
    return (positive_int("grid", value),)


@dataclass(frozen=True)
class Problem:
    """Shapes an attention problem is compiled for.

    grid:     token grid (S_1, ..., S_n), N = prod(grid), tokens flattened row-major;
              None for patterns whose tokens come at run time (``Scattered``).
    heads:    query heads H.
    head_dim: D, the per-head channel count of q, k and v.
    dtype:    element type of q, k, v (fp16, bf16, fp32).
    kv_heads: key/value heads (GQA/MQA); must divide ``heads``; default ``heads``.
    """

    grid: tuple[int, ...] | None = None
    heads: int = 1
    head_dim: int = 64
    dtype: torch.dtype = torch.float16
    kv_heads: int | None = field(default=None)

    def __post_init__(self):
        object.__setattr__(self, "grid", as_grid(self.grid))
        positive_int("heads", self.heads)
        positive_int("head_dim", self.head_dim)
        object.__setattr__(self, "dtype", as_dtype(self.dtype))
        kv = self.heads if self.kv_heads is None else positive_int("kv_heads", self.kv_heads)
        if self.heads % kv:
            raise ValueError(f"kv_heads must divide heads, got kv_heads={kv}, heads={self.heads}")
        object.__setattr__(self, "kv_heads", kv)

    @property
    def ndim(self) -> int:
        return 0 if self.grid is None else len(self.grid)

    @property
    def tokens(self) -> int:
        """N, the number of tokens (prod(grid)); needs a grid."""
        if self.grid is None:
            raise ValueError("this Problem has no grid; give Problem(grid=...) for a static pattern")
        return math.prod(self.grid)

    def with_grid(self, grid) -> "Problem":
        return Problem(grid=grid, heads=self.heads, head_dim=self.head_dim, dtype=self.dtype,
                       kv_heads=self.kv_heads)

    def __repr__(self) -> str:
        kv = "" if self.kv_heads == self.heads else f", kv_heads={self.kv_heads}"
        return (f"Problem(grid={self.grid}, heads={self.heads}, head_dim={self.head_dim}, "
                f"dtype={DTYPE_NAMES[self.dtype]}{kv})")

    def name(self) -> str:
        """Readable tag for file and op names, e.g. ``g56x56_h8_d64_bf16``."""
        g = "x".join(map(str, self.grid)) if self.grid else "var"
        return f"g{g}_h{self.heads}_d{self.head_dim}_{DTYPE_NAMES[self.dtype]}"
