"""``sf.nn.SparseAttention``: a drop-in attention module (qkv and output projections) for
token grids: images ``[B, H, W, C]``, videos ``[B, T, H, W, C]`` and sequences ``[B, N, C]``."""
from __future__ import annotations

import math

import torch
from torch import nn

from .api import compile, load
from .dsl.args import positive_int
from .dsl.modifiers import RelativePositionBias, Sinks, Softcap, relative_position_bias_shape
from .dsl.pattern import Pattern
from .dsl.problem import Problem, as_grid
from .runtime.compiled import CompiledAttention
from .runtime.inputs import check_backend

__all__ = ["SparseAttention"]


class SparseAttention(nn.Module):
    """Multi-head attention under a sparsity ``pattern``.

    pattern:  a static sparseforge Pattern.
    dim:      channels C of the input; ``dim = heads * head_dim``.
    heads:    query heads.
    grid:     the token grid; None: taken from each input's shape ([B, *grid, C]; a
              [B, N, C] input is the 1-D grid (N,)). Given: inputs are [B, *grid, C] or
              [B, prod(grid), C].
    kv_heads: key/value heads (GQA/MQA), must divide heads; default heads.
    qkv_bias: bias in the qkv projection.
    dtype:    parameter dtype (default torch's default); attention runs in the input's dtype.
    backend:  as in ``sparseforge.compile``.
    q_tile, k_tile: tile shapes, as in ``sparseforge.compile`` (default: chosen per grid).
    relative_position_bias: a learnable relative position table (``sf.RelativePositionBias``,
              nn.Parameter ``relative_position_bias_table`` of ``relative_position_bias_shape``:
              [heads, 2 w - 1 per grid dimension] for the pattern's window): True or
              "trunc_normal" (Swin's init, std 0.02), "zeros", or False. Needs ``grid`` (the
              table's shape depends on the number of grid dimensions and on the window).
    sinks:    learned attention sinks (``sf.Sinks``): nn.Parameter ``sinks`` [heads], zeros.
    softcap:  logit softcapping ``cap * tanh(s / cap)`` (``sf.Softcap``), a float > 0, or None.

    The attention is compiled once per (number of grid dimensions, dtype); a new grid size
    is only a new schedule, built and cached inside the op on first use, never a new op, so
    ``torch.compile(dynamic=True)`` traces one graph for every size. Under
    ``torch.compile(fullgraph=True)`` run the module once eagerly first (or give ``grid``),
    so the first compile happens outside the trace.
    """

    def __init__(self, pattern: Pattern, dim: int, heads: int, *, grid=None, kv_heads: int | None = None,
                 qkv_bias: bool = True, dtype: torch.dtype | None = None, backend: str | None = None,
                 q_tile=None, k_tile=None, relative_position_bias: bool | str = False, sinks: bool = False,
                 softcap: float | None = None):
        super().__init__()
        if not isinstance(pattern, Pattern):
            raise TypeError(f"pattern must be a sparseforge Pattern, got {pattern!r} ({type(pattern).__name__})")
        dim, heads = positive_int("dim", dim), positive_int("heads", heads)
        if dim % heads:
            raise ValueError(f"dim must be divisible by heads, got dim={dim}, heads={heads}")
        kv_heads = heads if kv_heads is None else positive_int("kv_heads", kv_heads)
        if heads % kv_heads:
            raise ValueError(f"kv_heads must divide heads, got kv_heads={kv_heads}, heads={heads}")
        check_backend(backend)
        self.pattern = pattern
        self.dim, self.heads, self.kv_heads = dim, heads, kv_heads
        self.head_dim = dim // heads
        self.grid = as_grid(grid)
        self.backend = backend
        self.q_tile, self.k_tile = q_tile, k_tile
        self.qkv = nn.Linear(dim, (heads + 2 * kv_heads) * self.head_dim, bias=qkv_bias, dtype=dtype)
        self.proj = nn.Linear(dim, dim, dtype=dtype)
        self._init_modifiers(relative_position_bias, sinks, softcap, dtype)
        self._compiled: dict[tuple, CompiledAttention] = {}
        if self.grid is not None:
            self.attention(self.grid, self.qkv.weight.dtype)

    def _init_modifiers(self, relative_position_bias, sinks, softcap, dtype) -> None:
        if relative_position_bias not in (False, True, "trunc_normal", "zeros"):
            raise ValueError(f"relative_position_bias must be False, True, 'trunc_normal' or 'zeros', got "
                             f"{relative_position_bias!r}")
        if not isinstance(sinks, bool):
            raise TypeError(f"sinks must be a bool, got {sinks!r} ({type(sinks).__name__})")
        # made once: the value is checked here, and a trace (dynamic=True) meets no float to check
        self._softcap = None if softcap is None else Softcap(softcap)
        self.softcap = None if self._softcap is None else self._softcap.cap
        self.register_parameter("relative_position_bias_table", None)
        if relative_position_bias is not False:
            if self.grid is None:
                raise ValueError("relative_position_bias needs grid= (the table's shape, [heads, 2 w - 1 per grid "
                                 "dimension], depends on the number of grid dimensions and the window)")
            shape = relative_position_bias_shape(self.pattern, self.problem(self.grid, torch.float32))
            table = torch.zeros(shape, dtype=dtype)
            if relative_position_bias != "zeros":
                nn.init.trunc_normal_(table, std=0.02)
            self.relative_position_bias_table = nn.Parameter(table)
        self.register_parameter("sinks", nn.Parameter(torch.zeros(self.heads, dtype=dtype)) if sinks else None)

    def modifiers(self) -> tuple:
        """The score modifiers of a call, holding the module's parameters."""
        out = []
        if self.relative_position_bias_table is not None:
            out.append(RelativePositionBias(self.relative_position_bias_table))
        if self._softcap is not None:
            out.append(self._softcap)
        if self.sinks is not None:
            out.append(Sinks(self.sinks))
        return tuple(out)

    @classmethod
    def from_build(cls, path, dim: int, *, qkv_bias: bool = True, dtype: torch.dtype | None = None,
                   backend: str | None = None) -> "SparseAttention":
        """A module whose attention is the op of a build directory (``sparseforge compile
        --out DIR``, verified by ``sparseforge.load``). Pattern, heads, KV heads and grid come
        from the build; ``dim`` must be heads * head_dim. Inputs of the build's dtype run
        its op; other dtypes compile the same pattern with the build's tiles."""
        attn = load(path, backend=backend)
        p = attn.problem
        if positive_int("dim", dim) != p.heads * p.head_dim:
            raise ValueError(f"dim must be heads * head_dim = {p.heads} * {p.head_dim} = {p.heads * p.head_dim} "
                             f"for the build {path}, got {dim}")
        module = cls(attn.pattern, dim, p.heads, kv_heads=p.kv_heads, qkv_bias=qkv_bias, dtype=dtype,
                     backend=backend, q_tile=attn.config.q_tile, k_tile=attn.config.k_tile)
        module.grid = p.grid
        module._compiled[(len(p.grid), p.dtype)] = attn
        return module

    def extra_repr(self) -> str:
        kv = "" if self.kv_heads == self.heads else f", kv_heads={self.kv_heads}"
        mods = "".join(f", {name}={value}" for name, value in (
            ("relative_position_bias", self.relative_position_bias_table is not None),
            ("sinks", self.sinks is not None), ("softcap", self.softcap)) if value not in (False, None))
        return (f"{self.pattern!r}, dim={self.dim}, heads={self.heads}{kv}, grid={self.grid}, "
                f"backend={self.backend!r}{mods}")

    def problem(self, grid, dtype: torch.dtype) -> Problem:
        return Problem(grid=grid, heads=self.heads, head_dim=self.head_dim, dtype=dtype, kv_heads=self.kv_heads)

    def attention(self, grid, dtype: torch.dtype, modifiers=None) -> CompiledAttention:
        """The compiled attention for grids like ``grid`` (its number of dimensions), ``dtype``
        and ``modifiers`` (default ``self.modifiers()``; their spec: parameter dtypes), compiled
        on first use, at ``grid``."""
        modifiers = self.modifiers() if modifiers is None else modifiers
        spec = tuple(m.spec() for m in modifiers)  # self.modifiers(): biases, softcap, sinks (the spec's order)
        key = (len(grid), dtype) + ((spec,) if spec else ())
        found = self._compiled.get(key)
        if found is None:
            if torch.compiler.is_compiling():
                raise RuntimeError(
                    f"SparseAttention meets a {len(grid)}-D grid in dtype {dtype} for the first time inside "
                    "torch.compile; compiling the pattern cannot be traced: give SparseAttention(grid=...) "
                    "or run the module once eagerly on such an input before compiling")
            found = compile(self.pattern, self.problem(grid, dtype), backend=self.backend, q_tile=self.q_tile,
                            k_tile=self.k_tile, modifiers=modifiers)
            self._compiled[key] = found
        return found

    def _grid_of(self, x: torch.Tensor) -> tuple[int, ...]:
        spatial = tuple(x.shape[1:-1])
        if self.grid is None:
            return spatial
        if spatial == self.grid or (len(spatial) == 1 and spatial[0] == math.prod(self.grid)):
            return self.grid
        raise ValueError(f"x has shape {tuple(x.shape)}; expected [B, *grid, C] = [B, {', '.join(map(str, self.grid))}, "
                         f"{self.dim}] or [B, {math.prod(self.grid)}, {self.dim}] for grid={self.grid}")

    def project(self, x: torch.Tensor, grid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, H, N, D] and k, v [B, kv_heads, N, D] of x [B, *grid, C] (or [B, N, C])."""
        b, n = x.shape[0], math.prod(grid)
        h, kvh, d = self.heads, self.kv_heads, self.head_dim
        q, k, v = self.qkv(x.reshape(b, n, self.dim)).split([h * d, kvh * d, kvh * d], dim=-1)
        return (q.reshape(b, n, h, d).transpose(1, 2), k.reshape(b, n, kvh, d).transpose(1, 2),
                v.reshape(b, n, kvh, d).transpose(1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not 3 <= x.dim() <= 5:
            raise ValueError(f"x must be [B, N, C], [B, H, W, C] or [B, T, H, W, C], got shape {tuple(x.shape)}")
        if x.shape[-1] != self.dim:
            raise ValueError(f"x has {x.shape[-1]} channels (last dim of shape {tuple(x.shape)}), expected dim={self.dim}")
        grid = self._grid_of(x)
        q, k, v = self.project(x, grid)
        modifiers = self.modifiers()
        attn = self.attention(grid, q.dtype, modifiers)
        out = attn(q, k, v, grid=grid, modifiers=modifiers) if modifiers else attn(q, k, v, grid=grid)
        out = out.transpose(1, 2).reshape(x.shape[0], math.prod(grid), self.dim)
        return self.proj(out).reshape(x.shape)
