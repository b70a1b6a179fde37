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

It runs on whatever device the tensors are on (it is torch ops only), which is how the
runtime computes the rarely needed LSE-gradient correction for the Triton backends too.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from ..dsl.semantics import allowed_dot, allowed_sum, masked_softmax_attention
from ..lower.paths import Chunk

__all__ = ["backward", "compute_dtype", "forward"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for inputs of ``dtype``: float64 stays float64, the rest float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _all_finite(*tensors) -> bool:
    """No NaN or Inf in any of ``tensors`` (one pass over each)."""
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _write_rows(rows: torch.Tensor, scratch: int) -> torch.Tensor:
    """Rows to write a chunk's results to: padding rows (-1) go to the scratch row."""
    return torch.where(rows >= 0, rows, torch.full_like(rows, scratch))


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunks: Iterable[Chunk], scale: float):
    """Attention of q [B, H, N, D], k/v [B, KVH, N, D] over ``chunks``.

    Returns ``(out, lse)``: out [B, H, N, Dv] in q's dtype, lse [B, H, N] natural log,
    float32 (float64 for float64 inputs), -inf for rows with nothing visible.
    """
    ct = compute_dtype(q.dtype)
    b, h, n, d = q.shape
    rows = b * h * n
    with torch.no_grad():
        qf, kf, vf = q.reshape(-1, d).to(ct), k.reshape(-1, d).to(ct), v.reshape(-1, v.shape[-1]).to(ct)
        out = torch.zeros(rows + 1, v.shape[-1], dtype=ct, device=q.device)  # + 1 scratch row
        lse = torch.full((rows + 1,), -math.inf, dtype=ct, device=q.device)
        everything = torch.ones((), dtype=torch.bool, device=q.device)
        contain = not _all_finite(qf, kf, vf)
        for c in chunks:
            o, l = masked_softmax_attention(qf[c.q_rows.clamp_min(0)], kf[c.k_rows], vf[c.k_rows],
                                            everything if c.mask is None else c.mask, scale, contain=contain)
            at = _write_rows(c.q_rows, rows)
            out[at] = o
            lse[at] = l
    return out[:rows].view(b, h, n, v.shape[-1]).to(q.dtype), lse[:rows].view(b, h, n)


def backward(q, k, v, out, lse, dout, chunks: Iterable[Chunk], scale: float, dlse: torch.Tensor | None = None):
    """Gradients (dq, dk, dv) of ``forward`` given dout (and optionally the gradient of the
    LSE output, ``dlse`` [B, H, N]); each in its input's dtype. ``dout`` may be None (only
    ``dlse`` flows back)."""
    ct = compute_dtype(q.dtype)
    b, h, n, d = q.shape
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
        lse_c = lse.reshape(-1).to(ct)
        lse_c = torch.where(lse_c == -math.inf, torch.full_like(lse_c, math.inf), lse_c)
        dq = torch.zeros(rows + 1, d, dtype=ct, device=dev)  # + 1 scratch row
        dk = torch.zeros_like(kf)
        dv = torch.zeros_like(vf)
        # lse is -inf on empty rows (now +inf); anything else non-finite comes from NaN/Inf inputs
        contain = not (_all_finite(qf, kf, vf, dof, delta) and bool((lse_c > -math.inf).all()))
        for c in chunks:
            qi = c.q_rows.clamp_min(0)
            qg, dog = qf[qi], dof[qi]                       # [..., m, D]
            kg, vg = kf[c.k_rows], vf[c.k_rows]             # [..., nk, D]
            if contain and c.mask is not None:
                dq_c, dk_c, dv_c = _contained_chunk_backward(qg, kg, vg, dog, lse_c[qi], delta[qi], c.mask, scale)
            else:
                s = torch.matmul(qg, kg.transpose(-1, -2)) * scale
                if c.mask is not None:
                    s = s.masked_fill(~c.mask, -math.inf)
                p = torch.exp(s - lse_c[qi][..., None])          # masked entries: exp(-inf) = 0
                dp = torch.matmul(dog, vg.transpose(-1, -2))
                ds = p * (dp - delta[qi][..., None])
                dq_c = torch.matmul(ds, kg) * scale
                dk_c = torch.matmul(ds.transpose(-1, -2), qg) * scale
                dv_c = torch.matmul(p.transpose(-1, -2), dog)
            dq[_write_rows(c.q_rows, rows)] = dq_c
            flat = c.k_rows.reshape(-1)
            dk.index_add_(0, flat, dk_c.reshape(-1, d))
            dv.index_add_(0, flat, dv_c.reshape(-1, dv_dim))
    return (dq[:rows].view(q.shape).to(q.dtype), dk.view(k.shape).to(k.dtype), dv.view(v.shape).to(v.dtype))


def _contained_chunk_backward(qg, kg, vg, dog, lse, delta, mask, scale: float):
    """(dq, dk, dv) of one chunk's pairs when some input is NaN or Inf: every product goes
    through ``allowed_dot``/``allowed_sum``, so a pair the mask excludes contributes exactly
    nothing (its P and dS are selected to 0, never multiplied by a NaN row)."""
    mask_t = mask.transpose(-1, -2)
    s = torch.where(mask, allowed_dot(qg, kg, mask) * scale, -math.inf)
    p = torch.where(mask, torch.exp(s - lse[..., None]), 0)
    dp = allowed_dot(dog, vg, mask)
    ds = torch.where(mask, p * (dp - delta[..., None]), 0)
    return (allowed_sum(ds, kg, mask) * scale, allowed_sum(ds.transpose(-1, -2), qg, mask_t) * scale,
            allowed_sum(p.transpose(-1, -2), dog, mask_t))
