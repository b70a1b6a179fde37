"""Families defined on the flat (row-major) token index: Full, Causal, Sink, GlobalTokens,
Documents and StridedShards (S2-Attention / DKernel).

Indices are key positions: a query's is ``ctx.query_positions(qi)`` (with 1-D ``kv_grid``
the queries are the last Nq positions of the keys' sequence, ``dsl.problem.placement``), so
decode and chunked prefill are the bottom rows of the self-attention mask on the keys'
sequence. Full, Sink and the key side of GlobalTokens read no query position."""
from __future__ import annotations

import dataclasses

import torch

from .args import positive_int
from .pattern import Pattern


@dataclasses.dataclass(frozen=True, repr=False)
class Full(Pattern):
    """Every query sees every key."""

    reads_query_positions = False

    def mask(self, ctx, qi, ki):
        return torch.ones(len(qi), len(ki), dtype=torch.bool)


@dataclasses.dataclass(frozen=True, repr=False)
class Causal(Pattern):
    """Key ``k`` is visible to query ``q`` iff ``k <= q`` (flat row-major index)."""

    def mask(self, ctx, qi, ki):
        return ki[None, :] <= ctx.query_positions(qi)[:, None]


@dataclasses.dataclass(frozen=True, repr=False)
class Sink(Pattern):
    """The first ``n`` keys (flat index) are visible to every query."""

    reads_query_positions = False

    n: int

    def __post_init__(self):
        positive_int("n", self.n)

    def check(self, problem):
        if self.n > problem.tokens:
            raise ValueError(f"Sink n={self.n} is larger than the number of tokens {problem.tokens}")

    def mask(self, ctx, qi, ki):
        return (ki < self.n)[None, :].expand(len(qi), len(ki))


@dataclasses.dataclass(frozen=True, repr=False)
class GlobalTokens(Pattern):
    """The tokens at flat ``indices`` see every key and are seen by every query.

    ``indices`` are positions on the key grid. A query is global when its position
    (``ctx.query_positions``) is one of them; where the query and key grids give the queries
    no position (``dsl.problem.placement``: e.g. a 2-D query grid against 1-D keys) the
    indices name keys only: they are seen by every query, and no query row is global.
    """

    reads_query_positions = False

    indices: tuple[int, ...]

    def __post_init__(self):
        idx = self.indices
        if isinstance(idx, int) or not isinstance(idx, (list, tuple)) or not idx:
            raise TypeError(f"indices must be a non-empty list of token indices, got {idx!r}")
        idx = tuple(positive_int(f"indices[{i}]", v, minimum=0) for i, v in enumerate(idx))
        if len(set(idx)) != len(idx):
            raise ValueError(f"indices must not repeat a token, got {idx!r}")
        object.__setattr__(self, "indices", tuple(sorted(idx)))

    def check(self, problem):
        if self.indices[-1] >= problem.tokens:
            raise ValueError(f"GlobalTokens index {self.indices[-1]} is out of range for {problem.tokens} tokens")

    def mask(self, ctx, qi, ki):
        g = torch.tensor(self.indices, dtype=torch.long)
        keys = torch.isin(ki, g)[None, :]
        if not ctx.aligned:
            return keys.expand(len(qi), len(ki))
        return torch.isin(ctx.query_positions(qi), g)[:, None] | keys


@dataclasses.dataclass(frozen=True, repr=False)
class Documents(Pattern):
    """Packed sequences: tokens see only tokens of their own document.

    lengths: token count of each document, in order; they must add up to N.
    """

    lengths: tuple[int, ...]

    def __post_init__(self):
        ls = self.lengths
        if isinstance(ls, int) or not isinstance(ls, (list, tuple)) or not ls:
            raise TypeError(f"lengths must be a non-empty list of document lengths, got {ls!r}")
        object.__setattr__(self, "lengths", tuple(positive_int(f"lengths[{i}]", v) for i, v in enumerate(ls)))

    def check(self, problem):
        if sum(self.lengths) != problem.tokens:
            raise ValueError(f"Documents lengths add up to {sum(self.lengths)} but the problem has "
                             f"{problem.tokens} tokens; they must be equal")

    def document_of(self, idx: torch.Tensor) -> torch.Tensor:
        ends = torch.tensor(self.lengths, dtype=torch.long).cumsum(0)
        return torch.searchsorted(ends, idx, right=True)

    def mask(self, ctx, qi, ki):
        return self.document_of(ctx.query_positions(qi))[:, None] == self.document_of(ki)[None, :]


