"""The CPU executor: attention driven by a ``TileSchedule``, in plain torch.

It visits exactly the (query tile, key tile) pairs the schedule lists, like the generated
kernels do, so running it against the float64 reference tests the schedule itself:

- per schedule group (heads with one tile schedule) and query tile, the tokens of every
  visited key tile are gathered in one ``index_select`` from the geometry's token table
  (padding rows dropped);
- FULL key tiles are used unmasked; PARTIAL ones are masked with the pattern's exact mask
  (``pattern.mask``), evaluated once per (group, query tile) and cached;
- softmax in float32 (float64 for float64 inputs); a query row with nothing visible gives
  zeros and LSE = -inf, never NaN;
- the backward uses the explicit FlashAttention formulas (``delta = rowsum(dO * O)``,
  ``P = exp(S - lse)``, ``dS = P * (dP - delta)``) and accumulates dK/dV into the key/value
  heads (GQA) with ``index_add_``.

It runs on whatever device the tensors are on (it is torch ops only), which is how the
runtime computes the rarely needed LSE-gradient correction for the Triton backends too.
"""
from __future__ import annotations

import dataclasses
import math
import threading
import weakref

import torch

from ..dsl.pattern import as_4d
from ..dsl.semantics import make_context, masked_softmax_attention

__all__ = ["forward", "backward", "compute_dtype", "plan_for", "routed_forward", "routed_backward",
           "scattered_forward", "scattered_backward"]

# Total bytes of cached PARTIAL-tile masks per schedule; beyond it masks are recomputed.
MASK_CACHE_BYTES = 256 << 20


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for inputs of ``dtype``: float64 stays float64, the rest float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclasses.dataclass
class _Step:
    """One (schedule group, query tile) with something to visit."""

    group: int
    heads: torch.Tensor      # int64 [Hg] query heads of the group
    kv_heads: torch.Tensor   # int64 [Hg] their key/value heads
    q_tokens: torch.Tensor   # int64 [nq] query tokens of the tile (padding dropped)
    k_tokens: torch.Tensor   # int64 [nk] tokens of every visited key tile (padding dropped)
    n_full: int              # the first n_full of k_tokens come from FULL tiles
    mask: torch.Tensor | None = None  # bool [1 or Hg, nq, nk]; None: every pair allowed


