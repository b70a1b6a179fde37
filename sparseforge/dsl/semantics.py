"""Exact semantics: dense masks, the float64 reference attention and pattern statistics.

This module is the oracle every kernel is tested against; it favours obviousness over
speed, but works in query-row chunks so that statistics of large problems fit in memory.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from .budget import check_dense_mask, check_mask_rows
from .content import Scattered, check_coords, check_groups
from .modifiers import Modifiers, check_modifiers, check_scale
from .pattern import MaskContext, Pattern, as_4d
from .problem import Problem, placement

# Largest number of mask elements materialised at once by the chunked helpers.
CHUNK_ELEMENTS = 1 << 26


def check_pattern_problem(pattern, problem) -> None:
    """TypeError unless ``pattern`` is a Pattern and ``problem`` a Problem."""
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a sparseforge Pattern, got {pattern!r} ({type(pattern).__name__})")
    if not isinstance(problem, Problem):
        raise TypeError(f"problem must be a sparseforge Problem, got {problem!r} ({type(problem).__name__})")


def make_context(pattern: Pattern, problem: Problem, *, q=None, k=None, coords=None, routes=None,
                 groups=None, kv_groups=None) -> MaskContext:
    """Check ``pattern`` against ``problem`` and the run-time inputs; build the mask context.

    A problem whose keys have a grid of their own (``kv_grid``) is checked as self attention
    on the key grid (``Problem.on_key_grid``), with the queries placed on it
    (``check_cross``). ``kv_groups``: the keys' group ids of a ``Grouped`` pattern (needed
    with a ``kv_grid``; otherwise optional, default ``groups``)."""
    check_pattern_problem(pattern, problem)
    for name, t in (("q", q), ("k", k)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if problem.is_cross:
        return _cross_context(pattern, problem, q=q, groups=groups, kv_groups=kv_groups)
    needs = pattern.inputs_needed()
    if kv_groups is not None and "groups" not in needs:
        raise ValueError(f"kv_groups is for Grouped patterns; {pattern!r} reads none")
    grid_free = all(not p.needs_grid for p in pattern.walk() if not p.children())
    if problem.grid is None and not grid_free:
        raise ValueError(f"{pattern!r} is defined on a token grid: give Problem(grid=...)")
    if "coords" in needs:
        if coords is None:
            raise ValueError(f"{pattern!r} needs voxel coordinates: pass coords= (int [N, 1 + ndim], batch first)")
        coords = check_coords(coords)
        for leaf in pattern.walk():
            if hasattr(leaf, "check_rank"):
                leaf.check_rank(coords)
        tokens = coords.shape[0]
        if problem.grid is not None and tokens != problem.tokens:
            raise ValueError(f"coords has {tokens} voxels but the problem grid has {problem.tokens} tokens")
    else:
        tokens = problem.tokens
    pattern.check(problem)
    if "groups" in needs:
        if groups is None:
            raise ValueError(f"{pattern!r} needs group ids: pass groups= (int [B, N] or [B, H, N])")
        batch = q.shape[0] if isinstance(q, torch.Tensor) and q.dim() == 4 else None
        groups = check_groups(groups, batch, problem.heads, tokens)
        if kv_groups is not None:
            kv_groups = check_groups(kv_groups, groups.shape[0], problem.heads, tokens, name="kv_groups")
    q64 = k64 = None
    if "qk" in needs and routes is None:
        if q is None or k is None:
            raise ValueError(f"{pattern!r} routes on content: pass q= and k= ([B, H, N, D]) or routes=")
        _check_routing_qk(q, k, problem, tokens)
        q64, k64 = q.detach().double().cpu(), k.detach().double().cpu()
        if k64.shape[1] != q64.shape[1]:
            k64 = k64.repeat_interleave(q64.shape[1] // k64.shape[1], dim=1)
    elif q is not None:
        q64 = q.detach()
    return MaskContext(problem=problem, tokens=tokens, q=q64, k=k64, coords=coords, routes=routes, groups=groups,
                       kv_groups=kv_groups)


def check_cross(pattern: Pattern, problem: Problem) -> None:
    """Refuse, naming the family and the grids, a pattern that ``problem``'s two grids do not
    define: content-routed and voxel patterns (one set of tokens), and patterns that read
    query positions where the grids give the queries none (``dsl.problem.placement``); then
    check the pattern as self attention on the key grid."""
    for leaf in pattern.walk():
        if leaf.children():
            continue
        if not leaf.needs_grid or "qk" in leaf.inputs_needed():
            raise ValueError(f"{type(leaf).__name__} ({leaf!r}) is defined on one set of tokens, but {problem!r} "
                             f"has keys on a grid of their own (kv_grid={problem.kv_grid}); give no kv_grid")
    place = placement(problem)
    if not place.aligned:
        for leaf in pattern.walk():
            if leaf.children() or not leaf.needs_placement():
                continue
            raise ValueError(f"{type(leaf).__name__} ({leaf!r}) reads query positions, but grid={problem.grid} and "
                             f"kv_grid={problem.kv_grid} give the queries no place on the key grid: {place.reason}. "
                             "Full, Sink, GlobalTokens (on keys) and Grouped without causal take any pair of grids")
    pattern.check(problem.on_key_grid())


def _cross_context(pattern: Pattern, problem: Problem, *, q=None, groups=None, kv_groups=None) -> MaskContext:
    """The mask context of a problem whose keys have a grid of their own."""
    check_cross(pattern, problem)
    nq, nk = problem.tokens, problem.kv_tokens
    if "groups" in pattern.inputs_needed():
        if groups is None or kv_groups is None:
            missing = "groups" if groups is None else "kv_groups"
            raise ValueError(f"{pattern!r} needs group ids of the queries and of the keys on {problem!r}: pass "
                             f"groups= (int [B, Nq={nq}] or [B, H, Nq]) and kv_groups= (int [B, Nk={nk}] or "
                             f"[B, H, Nk]); {missing} is missing")
        batch = q.shape[0] if isinstance(q, torch.Tensor) and q.dim() == 4 else None
        groups = check_groups(groups, batch, problem.heads, nq)
        kv_groups = check_groups(kv_groups, groups.shape[0], problem.heads, nk, name="kv_groups")
    elif kv_groups is not None:
        raise ValueError(f"kv_groups is for Grouped patterns; {pattern!r} reads none")
    return MaskContext(problem=problem.on_key_grid(), tokens=nq, q=None if q is None else q.detach(), groups=groups,
                       kv_tokens=nk, given=problem, placement=placement(problem), kv_groups=kv_groups)


def _check_routing_qk(q: torch.Tensor, k: torch.Tensor, problem: Problem, tokens: int) -> None:
    """q [B, H, N, D] and k [B, kv_heads or H, N, D], floating, for routing on content."""
    for name, t in (("q", q), ("k", k)):
        if not t.is_floating_point():
            raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape [B, H, N, D], got {tuple(t.shape)}")
        if t.device.type == "meta":
            raise ValueError(f"{name} is on the meta device, but routing on content for the exact mask "
                             f"(dense_mask, reference_attention) needs its values: pass q and k holding data")
    b, h, n, d = q.shape
    if (h, n) != (problem.heads, tokens):
        raise ValueError(f"q has shape {tuple(q.shape)}, expected [B, H={problem.heads}, N={tokens}, D] "
                         f"for {problem!r}")
    if k.shape[0] != b or k.shape[1] not in (problem.kv_heads, problem.heads) or k.shape[2:] != (n, d):
        raise ValueError(f"k has shape {tuple(k.shape)}, expected [B={b}, kv_heads={problem.kv_heads}, "
                         f"N={tokens}, D={d}] to match q {tuple(q.shape)} for {problem!r}")


def mask_rows(pattern: Pattern, ctx: MaskContext, rows: torch.Tensor) -> torch.Tensor:
    """Bool [B|1, H, len(rows), Nk]: the mask of the given query rows against every key."""
    keys = torch.arange(ctx.keys)
    m = as_4d(pattern.mask(ctx, rows, keys))
    return m.expand(m.shape[0], ctx.problem.heads, len(rows), ctx.keys)


def _row_chunks(ctx: MaskContext):
    per_row = max(1, ctx.problem.heads * ctx.keys)
    step = max(1, CHUNK_ELEMENTS // per_row)
    for start in range(0, ctx.tokens, step):
        yield torch.arange(start, min(start + step, ctx.tokens))


def dense_mask(pattern: Pattern, problem: Problem, *, q=None, k=None, coords=None, routes=None,
               groups=None, kv_groups=None) -> torch.Tensor:
    """The exact mask: bool [H, Nq, Nk], or [B, H, Nq, Nk] for patterns that route on q/k or
    read group ids (Nq = Nk = N unless the problem has a ``kv_grid``).

    ``q``/``k`` ([B, H, N, D]) are needed by ``Routed`` (or ``routes``), ``coords`` by
    ``Scattered``, ``groups`` by ``Grouped`` (with a ``kv_grid``: ``groups`` the queries' ids,
    ``kv_groups`` the keys'); they are ignored by static patterns.

    With a ``kv_grid`` the pattern is evaluated as self attention on the key grid, each query
    at its place there (``dsl.problem.placement``): row i is the key-grid row of query i's
    position (for 1-D decode, the last Nq rows of the mask on Nk tokens).
    """
    ctx = make_context(pattern, problem, q=q, k=k, coords=coords, routes=routes, groups=groups,
                       kv_groups=kv_groups)
    check_dense_mask(pattern, ctx, CHUNK_ELEMENTS)
    keys, m = torch.arange(ctx.keys), None
    for rows in list(_row_chunks(ctx)) or [torch.arange(0)]:  # a chunk of rows at a time; heads stay shared
        part = as_4d(pattern.mask(ctx, rows, keys)).expand(-1, -1, len(rows), ctx.keys)
        if m is None:
            m = torch.empty(*part.shape[:2], ctx.tokens, ctx.keys, dtype=torch.bool)
        start = int(rows[0]) if len(rows) else 0
        m[:, :, start:start + len(rows)] = part
    m = m.expand(m.shape[0], problem.heads, ctx.tokens, ctx.keys)
    needs = pattern.inputs_needed()
    if "groups" in needs:
        return m.expand(ctx.groups.shape[0], *m.shape[1:])
    return m if "qk" in needs else m[0]


# ------------------------------------------------------------------------------------
# Reference attention
# ------------------------------------------------------------------------------------
def check_qkv(q, k, v, problem: Problem, *, tokens: int | None = None, names=("q", "k", "v"),
              kv_tokens: int | None = None) -> None:
    """Check q [B, H, Nq, D], k/v [B, kv_heads, Nk, D] against ``problem``; errors name the argument.

    ``tokens`` (Nq) defaults to ``problem.tokens``; ``kv_tokens`` (Nk) to ``problem.kv_tokens``
    for a problem with a ``kv_grid``, else to ``tokens``."""
    for name, t in zip(names, (q, k, v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape [B, H, N, D], got {tuple(t.shape)}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    n = problem.tokens if tokens is None else tokens
    if kv_tokens is None:
        kv_tokens = problem.kv_tokens if problem.is_cross else n
    b, h, nq, d = q.shape
    expected = {names[0]: (b, problem.heads, n, problem.head_dim),
                names[1]: (b, problem.kv_heads, kv_tokens, problem.head_dim),
                names[2]: (b, problem.kv_heads, kv_tokens, problem.head_dim)}
    for name, t in zip(names, (q, k, v)):
        if tuple(t.shape) != expected[name]:
            dims = "H, Nq" if name == names[0] else "kv_heads, Nk"
            if n == kv_tokens:
                dims = "H, N" if name == names[0] else "kv_heads, N"
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {expected[name]} "
                             f"[B, {dims}, D] for {problem!r}")


# ------------------------------------------------------------------------------------
# Products over allowed pairs only: a key a query may not see never reaches it
# ------------------------------------------------------------------------------------
# Elements of one batch of the non-finite corrections below (entries x rows).
CORRECTION_ELEMENTS = 1 << 22


def finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    """``x`` with its NaN and +-Inf entries replaced by 0."""
    return torch.where(torch.isfinite(x), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _flat3(t: torch.Tensor, lead, rows: int, cols: int) -> torch.Tensor:
    """``t`` broadcast to [*lead, rows, cols], as [prod(lead), rows, cols] (a copy if broadcast)."""
    return t.expand(*lead, rows, cols).reshape(-1, rows, cols)


def _batches(n: int, per_entry: int):
    step = max(1, CORRECTION_ELEMENTS // max(1, per_entry))
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


def _allowed_dot(a, b, mask):
    """Forward of ``allowed_dot`` (no autograd)."""
    bad_a, bad_b = ~torch.isfinite(a), ~torch.isfinite(b)
    if not (bool(bad_a.any()) or bool(bad_b.any())):
        return torch.where(mask, a @ b.transpose(-1, -2), 0)
    m, n, d = a.shape[-2], b.shape[-2], a.shape[-1]
    lead = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2], mask.shape[:-2])
    A, B, M = _flat3(a, lead, m, d), _flat3(b, lead, n, d), _flat3(mask, lead, m, n)
    # the finite terms in one product; then each non-finite entry adds its own terms, at
    # allowed pairs only (a term with a non-finite a_id once, the rest with their b_jd)
    S = _flat3(finite_or_zero(a) @ finite_or_zero(b).transpose(-1, -2), lead, m, n).clone()
    finite_a = ~_flat3(bad_a, lead, m, d)
    l, i, dd = (~finite_a).nonzero(as_tuple=True)
    for sl in _batches(len(l), n):
        terms = A[l[sl], i[sl], dd[sl]][:, None] * B[l[sl], :, dd[sl]]                  # [E, n]
        S.index_put_((l[sl], i[sl]), torch.where(M[l[sl], i[sl]], terms, 0), accumulate=True)
    l, j, dd = _flat3(bad_b, lead, n, d).nonzero(as_tuple=True)
    St = S.transpose(1, 2)
    for sl in _batches(len(l), m):
        terms = A[l[sl], :, dd[sl]] * B[l[sl], j[sl], dd[sl]][:, None]                  # [E, m]
        keep = M[l[sl], :, j[sl]] & finite_a[l[sl], :, dd[sl]]
        St.index_put_((l[sl], j[sl]), torch.where(keep, terms, 0), accumulate=True)
    return torch.where(M, S, 0).view(*lead, m, n)


def _allowed_sum(w, x, mask):
    """Forward of ``allowed_sum`` (no autograd)."""
    w = torch.where(mask, w, 0)
    bad_w, bad_x = ~torch.isfinite(w), ~torch.isfinite(x)
    if not (bool(bad_w.any()) or bool(bad_x.any())):
        return w @ x
    m, n, d = w.shape[-2], x.shape[-2], x.shape[-1]
    lead = torch.broadcast_shapes(w.shape[:-2], x.shape[:-2])
    W, X, M = _flat3(w, lead, m, n), _flat3(x, lead, n, d), _flat3(mask, lead, m, n)
    O = _flat3(finite_or_zero(w) @ finite_or_zero(x), lead, m, d).clone()
    finite_w = ~_flat3(bad_w, lead, m, n)
    l, i, j = (~finite_w).nonzero(as_tuple=True)     # allowed pairs with a non-finite weight
    for sl in _batches(len(l), d):
        O.index_put_((l[sl], i[sl]), W[l[sl], i[sl], j[sl]][:, None] * X[l[sl], j[sl]], accumulate=True)
    l, j, dd = _flat3(bad_x, lead, n, d).nonzero(as_tuple=True)
    Ot = O.transpose(1, 2)
    for sl in _batches(len(l), m):
        terms = W[l[sl], :, j[sl]] * X[l[sl], j[sl], dd[sl]][:, None]                   # [E, m]
        keep = M[l[sl], :, j[sl]] & finite_w[l[sl], :, j[sl]]
        Ot.index_put_((l[sl], dd[sl]), torch.where(keep, terms, 0), accumulate=True)
    return O.view(*lead, m, d)


class _AllowedDot(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, mask):
        ctx.save_for_backward(a, b, mask)
        return _allowed_dot(a, b, mask)

    @staticmethod
    def backward(ctx, g):
        a, b, mask = ctx.saved_tensors
        ga = allowed_sum(g, b, mask).sum_to_size(a.shape) if ctx.needs_input_grad[0] else None
        gb = allowed_sum(g.transpose(-1, -2), a, mask.transpose(-1, -2)).sum_to_size(b.shape) \
            if ctx.needs_input_grad[1] else None
        return ga, gb, None


class _AllowedSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, x, mask):
        ctx.save_for_backward(w, x, mask)
        return _allowed_sum(w, x, mask)

    @staticmethod
    def backward(ctx, g):
        w, x, mask = ctx.saved_tensors
        gw = allowed_dot(g, x, mask).sum_to_size(w.shape) if ctx.needs_input_grad[0] else None
        gx = allowed_sum(w.transpose(-1, -2), g, mask.transpose(-1, -2)).sum_to_size(x.shape) \
            if ctx.needs_input_grad[1] else None
        return gw, gx, None


def _pair_mask(mask, m: int, n: int):
    """None (every pair allowed) or a bool tensor of at least 2 dims broadcastable to [..., m, n]."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor or None, got {mask!r}")
    if mask.dim() == 0 and bool(mask):
        return None
    torch.broadcast_shapes(mask.shape[-2:], (m, n))  # raises unless it broadcasts
    return mask.reshape((1,) * max(0, 2 - mask.dim()) + tuple(mask.shape))


