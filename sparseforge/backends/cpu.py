"""The CPU executor: attention over a path's chunks (``lower.paths``), in plain torch.

It visits exactly the (query tile, key tile) pairs the schedule lists, like the generated
kernels do, so running it against the float64 reference tests the schedule itself. One
forward and one backward serve every path: a path yields ``Chunk``s of flat query rows,
flat key rows and the mask between them, and this module only gathers, multiplies and
scatters:

- softmax in float32 (float64 for float64 inputs); a query row with nothing visible gives
  zeros and LSE = -inf, never NaN;
- the backward uses the explicit FlashAttention formulas (``delta = rowsum(dO * O)``,
  ``P = exp(S - lse)``, ``dS = P * (dP - delta)``) and accumulates dK/dV into the key/value
  rows (GQA: several query heads' rows land on one key row) with ``index_add_``;
- a query is never affected by a key it may not see, nor a key's gradient by a query that
  may not see it, even when their rows hold NaN or Inf (a chunk gathers keys some of its rows
  may not see, and a probability 0 times NaN is NaN). When every input is finite (one check
  per call) the plain matmuls run; otherwise every chunk takes the contained products of
  ``dsl.semantics`` (``allowed_dot``/``allowed_sum``), exact for the pairs the mask allows.

Score modifiers (``dsl.modifiers``, ``Scores``): a chunk's rows give each pair's query head,
query token and key token (row = (batch * heads + head) * N + token), from which the bias
terms are looked up with ``dsl.modifiers.bias_lookup`` (the same index/bucket functions as the
float64 reference); per-head scale, softcap and sinks follow ``dsl.modifiers``' order. Their
gradients are summed in float64 with ``index_add_`` in the fixed chunk order (no atomics:
bitwise identical on every run); the sinks' from every row at once at the end.

Padding (``Block``): a key padding mask [B, N] removes pairs whose key or query is padding;
per-sample grids run each group of samples on its own schedule, the block's rows local to a
view of the call's tensors (``Block.samples``/``Block.tokens``) and positions measured in the
sample's grid. Rows no chunk writes output zeros with LSE -inf, or LSE = sink for a real row
when there are sinks.

Keys on a grid of their own (``Problem.kv_grid``: cross attention, decode, pooled keys,
strided queries): ``mask_chunks`` yields chunks of query rows against the keys any of them
may see, with the exact mask of ``dsl.semantics`` (queries placed on the key grid); q has Nq
tokens, k/v Nk, and the forward and backward below run unchanged on them. A key padding
mask there is bool [B, Nk] over the keys (``cross_block``): padded keys are removed, and a
query row is padding where its place among the keys is (two 1-D grids, decode over a
left-padded cache; ``dsl.semantics.cross_query_padding``).

It runs on whatever device the tensors are on (it is torch ops only), which is how the
runtime computes the rarely needed LSE-gradient correction for the Triton backends too.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable

import torch

from ..dsl.modifiers import Modifiers, bias_lookup, modifier_tensors
from ..dsl.problem import placement
from ..dsl.pattern import Pattern, as_4d
from ..dsl.problem import Problem
from ..dsl.semantics import allowed_dot, allowed_sum, cross_query_padding, make_context, masked_softmax_attention
from ..lower.paths import Chunk, Shape

__all__ = ["Block", "Scores", "attend", "attend_backward", "backward", "compute_dtype", "cross_block", "forward",
           "mask_chunks"]

#: Mask entries (batch x heads x query rows x keys) evaluated per chunk of ``mask_chunks``.
MASK_CHUNK_ELEMENTS = 1 << 22


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for inputs of ``dtype``: float64 stays float64, the rest float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _all_finite(*tensors) -> bool:
    """No NaN or Inf in any of ``tensors`` (one pass over each)."""
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _write_rows(rows: torch.Tensor, scratch: int) -> torch.Tensor:
    """Rows to write a chunk's results to: padding rows (-1) go to the scratch row."""
    return torch.where(rows >= 0, rows, torch.full_like(rows, scratch))