class Plan:
    """Everything the executor derives from a schedule once: the visiting steps and masks."""

    def __init__(self, schedule):
        self.schedule = schedule
        problem = schedule.problem
        self.ctx = make_context(schedule.pattern, problem)
        rep = problem.heads // problem.kv_heads
        head_group = torch.from_numpy(schedule.head_group.astype("int64"))
        self.steps: list[_Step] = []
        cached = 0
        for g in range(schedule.groups):
            heads = torch.nonzero(head_group == g).flatten()
            if len(heads) == 0:
                continue
            for visit in schedule.visits(g):
                step = _Step(g, heads, heads // rep, visit.q_tokens, visit.k_tokens, visit.n_full)
                if step.n_full < len(step.k_tokens) and cached < MASK_CACHE_BYTES:
                    step.mask = self.mask(step)
                    cached += step.mask.numel()
                self.steps.append(step)

    def mask(self, step: _Step) -> torch.Tensor | None:
        """bool [1 or Hg, nq, nk] for ``step``: True on FULL-tile keys, the pattern's exact
        mask on PARTIAL-tile keys. None when every visited tile is FULL."""
        if step.mask is not None:
            return step.mask
        nq, nk = len(step.q_tokens), len(step.k_tokens)
        if step.n_full == nk:
            return None
        part = step.k_tokens[step.n_full:]
        m = as_4d(self.schedule.pattern.mask(self.ctx, step.q_tokens, part))
        if m.shape[0] != 1:
            raise ValueError(f"{self.schedule.pattern!r} has a per-batch mask; the CPU executor "
                             "handles static patterns only")
        m = m[0]  # [1 or H, nq, p]
        if m.shape[0] > 1:
            m = m.index_select(0, step.heads)
            if bool((m == m[:1]).all()):
                m = m[:1]
        m = m.expand(m.shape[0], nq, len(part))
        if step.n_full == 0:
            return m.contiguous()
        ones = torch.ones(m.shape[0], nq, step.n_full, dtype=torch.bool)
        return torch.cat([ones, m], dim=-1)


_plans: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_plans_lock = threading.Lock()


def plan_for(schedule) -> Plan:
    """The (cached) executor plan of ``schedule``."""
    with _plans_lock:
        plan = _plans.get(schedule)
    if plan is None:
        plan = Plan(schedule)
        with _plans_lock:
            plan = _plans.setdefault(schedule, plan)
    return plan


def _gather(x: torch.Tensor, heads: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """x [B, H, N, D] -> [B, len(heads), len(tokens), D]."""
    return x.index_select(1, heads).index_select(2, tokens)


def _scores(plan: Plan, step: _Step, q, k, scale):
    """Masked scores [B, Hg, nq, nk] (-inf where masked) and the mask (or None)."""
    dev = q.device
    qg = _gather(q, step.heads.to(dev), step.q_tokens.to(dev))
    kg = _gather(k, step.kv_heads.to(dev), step.k_tokens.to(dev))
    s = torch.matmul(qg, kg.transpose(-1, -2)) * scale
    mask = plan.mask(step)
    if mask is not None:
        mask = mask.to(dev)
        s = s.masked_fill(~mask, -math.inf)
    return qg, kg, s, mask


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, schedule, scale: float):
    """Attention under ``schedule``: q [B, H, N, D], k/v [B, kv_heads, N, D].

    Returns ``(out, lse)``: out [B, H, N, D] in q's dtype, lse [B, H, N] natural log,
    float32 (float64 for float64 inputs), -inf for rows with nothing visible.
    """
    plan = plan_for(schedule)
    ct = compute_dtype(q.dtype)
    b, h, n, d = q.shape
    with torch.no_grad():
        qc, kc, vc = q.to(ct), k.to(ct), v.to(ct)
        out = torch.zeros(b, h, n, v.shape[-1], dtype=ct, device=q.device)
        lse = torch.full((b, h, n), -math.inf, dtype=ct, device=q.device)
        everything = torch.ones((), dtype=torch.bool, device=q.device)
        for step in plan.steps:
            heads, qt = step.heads.to(q.device), step.q_tokens.to(q.device)
            kv_heads, kt = step.kv_heads.to(q.device), step.k_tokens.to(q.device)
            mask = plan.mask(step)
            o, l = masked_softmax_attention(_gather(qc, heads, qt), _gather(kc, kv_heads, kt), _gather(vc, kv_heads, kt),
                                            everything if mask is None else mask.to(q.device), scale)
            out[:, heads[:, None], qt[None, :]] = o
            lse[:, heads[:, None], qt[None, :]] = l
    return out.to(q.dtype), lse


def backward(q, k, v, out, lse, dout, schedule, scale: float, dlse: torch.Tensor | None = None):
    """Gradients (dq, dk, dv) of ``forward`` given dout (and optionally the gradient of the
    LSE output, ``dlse`` [B, H, N]); each in its input's dtype. ``dout`` may be None (only
    ``dlse`` flows back)."""
    plan = plan_for(schedule)
    ct = compute_dtype(q.dtype)
    b, h, n, d = q.shape
    kvh = k.shape[1]
    dev = q.device
    with torch.no_grad():
        qc, kc, vc = q.to(ct), k.to(ct), v.to(ct)
        if dout is None:
            dout = torch.zeros_like(out)
        doc = dout.to(ct)
        delta = (doc * out.to(ct)).sum(-1)  # [B, H, N]
        if dlse is not None:
            delta = delta - dlse.to(ct)
        # Rows with nothing visible have lse = -inf; +inf makes exp(S - lse) = 0 there.
        lse_c = lse.to(ct)
        lse_c = torch.where(lse_c == -math.inf, torch.full_like(lse_c, math.inf), lse_c)
        dq = torch.zeros(b, h, n, d, dtype=ct, device=dev)
        dk = torch.zeros(b, kvh * n, d, dtype=ct, device=dev)
        dv = torch.zeros(b, kvh * n, v.shape[-1], dtype=ct, device=dev)
        for step in plan.steps:
            heads, qt = step.heads.to(dev), step.q_tokens.to(dev)
            kv_heads, kt = step.kv_heads.to(dev), step.k_tokens.to(dev)
            qg, kg, s, mask = _scores(plan, step, qc, kc, scale)
            vg = _gather(vc, kv_heads, kt)
            dog = _gather(doc, heads, qt)
            lse_g = lse_c.index_select(1, heads).index_select(2, qt)[..., None]
            delta_g = delta.index_select(1, heads).index_select(2, qt)[..., None]
            p = torch.exp(s - lse_g)  # masked entries: exp(-inf) = 0
            dp = torch.matmul(dog, vg.transpose(-1, -2))
            ds = p * (dp - delta_g)
            dq[:, heads[:, None], qt[None, :]] = torch.matmul(ds, kg) * scale
            flat = (kv_heads[:, None] * n + kt[None, :]).reshape(-1)
            dk.index_add_(1, flat, (torch.matmul(ds.transpose(-1, -2), qg) * scale).reshape(b, -1, d))
            dv.index_add_(1, flat, torch.matmul(p.transpose(-1, -2), dog).reshape(b, -1, v.shape[-1]))
    return (dq.to(q.dtype), dk.view(b, kvh, n, d).to(k.dtype), dv.view(b, kvh, n, v.shape[-1]).to(v.dtype))


# ------------------------------------------------------------------------------------
# Routed attention (lower.routed): driven by the per-call tables
# ------------------------------------------------------------------------------------
class _RoutedChunks:
    """Batched gathers of routed attention, a chunk of query tiles at a time.

    Each chunk gathers the visited key tiles of every (batch, head, query tile) of the
    chunk at once; chunks are sized so a gathered K (or V) is about as large as q, so memory
    stays O(input) however many routes there are."""

    def __init__(self, schedule, tables, q, k):
        layout = schedule.routed
        a = layout.device_arrays(q.device)
        self.q_tokens, self.k_tokens = a["q_tokens"], a["k_tokens"]
        self.q_np = layout.q_tokens
        b, h, n, _ = q.shape
        kvh = k.shape[1]
        self.b, self.h, self.n, self.kvh = b, h, n, kvh
        g = tables.head_group  # [B, H] -> schedule group
        self.tiles = tables.tiles[g]   # [B, H, nq, S]
        self.valid = tables.valid[g]   # [B, H, nq, S]
        slots = self.tiles.shape[-1] * self.k_tokens.shape[1]
        self.chunk = max(1, n // max(1, slots))
        kv_of = torch.arange(h, device=q.device) // (h // kvh)
        # Row of k.reshape(B * KVH * N, D) for batch b, key/value head of h: base + token.
        self.k_base = (torch.arange(b, device=q.device)[:, None] * kvh + kv_of[None, :]) * n  # [B, H]
        self.n_q_tiles = self.q_tokens.shape[0]

    def __iter__(self):
        bm = self.q_tokens.shape[1]
        for start in range(0, self.n_q_tiles, self.chunk):
            sl = slice(start, min(start + self.chunk, self.n_q_tiles))
            qtok = self.q_tokens[sl]                      # [c, bm]
            rows_np = self.q_np[sl].reshape(-1)
            keep = torch.from_numpy((rows_np >= 0).nonzero()[0]).to(qtok.device)
            if len(keep) == 0:
                continue
            ktok = self.k_tokens[self.tiles[:, :, sl]]    # [B, H, c, S, bn]
            kvalid = (ktok >= 0) & self.valid[:, :, sl, :, None]
            c = qtok.shape[0]
            ktok = ktok.clamp_min(0).reshape(self.b, self.h, c, -1)
            kvalid = kvalid.reshape(self.b, self.h, c, -1)
            kidx = self.k_base[:, :, None, None] + ktok  # [B, H, c, nk] rows of the flat k
            mask = (qtok >= 0)[None, None, :, :, None] & kvalid[:, :, :, None, :]  # [B, H, c, bm, nk]
            yield qtok.clamp_min(0), keep, kidx, mask, c * bm


def _rows(x, qtok):
    """x [B, H, N, ...] at the chunk's query rows: [B, H, c, bm, ...]."""
    return x[:, :, qtok]


def _put(dst, src, qtok, keep, width):
    """dst[:, :, token] = src for the chunk's real (non-padding) rows."""
    b, h = src.shape[:2]
    flat = src.reshape(b, h, width, *src.shape[4:]).index_select(2, keep)
    dst[:, :, qtok.reshape(-1).index_select(0, keep)] = flat


def routed_forward(q, k, v, schedule, tables, scale: float):
    """Routed attention (``lower.routed``) under ``tables`` (``routed_tables``): like ``forward``."""
    ct = compute_dtype(q.dtype)
    b, h, n, d = q.shape
    with torch.no_grad():
        qc = q.to(ct)
        kf, vf = k.to(ct).reshape(-1, d), v.to(ct).reshape(-1, v.shape[-1])
        out = torch.zeros(b, h, n, v.shape[-1], dtype=ct, device=q.device)
        lse = torch.full((b, h, n), -math.inf, dtype=ct, device=q.device)
        for qtok, keep, kidx, mask, width in _RoutedChunks(schedule, tables, q, k):
            kg, vg = kf[kidx], vf[kidx]                       # [B, H, c, nk, D]
            o, l = masked_softmax_attention(_rows(qc, qtok), kg, vg, mask, scale)
            _put(out, o, qtok, keep, width)
            _put(lse, l, qtok, keep, width)
    return out.to(q.dtype), lse


def routed_backward(q, k, v, out, lse, dout, schedule, tables, scale: float, dlse=None):
    """Gradients (dq, dk, dv) of ``routed_forward``; like ``backward``."""
    ct = compute_dtype(q.dtype)
    b, h, n, d = q.shape
    kvh, dv_dim = k.shape[1], v.shape[-1]
    dev = q.device
    with torch.no_grad():
        qc = q.to(ct)
        kf, vf = k.to(ct).reshape(-1, d), v.to(ct).reshape(-1, dv_dim)
        if dout is None:
            dout = torch.zeros_like(out)
        doc = dout.to(ct)
        delta = (doc * out.to(ct)).sum(-1)
        if dlse is not None:
            delta = delta - dlse.to(ct)
        lse_c = lse.to(ct)
        lse_c = torch.where(lse_c == -math.inf, torch.full_like(lse_c, math.inf), lse_c)
        dq = torch.zeros(b, h, n, d, dtype=ct, device=dev)
        dk = torch.zeros(b * kvh * n, d, dtype=ct, device=dev)
        dv = torch.zeros(b * kvh * n, dv_dim, dtype=ct, device=dev)
        for qtok, keep, kidx, mask, width in _RoutedChunks(schedule, tables, q, k):
            kg, vg = kf[kidx], vf[kidx]                       # [B, H, c, nk, D]
            qg, dog = _rows(qc, qtok), _rows(doc, qtok)       # [B, H, c, bm, D]
            s = torch.matmul(qg, kg.transpose(-1, -2)) * scale
            s = s.masked_fill(~mask, -math.inf)
            p = torch.exp(s - _rows(lse_c, qtok)[..., None])
            dp = torch.matmul(dog, vg.transpose(-1, -2))
            ds = p * (dp - _rows(delta, qtok)[..., None])
            _put(dq, torch.matmul(ds, kg) * scale, qtok, keep, width)
            flat = kidx.reshape(-1)
            dk.index_add_(0, flat, (torch.matmul(ds.transpose(-1, -2), qg) * scale).reshape(-1, d))
            dv.index_add_(0, flat, torch.matmul(p.transpose(-1, -2), dog).reshape(-1, dv_dim))
    return (dq.to(q.dtype), dk.view(b, kvh, n, d).to(k.dtype), dv.view(b, kvh, n, dv_dim).to(v.dtype))


# ------------------------------------------------------------------------------------
# Scattered voxel windows (lower.segments): the packed sequence, driven by the plan's tables
# ------------------------------------------------------------------------------------
# Elements of one chunk's gathered scores (heads x query rows x key rows).
SCATTERED_CHUNK_ELEMENTS = 1 << 24


def _scattered_chunks(schedule, tables, heads: int):
    """(query rows [c * bm], key rows [c, nk], mask [c, bm, nk]) per chunk of query tiles:
    each query tile's key rows are its visited key tiles (``KV_PTR``/``KV_IDX``), the mask is
    the segment-id compare (padding rows have id -1 and match nothing), and key row <= query
    row for a causal layout."""
    bm, bn = schedule.geometry.block_m, schedule.geometry.block_n
    seg = tables["SEG"].long()
    ptr, idx = tables["KV_PTR"][0].long(), tables["KV_IDX"].long()
    dev = seg.device
    count = ptr[1:] - ptr[:-1]
    nq = len(count)
    s = int(count.max()) if nq else 0
    if s == 0:
        return
    slot = torch.arange(s, device=dev)
    valid = slot[None, :] < count[:, None]                                     # [nq, S]
    tiles = idx[(ptr[:-1, None] + slot[None, :]).clamp_max(len(idx) - 1)]      # [nq, S]
    chunk = max(1, SCATTERED_CHUNK_ELEMENTS // max(1, heads * bm * s * bn))
    for a in range(0, nq, chunk):
        t = torch.arange(a, min(a + chunk, nq), device=dev)
        qrows = (t[:, None] * bm + torch.arange(bm, device=dev)[None, :])     # [c, bm]
        krows = (tiles[t][:, :, None] * bn + torch.arange(bn, device=dev)).reshape(len(t), -1)  # [c, nk]
        kval = valid[t][:, :, None].expand(-1, -1, bn).reshape(len(t), -1)
        kseg = torch.where(kval, seg[krows], torch.full_like(krows, -1))
        mask = (seg[qrows][:, :, None] == kseg[:, None, :]) & (kseg >= 0)[:, None, :]
        if schedule.scattered.causal:
            mask &= krows[:, None, :] <= qrows[:, :, None]
        yield qrows.reshape(-1), krows, mask


def scattered_forward(q, k, v, schedule, tables, scale: float):
    """Attention of the packed sequence q [1, H, Np, D], k/v [1, KVH, Np, D] under the plan's
    ``tables`` (``lower.segments.tables_from``); like ``forward``."""
    ct = compute_dtype(q.dtype)
    _, h, n, d = q.shape
    kv_of = torch.arange(h, device=q.device) // (h // k.shape[1])
    with torch.no_grad():
        qc, kc, vc = q[0].to(ct), k[0].to(ct)[kv_of], v[0].to(ct)[kv_of]   # [H, Np, D]
        out = torch.zeros(h, n, v.shape[-1], dtype=ct, device=q.device)
        lse = torch.full((h, n), -math.inf, dtype=ct, device=q.device)
        for qrows, krows, mask in _scattered_chunks(schedule, tables, h):
            c, bm = mask.shape[:2]
            qg = qc[:, qrows].view(h, c, bm, d)
            o, l = masked_softmax_attention(qg, kc[:, krows], vc[:, krows], mask[None], scale)
            out[:, qrows] = o.reshape(h, c * bm, -1)
            lse[:, qrows] = l.reshape(h, c * bm)
    return out[None].to(q.dtype), lse[None]


def scattered_backward(q, k, v, out, lse, dout, schedule, tables, scale: float, dlse=None):
    """Gradients (dq, dk, dv) of ``scattered_forward`` (packed layout); like ``backward``."""
    ct = compute_dtype(q.dtype)
    _, h, n, d = q.shape
    kvh, dvd = k.shape[1], v.shape[-1]
    group = h // kvh
    dev = q.device
    kv_of = torch.arange(h, device=dev) // group
    with torch.no_grad():
        qc, kc, vc = q[0].to(ct), k[0].to(ct)[kv_of], v[0].to(ct)[kv_of]
        doc = torch.zeros_like(out[0], dtype=ct) if dout is None else dout[0].to(ct)
        delta = (doc * out[0].to(ct)).sum(-1)
        if dlse is not None:
            delta = delta - dlse[0].to(ct)
        lse_c = lse[0].to(ct)
        lse_c = torch.where(lse_c == -math.inf, torch.full_like(lse_c, math.inf), lse_c)
        dq = torch.zeros(h, n, d, dtype=ct, device=dev)
        dk = torch.zeros(kvh, n, d, dtype=ct, device=dev)
        dv = torch.zeros(kvh, n, dvd, dtype=ct, device=dev)
        for qrows, krows, mask in _scattered_chunks(schedule, tables, h):
            c, bm = mask.shape[:2]
            qg, dog = qc[:, qrows].view(h, c, bm, d), doc[:, qrows].view(h, c, bm, -1)
            kg, vg = kc[:, krows], vc[:, krows]                               # [H, c, nk, D]
            s = torch.matmul(qg, kg.transpose(-1, -2)) * scale
            s = s.masked_fill(~mask[None], -math.inf)
            p = torch.exp(s - lse_c[:, qrows].view(h, c, bm, 1))
            dp = torch.matmul(dog, vg.transpose(-1, -2))
            ds = p * (dp - delta[:, qrows].view(h, c, bm, 1))
            dq[:, qrows] = (torch.matmul(ds, kg) * scale).reshape(h, c * bm, d)
            flat = krows.reshape(-1)
            gk = (torch.matmul(ds.transpose(-1, -2), qg) * scale).reshape(kvh, group, -1, d).sum(1)
            gv = torch.matmul(p.transpose(-1, -2), dog).reshape(kvh, group, -1, dvd).sum(1)
            dk.index_add_(1, flat, gk)
            dv.index_add_(1, flat, gv)
    return dq[None].to(q.dtype), dk[None].to(k.dtype), dv[None].to(v.dtype)