def allowed_dot(a: torch.Tensor, b: torch.Tensor, mask) -> torch.Tensor:
    """[..., m, n]: a_i . b_j (a [..., m, D], b [..., n, D]) where ``mask`` (bool, broadcastable
    to [..., m, n]; None: everywhere) allows the pair, exactly 0 where it does not.

    A row's NaN or Inf reaches only the pairs it is allowed in — a plain matmul would spread a
    non-finite b_j to every a_i (and 0 * NaN is NaN). Exact: finite inputs give the plain
    product, non-finite terms follow IEEE arithmetic at allowed pairs. Differentiable, and the
    gradients are contained the same way (a pair the mask excludes passes no gradient, not even
    a NaN one)."""
    mask = _pair_mask(mask, a.shape[-2], b.shape[-2])
    if mask is None:
        return a @ b.transpose(-1, -2)
    return _AllowedDot.apply(a, b, mask)


def allowed_sum(w: torch.Tensor, x: torch.Tensor, mask) -> torch.Tensor:
    """[..., m, D]: sum_j w_ij x_j (w [..., m, n], x [..., n, D]) over the j that ``mask``
    (bool, broadcastable to [..., m, n]; None: all) allows for row i.

    Neither a weight nor a row of x that the mask excludes contributes, even when it is NaN or
    Inf (a plain matmul multiplies a weight 0 by a NaN x_j into NaN). Exact as ``allowed_dot``;
    differentiable with contained gradients."""
    mask = _pair_mask(mask, w.shape[-2], w.shape[-1])
    if mask is None:
        return w @ x
    return _AllowedSum.apply(w, x, mask)