# ------------------------------------------------------------------------------------
# S2-Attention / DKernel
# ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, repr=False)
class StridedShards(Pattern):
    """S2-Attention "local + vertical stride" block sparsity, exactly DKernel's layout.

    Tokens are cut into blocks of ``block_size`` (flat index; a ragged last block is
    truncated). ``local_blocks`` is an int or a ``(left, right)`` pair, both counting the
    current block (an int means ``(n, 1)`` when causal, ``(n, n)`` otherwise); key block
    ``kb`` is local to query block ``qb`` iff ``qb - kb < left`` and ``kb - qb < right``.

    - causal (absolute positions): ``kb`` is also visible when
      ``(kb + h * step) % vertical_stride == 0``, where ``h`` is the key/value head and
      ``step = max(1, vertical_stride // heads)`` (``heads``: the query heads, as DKernel
      computes it) with ``heterogeneous`` heads (0 otherwise), so key/value heads take
      different shards; their union covers every shard only when ``kv_heads * step >=
      vertical_stride`` (with GQA it may not); then ``k <= q`` is applied per token.
    - bidirectional (relative positions): ``kb`` is visible iff ``(lm + rm) % vertical_stride
      == 0`` with ``lm = max(qb - kb - left + 1, 0)`` and ``rm = max(kb - qb - right + 1, 0)``
      (the local window included); as in DKernel every head has this layout.
    - the last ``dense_heads`` key/value heads are dense (still causal when ``causal``).
    """

    block_size: int
    local_blocks: int | tuple[int, int]
    vertical_stride: int
    heterogeneous: bool = True
    dense_heads: int = 0
    causal: bool = True

    def __post_init__(self):
        positive_int("block_size", self.block_size)
        positive_int("vertical_stride", self.vertical_stride)
        positive_int("dense_heads", self.dense_heads, minimum=0)
        lb = self.local_blocks
        if isinstance(lb, (list, tuple)):
            if len(lb) != 2:
                raise ValueError(f"local_blocks must be an int or a (left, right) pair, got {lb!r}")
            lb = (positive_int("local_blocks[0]", lb[0]), positive_int("local_blocks[1]", lb[1]))
        else:
            lb = positive_int("local_blocks", lb)
        object.__setattr__(self, "local_blocks", lb)
        for name in ("heterogeneous", "causal"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")

    def check(self, problem):
        if self.dense_heads > problem.kv_heads:
            raise ValueError(f"dense_heads={self.dense_heads} is more than the {problem.kv_heads} key/value heads")

    @property
    def local_pair(self) -> tuple[int, int]:
        """(left, right) local-block counts, both including the current block."""
        lb = self.local_blocks
        if isinstance(lb, tuple):
            return lb
        return (lb, 1) if self.causal else (lb, lb)

    def head_step(self, heads: int) -> int:
        return max(1, self.vertical_stride // heads) if self.heterogeneous else 0

    def block_mask(self, problem, qb: torch.Tensor, kb: torch.Tensor) -> torch.Tensor:
        """Bool [heads, nq, nk] block layout for query blocks qb [nq] and key blocks kb [nk]."""
        left, right = self.local_pair
        diff = qb[:, None] - kb[None, :]
        if self.causal:
            kv_head = torch.arange(problem.heads) // (problem.heads // problem.kv_heads)
            shift = (kv_head * self.head_step(problem.heads))[:, None, None]
            local = (diff < left) & (-diff < right)
            layout = local[None] | ((kb[None, None, :] + shift) % self.vertical_stride == 0)
        else:
            lm = torch.clamp(diff - left + 1, min=0)
            rm = torch.clamp(-diff - right + 1, min=0)
            layout = ((lm + rm) % self.vertical_stride == 0)[None].expand(problem.heads, -1, -1).clone()
        if self.dense_heads:
            group = problem.heads // problem.kv_heads
            layout[(problem.kv_heads - self.dense_heads) * group:] = True
        return layout

    def mask(self, ctx, qi, ki):
        qp = ctx.query_positions(qi)
        m = self.block_mask(ctx.problem, qp // self.block_size, ki // self.block_size)
        if self.causal:
            m = m & (ki[None, :] <= qp[:, None])[None]
        return m