# ------------------------------------------------------------------------------------
# Chunks straight from the exact mask (keys on a grid of their own)
# ------------------------------------------------------------------------------------
def mask_chunks(pattern: Pattern, problem: Problem, shape: Shape, device, *, groups=None, kv_groups=None,
                chunk_elements: int = MASK_CHUNK_ELEMENTS):
    """Chunks of q [B, H, Nq, D] rows against k/v [B, KVH, Nk, D] rows under ``pattern`` on
    ``problem`` (Nq = ``problem.tokens``, Nk = ``problem.kv_tokens``; ``shape.tokens`` is Nq):
    a run of query rows of every (batch, head) at a time, against the keys any of them may see,
    with the exact mask (``dsl.semantics``; None where the gathered block is all allowed). Rows
    that see nothing are in no chunk (zeros, LSE -inf). ``groups``/``kv_groups``: the
    queries'/keys' group ids of a ``Grouped`` pattern."""
    ctx = make_context(pattern, problem, groups=groups, kv_groups=kv_groups)
    nq, nk = ctx.tokens, ctx.keys
    b, h, kvh = shape.batch, shape.heads, shape.kv_heads
    if b == 0 or nq == 0 or nk == 0:
        return
    heads = torch.arange(h, device=device)
    batch = torch.arange(b, device=device)[:, None]
    q_base = (batch * h + heads) * nq                       # [B, H]
    k_base = (batch * kvh + heads // (h // kvh)) * nk       # [B, H]
    step = max(1, chunk_elements // max(1, b * h * nk))
    keys = torch.arange(nk)
    for start in range(0, nq, step):
        rows = torch.arange(start, min(start + step, nq))
        m = as_4d(pattern.mask(ctx, rows, keys))
        m = m.expand(m.shape[0], m.shape[1], len(rows), nk)    # [1|B, 1|H, r, Nk]
        cols = m.any(-2).flatten(0, 1).any(0).nonzero().flatten()
        if len(cols) == 0:
            continue
        sub = m[..., cols]
        mask = None if bool(sub.all()) else sub.to(device)
        yield Chunk(q_base[..., None] + rows.to(device), k_base[..., None] + cols.to(device), mask)


# ------------------------------------------------------------------------------------
# What the scores hold, and where a chunk's rows are
# ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class Scores:
    """The scores beyond ``scale * q.k`` (``dsl.modifiers``): bias terms, softcap and sinks of
    ``modifiers`` (checked, holding the call's tensors) and ``head_scale`` ([H], replacing the
    float scale). ``pattern`` measures the relative position tables."""

    pattern: Pattern
    modifiers: Modifiers | None = None
    head_scale: torch.Tensor | None = None

    @property
    def biases(self):
        return () if self.modifiers is None else self.modifiers.biases

    @property
    def softcap(self) -> float | None:
        return None if self.modifiers is None or self.modifiers.softcap is None else self.modifiers.softcap.cap

    @property
    def sinks(self) -> torch.Tensor | None:
        return None if self.modifiers is None or self.modifiers.sinks is None else self.modifiers.sinks.logits

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """``dsl.modifiers.modifier_tensors`` order: what the gradients are aligned with."""
        return modifier_tensors(self.modifiers, self.head_scale)


@dataclasses.dataclass(frozen=True, eq=False)
class Block:
    """Chunks and where their rows are.

    chunks:   ``Chunk``s whose rows index the tensors [len(samples), H | KVH, n, D] of a view
              of the call (n = ``problem.tokens``): its samples ``samples`` and tokens ``tokens``;
    problem:  the grid the view's tokens live on (the positions of the bias terms), heads and
              KV heads; None: the call's (``positions`` of ``attend``);
    samples:  int64 [b], the call's batch index of each sample of the view; None: all of them;
    tokens:   int64 [n], the call's flat token of each token of the view; None: all, in order;
    key_padding: bool [B, N] (the call's samples and tokens; True = real) or None: a pair whose
              query or key is padding is removed.
    query_padding: bool [B, Nq] real query rows when the queries are not the keys' tokens (keys
              on a grid of their own, ``cross_block``); None: ``key_padding`` says for both.
    groups:   int [B, N] group ids of the call's tokens (``Grouped & pattern``) or None: a pair
              whose tokens' ids differ is removed; a negative id is in no group (an empty row),
              ``PADDED`` marks padding (a removed row).
    """

    chunks: Iterable[Chunk]
    problem: Problem | None = None
    samples: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    key_padding: torch.Tensor | None = None
    query_padding: torch.Tensor | None = None
    groups: torch.Tensor | None = None


def cross_block(chunks: Iterable[Chunk], problem: Problem, key_padding: torch.Tensor | None = None) -> Block:
    """The block of a call whose keys have a grid of their own (``problem.kv_grid``): ``chunks``
    of ``mask_chunks`` and, optionally, ``key_padding`` bool [B, Nk] over the keys (True = real;
    padded keys are removed, and query rows placed on a padded key are padding:
    ``dsl.semantics.cross_query_padding``)."""
    if key_padding is None:
        return Block(chunks)
    if not isinstance(key_padding, torch.Tensor) or key_padding.dtype != torch.bool or key_padding.dim() != 2 \
            or key_padding.shape[1] != problem.kv_tokens:
        what = f"{key_padding.dtype} {list(key_padding.shape)}" if isinstance(key_padding, torch.Tensor) else \
            type(key_padding).__name__
        raise ValueError(f"padding with kv_grid={problem.key_grid} must be a key padding mask, bool [B, Nk="
                         f"{problem.kv_tokens}] (per-sample boxes are not supported there), got {what}")
    real_q = cross_query_padding(problem, key_padding)
    if real_q is None:
        real_q = key_padding.new_ones(key_padding.shape[0], problem.tokens)
    return Block(chunks, key_padding=key_padding, query_padding=real_q)


#: The group id of a padded token (``Block.groups``): other negative ids are real tokens in no group.
PADDED = -2 ** 31


def _call_real(chunks) -> torch.Tensor | None:
    """The real query tokens [B, Nq] of a call run as one ``Block`` over the call's own rows
    with a key padding mask (what ``attend``'s ``real`` would say), else None."""
    if isinstance(chunks, (list, tuple)) and len(chunks) == 1 and isinstance(chunks[0], Block):
        block = chunks[0]
        if block.samples is not None or block.tokens is not None:
            return None
        if block.groups is not None:
            return block.groups != PADDED
        if block.key_padding is not None:
            return block.key_padding if block.query_padding is None else block.query_padding
    return None


class _Where:
    """A chunk's rows in the call: call rows (for gathers and scatters) and, on demand, the query
    head, positions (in the block's grid) and the call's batch/token of either side."""

    def __init__(self, block: Block, chunk: Chunk, n: int, heads: int, kv_heads: int, n_call: int,
                 kv_n: int | None = None):
        self.pad = chunk.q_rows < 0
        self.chunk = chunk
        self._q = chunk.q_rows.clamp_min(0)
        self._k = chunk.k_rows
        self.n, self.heads, self.kv_heads, self.n_call = n, heads, kv_heads, n_call
        self.kv_n = n if kv_n is None else kv_n  # the keys' tokens (Nk: keys on a grid of their own)
        self.block = block
        if block.samples is None and block.tokens is None:
            self.q_rows, self.k_rows = self._q, self._k
        else:
            self.q_rows = self._call_rows(self._q, heads)
            self.k_rows = self._call_rows(self._k, kv_heads)
        self.out_rows = torch.where(self.pad, torch.full_like(self.q_rows, -1), self.q_rows)

    def _call_rows(self, rows, heads):
        b, h, t = self._split(rows, heads)
        return (b * heads + h) * self.n_call + t

    def _split(self, rows, heads, n=None):
        """(call batch, head, call token) of local rows (``n`` tokens a row block: default the
        queries')."""
        n = self.n if n is None else n
        t, h, b = rows % n, (rows // n) % heads, rows // (heads * n)
        if self.block.samples is not None:
            b = self.block.samples[b]
        if self.block.tokens is not None:
            t = self.block.tokens[t]
        return b, h, t

    @functools.cached_property
    def q_head(self):
        return (self._q // self.n) % self.heads

    @functools.cached_property
    def q_pos(self):
        return self._q % self.n if self.chunk.q_tokens is None else self.chunk.q_tokens

    @functools.cached_property
    def k_pos(self):
        return self._k % self.kv_n if self.chunk.k_tokens is None else self.chunk.k_tokens

    def q_call(self):
        b, _, t = self._split(self._q, self.heads)
        return b, t

    def k_call(self):
        b, _, t = self._split(self._k, self.kv_heads, self.kv_n)
        return b, t


def _placed(chunks, positions, n: int, h: int, kvh: int, kv_n: int | None = None):
    """Every chunk placed in its block: (the problem its positions live on, its ``_Where``, its
    mask with padding applied, its real query rows). ``kv_n``: the call's key tokens (default n)."""
    for block in _blocks(chunks):
        problem = block.problem or positions
        local_n = n if block.problem is None else block.problem.tokens
        local_kv = (n if kv_n is None else kv_n) if block.problem is None else local_n
        for c in block.chunks:
            where = _Where(block, c, local_n, h, kvh, n, local_kv)
            mask, real_q = _padding_masks(block, where, c.mask)
            yield problem, where, mask, real_q


def _blocks(chunks) -> Iterable[Block]:
    """``chunks`` as blocks: a ``Chunk`` of the call's own rows is a block of one chunk."""
    for c in chunks:
        yield c if isinstance(c, Block) else Block((c,))


def _padding_masks(block: Block, where: _Where, mask):
    """(mask with padded pairs removed, bool [..., m] real query rows or None)."""
    if block.groups is not None:   # pairs within one group; a negative id: no group (padding)
        qb, qt = where.q_call()
        kb, kt = where.k_call()
        gq, gk = block.groups[qb, qt], block.groups[kb, kt]
        pairs = (gq[..., :, None] == gk[..., None, :]) & (gq >= 0)[..., :, None]
        return (pairs if mask is None else mask & pairs), gq != PADDED
    if block.key_padding is None:
        return mask, None
    kp = block.key_padding
    qb, qt = where.q_call()
    kb, kt = where.k_call()
    vq = (kp if block.query_padding is None else block.query_padding)[qb, qt]
    vk = kp[kb, kt]
    pairs = vq[..., :, None] & vk[..., None, :]
    return (pairs if mask is None else mask & pairs), vq


def _bias(scores: Scores, problem: Problem, where: _Where, ct, lookups: list | None):
    """The summed bias terms [..., m, nk] of a chunk in ``ct`` (None without any); appends
    each term's ``(index, coef)`` to ``lookups`` (the backward reuses them)."""
    if not scores.biases:
        return None
    head, qi, ki = where.q_head[..., :, None], where.q_pos[..., :, None], where.k_pos[..., None, :]
    if problem.is_cross:  # bias terms measure on the key grid, each query at its place there
        qi = placement(problem).positions(qi, problem.grid, problem.kv_grid)
        problem = problem.on_key_grid()
    total = None
    for mod in scores.biases:
        index, coef = bias_lookup(mod, scores.pattern, problem, head, qi, ki)
        (flat,) = mod.tensors()
        b = flat.reshape(-1).to(ct)[index]
        if coef is not None:
            b = b * coef.to(ct)
        total = b if total is None else total + b
        if lookups is not None:
            lookups.append((index, coef))
    return total


def _scale_of(scores: Scores | None, where: _Where, scale: float, ct):
    """A float, or the per-head scales of the chunk's query rows [..., m, 1]."""
    if scores is None or scores.head_scale is None:
        return scale
    return scores.head_scale.to(ct)[where.q_head][..., None]


def _sink_of(scores: Scores | None, where: _Where, real_rows, ct):
    if scores is None or scores.sinks is None:
        return None
    sink = scores.sinks.to(ct)[where.q_head]
    if real_rows is not None:
        sink = torch.where(real_rows, sink, torch.full_like(sink, -math.inf))
    return sink


def _real_rows(real: torch.Tensor | None, b: int, h: int, n: int) -> torch.Tensor | None:
    """bool [B * H * N] rows of real tokens (``real`` [B, N]), or None (all real)."""
    return None if real is None else real[:, None, :].expand(b, h, n).reshape(-1)


# ------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------
def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunks: Iterable[Chunk], scale: float):
    """Attention of q [B, H, N, D], k/v [B, KVH, N, D] over ``chunks``.

    Returns ``(out, lse)``: out [B, H, N, Dv] in q's dtype, lse [B, H, N] natural log,
    float32 (float64 for float64 inputs), -inf for rows with nothing visible.
    """
    return attend(q, k, v, chunks, scale)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunks, scale: float, *, scores: Scores | None = None,
           positions: Problem | None = None, real: torch.Tensor | None = None):
    """``forward`` with score modifiers and padding: ``chunks`` holds ``Chunk``s (rows of the
    call) and/or ``Block``s; ``scores`` the modifiers (None: plain ``scale * q.k``);
    ``positions`` the call's problem at its grid (the bias terms' positions of blocks without
    a problem of their own); ``real`` bool [B, N] the real tokens (None: all), whose rows no
    chunk writes get LSE = sink when there are sinks (padded rows keep -inf)."""
    ct = compute_dtype(q.dtype)
    b, h, n, d = q.shape
    kvh = k.shape[1]
    rows = b * h * n
    sinks = None if scores is None else scores.sinks
    if real is None:
        real = _call_real(chunks)
    with torch.no_grad():
        qf, kf, vf = q.reshape(-1, d).to(ct), k.reshape(-1, d).to(ct), v.reshape(-1, v.shape[-1]).to(ct)
        out = torch.zeros(rows + 1, v.shape[-1], dtype=ct, device=q.device)  # + 1 scratch row
        lse = torch.full((rows + 1,), -math.inf, dtype=ct, device=q.device)
        written = torch.zeros(rows + 1, dtype=torch.bool, device=q.device) if sinks is not None else None
        everything = torch.ones((), dtype=torch.bool, device=q.device)
        contain = not _all_finite(qf, kf, vf)
        cap = None if scores is None else scores.softcap
        for problem, where, mask, real_q in _placed(chunks, positions, n, h, kvh, k.shape[2]):
            bias = None if scores is None else _bias(scores, problem, where, ct, None)
            o, l = masked_softmax_attention(qf[where.q_rows], kf[where.k_rows], vf[where.k_rows],
                                            everything if mask is None else mask,
                                            _scale_of(scores, where, scale, ct), contain=contain, bias=bias,
                                            softcap=cap, sink=_sink_of(scores, where, real_q, ct))
            at = _write_rows(where.out_rows, rows)
            out[at] = o
            lse[at] = l
            if written is not None:
                written[at] = True
        lse, out = lse[:rows], out[:rows]
        if sinks is not None:
            # a real row no chunk visited sees nothing: its denominator is the sink alone
            fill = ~written[:rows]
            real_rows = _real_rows(real, b, h, n)
            if real_rows is not None:
                fill &= real_rows
            sink_rows = sinks.to(ct)[None, :, None].expand(b, h, n).reshape(-1)
            lse = torch.where(fill, sink_rows, lse)
    return out.view(b, h, n, v.shape[-1]).to(q.dtype), lse.view(b, h, n)


# ------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------
def backward(q, k, v, out, lse, dout, chunks: Iterable[Chunk], scale: float, dlse: torch.Tensor | None = None):
    """Gradients (dq, dk, dv) of ``forward`` given dout (and optionally the gradient of the
    LSE output, ``dlse`` [B, H, N]); each in its input's dtype. ``dout`` may be None (only
    ``dlse`` flows back)."""
    return attend_backward(q, k, v, out, lse, dout, chunks, scale, dlse=dlse)[:3]


def attend_backward(q, k, v, out, lse, dout, chunks, scale: float, *, scores: Scores | None = None,
                    positions: Problem | None = None, real: torch.Tensor | None = None,
                    dlse: torch.Tensor | None = None):
    """Gradients of ``attend``: ``(dq, dk, dv, grads)`` with ``grads`` the gradients of
    ``scores.tensors()`` (``dsl.modifiers.modifier_tensors`` order; () without scores), each
    in its tensor's dtype, summed in float64 in a fixed order (deterministic)."""
    ct = compute_dtype(q.dtype)
    b, h, n, d = q.shape
    kvh = k.shape[1]
    dv_dim = v.shape[-1]
    rows = b * h * n
    dev = q.device
    with torch.no_grad():
        qf, kf, vf = q.reshape(-1, d).to(ct), k.reshape(-1, d).to(ct), v.reshape(-1, dv_dim).to(ct)
        dof = torch.zeros(rows, dv_dim, dtype=ct, device=dev) if dout is None else dout.reshape(-1, dv_dim).to(ct)
        delta = (dof * out.reshape(-1, dv_dim).to(ct)).sum(-1)
        if dlse is not None:
            delta = delta - dlse.reshape(-1).to(ct)
        # Rows with nothing visible have lse = -inf; +inf makes exp(S - lse) = 0 there.
        lse_raw = lse.reshape(-1).to(ct)
        lse_c = torch.where(lse_raw == -math.inf, torch.full_like(lse_raw, math.inf), lse_raw)
        dq = torch.zeros(rows + 1, d, dtype=ct, device=dev)  # + 1 scratch row
        dk = torch.zeros_like(kf)
        dv = torch.zeros_like(vf)
        # lse is -inf on empty rows (now +inf); anything else non-finite comes from NaN/Inf inputs
        contain = not (_all_finite(qf, kf, vf, dof, delta) and bool((lse_c > -math.inf).all()))
        grads = _Grads(scores, dev)
        cap = None if scores is None else scores.softcap
        for problem, where, mask, _ in _placed(chunks, positions, n, h, kvh, k.shape[2]):
            qi, ki = where.q_rows, where.k_rows
            qg, dog = qf[qi], dof[qi]                       # [..., m, D]
            kg, vg = kf[ki], vf[ki]                         # [..., nk, D]
            lookups = [] if grads.biases else None
            bias = None if scores is None else _bias(scores, problem, where, ct, lookups)
            sc = _scale_of(scores, where, scale, ct)
            contained = contain and mask is not None
            if contained:
                s_raw = allowed_dot(qg, kg, mask)
            else:
                s_raw = torch.matmul(qg, kg.transpose(-1, -2))
            s = s_raw * sc
            if bias is not None:
                s = s + (bias if mask is None else torch.where(mask, bias, 0))
            t = None
            if cap is not None:
                t = torch.tanh(s / cap)
                s = cap * t
            if mask is not None:
                s = s.masked_fill(~mask, -math.inf)
            p = torch.exp(s - lse_c[qi][..., None])          # masked entries: exp(-inf) = 0
            if contained:
                p = torch.where(mask, p, 0)
                dp = allowed_dot(dog, vg, mask)
            else:
                dp = torch.matmul(dog, vg.transpose(-1, -2))
            ds = p * (dp - delta[qi][..., None])
            if t is not None:
                ds = ds * (1 - t * t)                        # through the softcap
            if mask is not None and (contained or t is not None or bias is not None):
                ds = torch.where(mask, ds, 0)
            # a float scale multiplies the products (as without modifiers); per-head scales
            # are per query row: they scale dS's rows before dK's product
            per_row = isinstance(sc, torch.Tensor)
            dsk = (ds * sc if per_row else ds).transpose(-1, -2)
            if contained:
                mask_t = mask.transpose(-1, -2)
                dq_c = allowed_sum(ds, kg, mask) * sc
                dk_c = allowed_sum(dsk, qg, mask_t)
                dv_c = allowed_sum(p.transpose(-1, -2), dog, mask_t)
            else:
                dq_c = torch.matmul(ds, kg) * sc
                dk_c = torch.matmul(dsk, qg)
                dv_c = torch.matmul(p.transpose(-1, -2), dog)
            if not per_row:
                dk_c = dk_c * sc
            dq[_write_rows(where.out_rows, rows)] = dq_c
            flat = ki.reshape(-1)
            dk.index_add_(0, flat, dk_c.reshape(-1, d))
            dv.index_add_(0, flat, dv_c.reshape(-1, dv_dim))
            grads.chunk(where, ds, s_raw, lookups)
        grads.sinks(lse_raw, delta, b, h, n)
    return (dq[:rows].view(q.shape).to(q.dtype), dk.view(k.shape).to(k.dtype), dv.view(v.shape).to(v.dtype),
            grads.result())


class _Grads:
    """The modifier tensors' gradients, summed in float64 with ``index_add_`` in chunk order."""

    def __init__(self, scores: Scores | None, device):
        self.scores = scores
        f64 = torch.float64
        self.biases = [] if scores is None else [torch.zeros(m.tensors()[0].numel(), dtype=f64, device=device)
                                                 for m in scores.biases]
        self.sink = None if scores is None or scores.sinks is None else \
            torch.zeros(scores.sinks.numel(), dtype=f64, device=device)
        self.head_scale = None if scores is None or scores.head_scale is None else \
            torch.zeros(scores.head_scale.numel(), dtype=f64, device=device)

    def chunk(self, where: _Where, ds: torch.Tensor, s_raw: torch.Tensor, lookups) -> None:
        """Add one chunk's terms: ``ds`` [..., m, nk] the gradient of the scores before the
        softcap (0 at removed pairs), ``s_raw`` = q.k."""
        if self.head_scale is not None:
            per_row = (ds.double() * s_raw.double()).sum(-1)            # [..., m]
            head = where.q_head.expand(per_row.shape)
            self.head_scale.index_add_(0, head.reshape(-1), per_row.reshape(-1))
        for acc, (index, coef) in zip(self.biases, lookups or ()):
            g = ds.double()
            if coef is not None:
                g = g * coef
            idx = index.expand(g.shape) if index.shape != g.shape else index
            acc.index_add_(0, idx.reshape(-1), g.reshape(-1))

    def sinks(self, lse: torch.Tensor, delta: torch.Tensor, b: int, h: int, n: int) -> None:
        """d sink_h = -sum over the rows of head h of exp(sink_h - lse) * delta (rows with
        LSE = -inf, padding, give nothing)."""
        if self.sink is None:
            return
        sink = self.scores.sinks.to(lse.dtype)[None, :, None]
        lse3, delta3 = lse.view(b, h, n), delta.view(b, h, n)
        finite = torch.isfinite(lse3)
        p = torch.exp(sink - torch.where(finite, lse3, torch.zeros_like(lse3)))
        terms = torch.where(finite, -(p.double() * delta3.double()), 0)
        self.sink += terms.sum(dim=(0, 2))

    def result(self) -> tuple[torch.Tensor, ...]:
        if self.scores is None:
            return ()
        out = []
        for acc, m in zip(self.biases, self.scores.biases):
            (t,) = m.tensors()
            out.append(acc.view(t.shape).to(t.dtype))
        if self.sink is not None:
            out.append(self.sink.to(self.scores.sinks.dtype))
        if self.head_scale is not None:
            out.append(self.head_scale.to(self.scores.head_scale.dtype))
        return tuple(out)