def masked_softmax_attention(q, k, v, mask, scale, *, contain: bool = True, bias=None, softcap=None, sink=None):
    """Attention with a boolean mask; empty rows give zeros and LSE = -inf, never NaN.

    q [..., Nq, D], k/v [..., Nk, D], mask broadcastable to [..., Nq, Nk]. Differentiable.
    Returns (out [..., Nq, D], lse [..., Nq]) with lse in natural log.

    A key a query may not see never affects it, nor its gradients, even when the key's k or
    v (or a masked query's q) hold NaN or Inf (``allowed_dot``/``allowed_sum``); a key it
    sees propagates them. ``contain=False`` uses plain matmuls instead: the same results and
    faster, but only when q, k and v are all finite (callers that checked this).

    Score modifiers (``dsl.modifiers``), in this order: ``scale`` (a float or a tensor
    broadcastable to the scores, e.g. [1, H, 1, 1]); ``bias`` (broadcastable to [..., Nq, Nk],
    added at allowed pairs only: its values elsewhere are never read); ``softcap`` (a float:
    ``s -> softcap * tanh(s / softcap)``); the mask; ``sink`` (logits broadcastable to
    [..., Nq], -inf for none) joins the softmax's denominator with no value, and the LSE
    counts it (an empty row with a finite sink outputs zeros with LSE = sink).
    """
    if contain:
        s = allowed_dot(q, k, mask) * scale
    else:
        s = (q @ k.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + torch.where(mask, bias, torch.zeros((), dtype=s.dtype, device=s.device))
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = torch.where(mask, s, torch.full_like(s, -math.inf))
    m = s.amax(-1, keepdim=True)
    if sink is not None:
        sink = sink.to(s.dtype).unsqueeze(-1)
        m = torch.maximum(m, sink)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    den = e.sum(-1, keepdim=True)
    if sink is not None:
        den = den + torch.exp(sink - m)
    p = e / den.clamp_min(torch.finfo(den.dtype).tiny)
    lse = (m + torch.log(den)).squeeze(-1)
    return (allowed_sum(p, v, mask) if contain else p @ v), lse


def check_key_padding_mask(m, batch: int, tokens: int, device) -> torch.Tensor:
    """``key_padding_mask``: a bool [batch, tokens] tensor on ``device`` (True = real token)."""
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"key_padding_mask must be a bool tensor [B, N], got {type(m).__name__}")
    if m.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be a bool tensor (True = real token), got {m.dtype}")
    if tuple(m.shape) != (batch, tokens):
        raise ValueError(f"key_padding_mask has shape {list(m.shape)}, expected [B={batch}, N={tokens}]")
    if m.device != torch.device(device):
        raise ValueError(f"key_padding_mask is on {m.device}, but q is on {device}; expected one device")
    return m


