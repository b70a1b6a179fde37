"""Decode over a paged KV cache: ``CompiledAttention.paged(q, cache)``.

    attn = sf.compile(Sink(4) | (Causal() & SlidingWindow(4096)), Problem(grid=1, kv_grid=4096, heads=32,
                      kv_heads=8, head_dim=128, dtype=torch.bfloat16))
    cache = sf.PagedKV(k_pages, v_pages, block_table, cache_lengths)   # vLLM/FlashInfer layout
    out = attn.paged(q, cache)           # q [B, 32, Nq, 128]: the last Nq positions of each sample

On a GPU (or ``backend="interpret"``) the decode kernel reads, through the block table, only
the pages holding keys some query may see, and nothing of the call reads the device on the host:
the split count comes from shapes, the cache lengths are read by the kernel, so the call can be
captured in a CUDA graph (build and validate the ``PagedKV`` outside the graph: its checks
read the block table on the host; inside, update its tensors in place). On the CPU each sample
is gathered and attended on its own (the CPU executor, with gradients). A sample's cache must
hold at least Nq tokens (checked on the CPU; on a GPU the caller's contract, as checking it
would synchronise).
"""
from __future__ import annotations

import torch

from ..dsl.modifiers import modifier_tensors
from ..dsl.paged import PagedKV, gather
from ..dsl.problem import DTYPE_NAMES
from .inputs import check_call_modifiers, check_call_scale, check_return_lse, op_backend


def paged_attention(attn, q: torch.Tensor, cache: PagedKV, *, scale=None, modifiers=None, return_lse: bool = False):
    """``attn`` (a 1-D ``CompiledAttention``) over the paged ``cache``: out [B, H, Nq, D] (and
    the natural-log LSE [B, H, Nq], float32, with ``return_lse``); queries at the last Nq
    positions of each sample's ``cache_lengths[b]`` keys."""
    check_return_lse(return_lse)
    if not isinstance(cache, PagedKV):
        raise TypeError(f"cache must be a sparseforge PagedKV, got {type(cache).__name__}")
    p = attn.problem
    if p.ndim != 1:
        raise ValueError(f"paged decode needs a 1-D problem (a sequence); {attn!r} has grid={p.grid}")
    if not isinstance(q, torch.Tensor) or q.dim() != 4 or q.shape[1] != p.heads or q.shape[3] != p.head_dim:
        raise ValueError(f"q must be [B, heads={p.heads}, Nq, head_dim={p.head_dim}], got "
                         f"{list(getattr(q, 'shape', []))}")
    if q.shape[0] != cache.batch:
        raise ValueError(f"q has batch {q.shape[0]} but cache.block_table has {cache.batch} rows")
    if (cache.kv_heads, cache.head_dim) != (p.kv_heads, p.head_dim):
        raise ValueError(f"cache pages hold kv_heads={cache.kv_heads}, head_dim={cache.head_dim}; {attn!r} was "
                         f"compiled for kv_heads={p.kv_heads}, head_dim={p.head_dim}")
    if q.dtype != p.dtype or cache.dtype != p.dtype:
        raise ValueError(f"q ({DTYPE_NAMES.get(q.dtype, q.dtype)}) and the cache ({DTYPE_NAMES.get(cache.dtype)}) "
                         f"must have the compiled dtype {DTYPE_NAMES[p.dtype]}")
    if cache.k_pages.device != q.device:
        raise ValueError(f"cache is on {cache.k_pages.device} but q is on {q.device}")
    backend = op_backend(p, attn.backend, q)
    if backend == "cpu":
        return _per_sample(attn, q, cache, scale, modifiers, return_lse)
    scale = check_call_scale(scale, attn.head_scale, p, q.device)
    mods = check_call_modifiers(modifiers, attn.modifiers, attn.pattern, p, q.device)
    head_scale = None
    if isinstance(scale, torch.Tensor):
        head_scale, scale = scale, 1.0
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, *modifier_tensors(mods, head_scale))):
        raise NotImplementedError("paged decode on the Triton kernels computes the forward only (inference): run it "
                                  "under torch.no_grad() or with tensors that need no gradient (CPU tensors train)")
    decoder = attn.kernel.decoder(backend == "interpret", page_size=cache.page_size)
    out, lse = decoder.forward(q.contiguous(), cache.k_pages, cache.v_pages, cache.cache_lengths.to(torch.int32),
                               scale, block_table=cache.block_table.to(torch.int32), modifiers=mods or None,
                               head_scale=head_scale)
    return (out, lse) if return_lse else out


def _per_sample(attn, q, cache: PagedKV, scale, modifiers, return_lse: bool):
    """The CPU executor on each sample's gathered keys (decode alignment per sample)."""
    k, v, lengths = gather(cache)
    nq = q.shape[2]
    outs, lses = [], []
    for b, length in enumerate(lengths.tolist()):
        if length < nq:
            raise ValueError(f"cache_lengths[{b}] = {length} is fewer than the {nq} queries (they are the last Nq "
                             "positions of the sample's cache)")
        out, lse = attn(q[b:b + 1], k[b:b + 1, :, :length], v[b:b + 1, :, :length], scale=scale,
                        modifiers=modifiers, return_lse=True)
        outs.append(out)
        lses.append(lse)
    out, lse = torch.cat(outs), torch.cat(lses)
    return (out, lse) if return_lse else out