def reference_attention(q, k, v, pattern: Pattern, problem: Problem, *, scale=None,
                        coords=None, routes=None, groups=None, return_lse: bool = False, modifiers=(),
                        key_padding_mask=None, lengths=None, padding_side: str = "right", sizes=None,
                        kv_groups=None):
    """Attention under ``pattern`` in float64: [B, H, N, D] in, float64 [B, H, N, D] out.

    Keys on a grid of their own (``problem.kv_grid``): q [B, H, Nq, D], k/v [B, kv_heads,
    Nk, D], out [B, H, Nq, D], the mask ``dense_mask``'s [H, Nq, Nk] (queries placed on the
    key grid, ``dsl.problem.placement``); ``Grouped`` takes ``groups`` (the queries') and
    ``kv_groups`` (the keys'). Of the modifiers only ``Softcap`` and ``Sinks`` apply there
    (bias terms are measured between positions of one grid), and of the padding arguments only
    ``key_padding_mask``, bool [B, Nk] over the keys (``cross_query_padding`` says which query
    rows are padding: with two 1-D grids the query at key position ``i + Nk - Nq`` is padding
    where that key is; on other grids no query row is).

    k/v may have ``problem.kv_heads`` heads (GQA). ``scale`` defaults to D**-0.5; a float or a
    [H] tensor (one scale per query head). With ``return_lse`` also returns the natural-log
    LSE [B, H, N] (-inf for empty rows and padded rows).
    Voxel patterns also accept [N, H, D] tensors (one batch; ``coords`` carries the batch id).
    ``Grouped`` takes ``groups`` (int [B, N] or [B, H, N]).

    modifiers: score modifiers (``RelativePositionBias``, ``T5Bias``, ``ALiBi``, ``Softcap``,
    ``Sinks``), applied as ``dsl.modifiers`` defines: ``s = scale * q.k + biases ->
    softcap -> mask -> softmax`` whose denominator also counts ``exp(sink)`` (the LSE too).

    Padding (at most one of the three; a padded token is never read as a key, even NaN
    stored there reaches no output, and its query row outputs zeros with LSE = -inf):

    - ``key_padding_mask``: bool [B, N], True = real token. The pattern keeps the tokens'
      positions in the full grid (the tensor's layout) and the others are removed, as an
      additive padding mask does in SDPA/FlexAttention.
    - ``lengths``: ints [B] on a 1-D grid, sample b holds ``lengths[b]`` real tokens at the
      start (``padding_side="right"``) or the end (``"left"``) of the sequence, and is its
      own sequence of that length: the pattern is evaluated on it (positions counted from
      its first real token; windows clamped at its own end; Sink, Documents and Blocks
      aligned at its own start), as running each sample alone would.
    - ``sizes``: ints [B, ndim], per-sample grids: sample b uses only the leading
      ``sizes[b]`` box of the grid (tokens outside it are padding) and is its own grid of
      that extent, windows clamped at its own border exactly as the pattern would be on a
      problem of that grid. ``lengths`` with right padding is ``sizes = lengths[:, None]``.

    Differentiable with respect to q, k, v, a tensor ``scale`` and every modifier tensor.
    """
    check_pattern_problem(pattern, problem)
    voxel_layout = isinstance(q, torch.Tensor) and q.dim() == 3
    if voxel_layout:
        q, k, v = (t.permute(1, 0, 2).unsqueeze(0) if isinstance(t, torch.Tensor) else t for t in (q, k, v))
    ctx = make_context(pattern, problem, q=q, k=k, coords=coords, routes=routes, groups=groups,
                       kv_groups=kv_groups)
    check_qkv(q, k, v, problem, tokens=ctx.tokens, kv_tokens=ctx.keys)
    scale = check_scale(scale, problem, device=q.device)
    if scale is None:
        scale = problem.head_dim ** -0.5
    valid_q = None
    if problem.is_cross:
        check_cross_extras(problem, modifiers, key_padding_mask=key_padding_mask, lengths=lengths, sizes=sizes)
        mods = check_modifiers(modifiers, pattern, problem.on_key_grid(), device=q.device)
        samples, valid = None, None
        if key_padding_mask is not None:
            valid = check_key_padding_mask(key_padding_mask, q.shape[0], ctx.keys, q.device)
            valid_q = cross_query_padding(problem, valid)
    else:
        mods = check_modifiers(modifiers, pattern, problem, device=q.device)
        samples, valid = check_padding(pattern, problem, q.shape[0], ctx.tokens, q.device, routes=routes,
                                       key_padding_mask=key_padding_mask, lengths=lengths,
                                       padding_side=padding_side, sizes=sizes)
        valid_q = valid
    group = problem.heads // problem.kv_heads
    q64 = q.double()
    k64 = k.double().repeat_interleave(group, dim=1)
    v64 = v.double().repeat_interleave(group, dim=1)
    if samples is None:
        out, lse = _attend(q64, k64, v64, pattern, ctx, scale, mods, valid, valid_q)
    else:
        out, lse = _attend_samples(q64, k64, v64, pattern, problem, scale, mods, samples, groups)
    if voxel_layout:
        out, lse = out[0].permute(1, 0, 2), lse[0].permute(1, 0)
    return (out, lse) if return_lse else out


def check_cross_extras(problem: Problem, modifiers=(), *, key_padding_mask=None, lengths=None, sizes=None) -> None:
    """What a problem with a ``kv_grid`` does not take: bias modifiers where the grids give the
    queries no place on the key grid (bias terms measure there, each query at its place:
    ``RelativePositionBias``, ``T5Bias``, ``ALiBi``; ``Softcap`` and ``Sinks`` always apply), and
    the per-sample padding arguments ``lengths``/``sizes`` (``key_padding_mask`` over the keys
    applies). A ValueError naming the argument."""
    from .modifiers import BiasModifier

    mods = (modifiers,) if not isinstance(modifiers, (tuple, list)) else tuple(modifiers or ())
    for i, m in enumerate(mods):
        if isinstance(m, BiasModifier) and placement(problem).kind is None:
            raise ValueError(f"modifiers[{i}] ({type(m).__name__}) is a bias measured between positions on the key "
                             f"grid; {problem!r} gives the queries no place there ({placement(problem).reason}), so "
                             "it is undefined (Softcap and Sinks apply)")
    for name, value in (("lengths", lengths), ("sizes", sizes)):
        if value is not None:
            raise ValueError(f"{name} is not supported with kv_grid (keys on a grid of their own, {problem!r}) yet; "
                             "give key_padding_mask= (bool [B, Nk] over the keys) or queries and keys of the "
                             "call's own lengths instead")


def cross_query_padding(problem: Problem, key_padding_mask: torch.Tensor) -> torch.Tensor | None:
    """The real query rows, bool [B, Nq], of a problem with a ``kv_grid`` whose keys carry
    ``key_padding_mask`` (bool [B, Nk], True = real): two 1-D grids are one sequence whose last
    Nq positions are the queries (``placement``), so query i is real where key ``i + Nk - Nq``
    is (a left-padded prompt's pad tokens in a chunked prefill); on any other pair of grids the
    queries are no keys' tokens and all are real (None)."""
    place = placement(problem)
    if place.kind != "sequence":
        return None
    return key_padding_mask[:, place.offset:]


def _attend(q64, k64, v64, pattern: Pattern, ctx: MaskContext, scale, mods: Modifiers, valid=None, valid_q=None):
    """(out, lse) of float64 q64 [B, H, Nq, D], k64/v64 [B, H, Nk, D] (k/v heads already
    expanded) in row chunks; ``valid``: bool [B, Nk] real keys or None (every token real);
    ``valid_q``: bool [B, Nq] real query rows or None (every row real)."""
    problem = ctx.problem
    if isinstance(scale, torch.Tensor):
        scale = scale.double().view(1, -1, 1, 1)
    keys = torch.arange(ctx.keys)
    outs, lses = [], []
    for rows in _row_chunks(ctx):
        m = mask_rows(pattern, ctx, rows).to(q64.device)
        if valid is not None:
            m = m & valid[:, None, None, :]
        if valid_q is not None:
            m = m & valid_q[:, None, rows.to(valid_q.device), None]
        bias = None
        for mod in mods.biases:  # measured on the key grid, each query at its place there
            b = mod.bias(pattern, problem.on_key_grid(), ctx.query_positions(rows), keys).to(q64.device)[None]
            bias = b if bias is None else bias + b
        sink = None
        if mods.sinks is not None:
            sink = mods.sinks.logits.double().to(q64.device)[None, :, None].expand(1, problem.heads, len(rows))
            if valid_q is not None:
                sink = torch.where(valid_q[:, None, rows.to(valid_q.device)], sink, -math.inf)
        o, l = masked_softmax_attention(q64[:, :, rows], k64, v64, m, scale, bias=bias, sink=sink,
                                        softcap=None if mods.softcap is None else mods.softcap.cap)
        outs.append(o)
        lses.append(l)
    if not outs:
        b, h, _, d = q64.shape
        return q64.new_zeros(b, h, 0, v64.shape[-1]), q64.new_zeros(b, h, 0)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _attend_samples(q64, k64, v64, pattern: Pattern, problem: Problem, scale, mods: Modifiers, samples, groups):
    """Per-sample grids: sample b's real tokens ``samples[b] = (flat indices, grid)`` attend
    among themselves on their own grid; padded rows stay zero (LSE -inf)."""
    b_, h, n, _ = q64.shape
    outs, lses = [], []
    for b, (idx, grid, name) in enumerate(samples):
        out = q64.new_zeros(h, n, v64.shape[-1])
        lse = q64.new_full((h, n), -math.inf)
        if idx.numel():
            idx = idx.to(q64.device)
            sub = problem.with_grid(grid)
            try:
                pattern.check(sub)
                sub_mods = check_modifiers([m for m in (*mods.biases, mods.softcap, mods.sinks) if m is not None],
                                           pattern, sub)
            except ValueError as e:
                raise ValueError(f"{name}: sample {b} is a grid of {grid}, on which {e}") from None
            g = None if groups is None else groups[b:b + 1].index_select(-1, idx.to(groups.device))
            qb, kb, vb = (t[b:b + 1].index_select(2, idx) for t in (q64, k64, v64))
            ctx = make_context(pattern, sub, q=qb, k=kb, groups=g)
            ob, lb = _attend(qb, kb, vb, pattern, ctx, scale, sub_mods)
            out = out.index_copy(1, idx, ob[0])
            lse = lse.index_copy(1, idx, lb[0])
        outs.append(out)
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


# ------------------------------------------------------------------------------------
# Padding and per-sample grids
# ------------------------------------------------------------------------------------
def check_int_tensor(name: str, value, shape: tuple[int, ...], what: str, device, out_device="cpu") -> torch.Tensor:
    """``value`` (an integer tensor on ``device`` when that is given, or nested lists of ints)
    as int64 of ``shape`` on ``out_device``."""
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
            raise TypeError(f"{name} must hold integers, got a tensor of {value.dtype}")
        if device is not None and value.device != torch.device(device):
            raise ValueError(f"{name} is on {value.device}, but q is on {device}; expected every tensor on one device")
        t = value.detach().to(out_device, torch.long)
    else:
        try:
            t = torch.tensor(value, device=out_device)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{name} must be a tensor or a list of ints {what}, got {value!r}") from None
        if t.dtype != torch.long:
            raise TypeError(f"{name} must hold ints {what}, got {value!r} ({t.dtype})")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {list(t.shape)}, expected {list(shape)} {what}")
    return t


def box_indices(grid: tuple[int, ...], box) -> torch.Tensor:
    """Flat row-major indices into ``grid`` of the leading ``box``, in the box's row-major order."""
    idx = torch.zeros(1, dtype=torch.long)
    for d, extent in enumerate(box):
        idx = (idx[:, None] + torch.arange(extent)[None, :] * math.prod(grid[d + 1:])).reshape(-1)
    return idx


def check_padding(pattern: Pattern, problem: Problem, batch: int, tokens: int, device, *, routes=None,
                  key_padding_mask=None, lengths=None, padding_side: str = "right", sizes=None):
    """The padding arguments of ``reference_attention`` checked: ``(samples, valid)`` where
    ``samples`` is None or one ``(flat indices, grid, argument name)`` per sample (``lengths``,
    ``sizes``) and ``valid`` None or bool [B, N] on ``device`` (``key_padding_mask``)."""
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    given = [name for name, value in (("key_padding_mask", key_padding_mask), ("lengths", lengths),
                                      ("sizes", sizes)) if value is not None]
    if padding_side != "right" and lengths is None:
        raise ValueError(f"padding_side={padding_side!r} applies to lengths=, which was not given")
    if not given:
        return None, None
    if len(given) > 1:
        raise ValueError(f"give at most one of key_padding_mask, lengths and sizes, got {' and '.join(given)}")
    if problem.grid is None or any(not p.needs_grid for p in pattern.walk()):
        raise ValueError(f"{given[0]} needs a token grid, but {pattern!r} takes its tokens from coords "
                         "(voxel patterns have no padding: leave the padded voxels out)")
    needs = pattern.inputs_needed()
    if key_padding_mask is not None:
        if "qk" in needs and routes is None:
            raise ValueError(f"key_padding_mask with {pattern!r}: its routing reads every token's q and k, "
                             "padding included; give lengths= or sizes= (each sample routed on its own "
                             "tokens) or routes=")
        return None, check_key_padding_mask(key_padding_mask, batch, tokens, device)
    if routes is not None:
        raise ValueError(f"routes= with {given[0]}=: routes name regions of the full grid, but each sample is "
                         "routed on its own grid; leave routes out")
    grid = problem.grid
    samples = []
    if lengths is not None:
        if len(grid) != 1:
            raise ValueError(f"lengths applies to 1-D sequences, but the problem grid is {grid}; give sizes= "
                             f"([B, {len(grid)}] per-sample grids) or key_padding_mask=")
        t = check_int_tensor("lengths", lengths, (batch,), f"[B={batch}]", device)
        for b, n in enumerate(t.tolist()):
            if not 0 <= n <= tokens:
                raise ValueError(f"lengths[{b}] must be in [0, {tokens}] (the sequence length), got {n}")
            first = 0 if padding_side == "right" else tokens - n
            samples.append((torch.arange(first, first + n), (n,), f"lengths[{b}]={n}"))
        return samples, None
    t = check_int_tensor("sizes", sizes, (batch, len(grid)), f"[B={batch}, ndim={len(grid)}]", device)
    for b, box in enumerate(t.tolist()):
        for d, (s, g) in enumerate(zip(box, grid)):
            if not 0 <= s <= g:
                raise ValueError(f"sizes[{b}][{d}] must be in [0, {g}] (the grid extent), got {s} "
                                 f"(sizes[{b}]={box}, grid={grid})")
        samples.append((box_indices(grid, box), tuple(box), f"sizes[{b}]={box}"))
    return samples, None


def reference_linear_attention(q, k, v, pattern, coords, *, feature_map: str = "relu",
                               neighbor_pooling: bool = False, eps: float = 1e-6):
    """Scattered voxel-window linear attention (ScatterFormer) in float64, plainly.

    q [N, H, D], k/v [N, kv_heads, D] (kv heads repeated to H), ``pattern`` a ``Scattered``,
    ``coords`` int [N, 1 + ndim] (batch first). phi = relu (``feature_map="relu"``) or
    elu(x) + 1 (``"elu+1"``). Per window g and head: KV_g = sum_{j in g} phi(k_j)^T v_j,
    S_g = sum_{j in g} phi(k_j), out_i = phi(q_i) KV_g / (phi(q_i) . S_g + eps).
    ``neighbor_pooling``: KV_g and S_g are first replaced by their sums over the windows
    (batch, w_1 + a, w_2 + b, w_3...) for a, b in {-1, 0, 1} (1-D coords: a only) that hold
    voxels. Loops over windows in Python: the oracle, not fast. Differentiable; float64 out.
    """
    if not isinstance(pattern, Scattered):
        raise TypeError(f"pattern must be a sparseforge Scattered, got {pattern!r}")
    if feature_map not in ("relu", "elu+1"):
        raise ValueError(f"feature_map must be one of ['relu', 'elu+1'], got {feature_map!r}")
    coords = check_coords(coords)
    pattern.check_rank(coords)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 3 \
                or t.shape[0] != coords.shape[0]:
            raise ValueError(f"{name} must be a floating tensor [N={coords.shape[0]}, heads, D], "
                             f"got {getattr(t, 'shape', type(t).__name__)}")
    h = q.shape[1]
    if k.shape[1] != v.shape[1] or h % k.shape[1]:
        raise ValueError(f"k/v heads {k.shape[1]}/{v.shape[1]} do not divide q's {h}")

    def phi(x):
        return torch.relu(x) if feature_map == "relu" else torch.where(x > 0, x + 1, torch.exp(x))

    q64 = q.double().cpu()
    k64 = k.double().cpu().repeat_interleave(h // k.shape[1], dim=1)
    v64 = v.double().cpu().repeat_interleave(h // v.shape[1], dim=1)
    fq, fk = phi(q64), phi(k64)
    ids = [tuple(int(x) for x in row) for row in pattern.window_ids(coords)]
    members: dict[tuple, list[int]] = {}
    for i, w in enumerate(ids):
        members.setdefault(w, []).append(i)
    kv, sums = {}, {}
    for w, rows in members.items():
        kv[w] = torch.einsum("nhd,nhe->hde", fk[rows], v64[rows])
        sums[w] = fk[rows].sum(0)
    if neighbor_pooling:
        two = len(ids[0]) > 2 if ids else False
        pooled_kv, pooled_s = {}, {}
        for w in members:
            total_kv, total_s = torch.zeros_like(kv[w]), torch.zeros_like(sums[w])
            for a in (-1, 0, 1):
                for b in ((-1, 0, 1) if two else (0,)):
                    other = list(w)
                    other[1] += a
                    if two:
                        other[2] += b
                    other = tuple(other)
                    if other in members:
                        total_kv = total_kv + kv[other]
                        total_s = total_s + sums[other]
            pooled_kv[w], pooled_s[w] = total_kv, total_s
        kv, sums = pooled_kv, pooled_s
    out = []
    for i, w in enumerate(ids):
        num = torch.einsum("hd,hde->he", fq[i], kv[w])
        den = (fq[i] * sums[w]).sum(-1, keepdim=True) + eps
        out.append(num / den)
    if not out:
        return q64.new_zeros(0, h, v.shape[2]) + 0 * (q64.sum() + k64.sum() + v64.sum())
    return torch.stack(out).to(q.device)


# ------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class HeadStats:
    """Figures of one head: density = allowed pairs / N^2; keys per query over rows."""

    head: int
    allowed: int
    density: float
    keys_min: int
    keys_mean: float
    keys_max: int
    empty_rows: int


@dataclasses.dataclass(frozen=True)
class PatternStats:
    """What ``describe`` returns: totals and one ``HeadStats`` per head (batch element 0
    for content-dependent patterns). ``kv_tokens``: Nk when the keys have a grid of their
    own (None: ``tokens``); densities are over Nq x Nk pairs."""

    pattern: str
    problem: str
    tokens: int
    heads: tuple[HeadStats, ...]
    kv_tokens: int | None = None

    @property
    def density(self) -> float:
        keys = self.tokens if self.kv_tokens is None else self.kv_tokens
        return sum(h.allowed for h in self.heads) / (len(self.heads) * self.tokens * keys)

    @property
    def empty_rows(self) -> int:
        return sum(h.empty_rows for h in self.heads)

    def as_dict(self) -> dict:
        out = {"pattern": self.pattern, "problem": self.problem, "tokens": self.tokens,
               "density": self.density, "empty_rows": self.empty_rows,
               "heads": [dataclasses.asdict(h) for h in self.heads]}
        if self.kv_tokens is not None:
            out["kv_tokens"] = self.kv_tokens
        return out

    def __str__(self) -> str:
        n = f"N={self.tokens}" if self.kv_tokens is None else f"Nq={self.tokens}, Nk={self.kv_tokens}"
        lines = [f"{self.pattern} on {self.problem}: {n}, density {self.density:.4g}, "
                 f"empty rows {self.empty_rows}",
                 f"{'head':>4} {'density':>9} {'keys/query min':>15} {'mean':>9} {'max':>7} {'empty rows':>11}"]
        for h in self.heads:
            lines.append(f"{h.head:>4} {h.density:>9.4g} {h.keys_min:>15} {h.keys_mean:>9.2f} "
                         f"{h.keys_max:>7} {h.empty_rows:>11}")
        return "\n".join(lines)


def describe(pattern: Pattern, problem: Problem, *, q=None, k=None, coords=None, routes=None,
             groups=None, kv_groups=None) -> PatternStats:
    """Density per head, keys per query (min/mean/max) and empty rows, computed exactly."""
    ctx = make_context(pattern, problem, q=q, k=k, coords=coords, routes=routes, groups=groups,
                       kv_groups=kv_groups)
    check_mask_rows("describe", pattern, ctx, CHUNK_ELEMENTS)
    h = problem.heads
    kmin = torch.full((h,), ctx.keys, dtype=torch.long)
    kmax = torch.zeros(h, dtype=torch.long)
    total = torch.zeros(h, dtype=torch.long)
    empty = torch.zeros(h, dtype=torch.long)
    for rows in _row_chunks(ctx):
        counts = mask_rows(pattern, ctx, rows)[0].sum(-1)  # [H, rows]
        kmin = torch.minimum(kmin, counts.amin(-1))
        kmax = torch.maximum(kmax, counts.amax(-1))
        total += counts.sum(-1)
        empty += (counts == 0).sum(-1)
    n, nk = ctx.tokens, ctx.keys
    heads = tuple(HeadStats(i, int(total[i]), int(total[i]) / (n * nk) if n * nk else 0.0, int(kmin[i]),
                            int(total[i]) / n if n else 0.0, int(kmax[i]), int(empty[i])) for i in range(h))
    return PatternStats(repr(pattern), repr(problem), n, heads, nk if problem.is_cross else None)
