"""Context parallelism: one attention over a token grid sharded across the ranks of a
``torch.distributed`` process group, with the K/V exchange derived from the pattern.

Each rank holds its shard of q, k, v ``[B, H|kv_heads, N_local, D]`` and gets its shard of the
output; forward and backward (the gradients of its own q, k, v) equal the single-process
attention. Nothing is approximate: the plan is token-exact and the compute is the CPU
executor's, over the pattern's tiles with its exact mask.

The stages, one module each:

- ``plan``: which tokens each rank holds (``layout`` "contiguous" | "zigzag" along grid
  dimension 0, or ``split`` along several leading dimensions) and which remote key rows its
  queries may see, from the tile schedule;
  how those rows move (``exchange`` "p2p": halos, sinks and global tokens point to point;
  "ring": shards passed round the ring as far as some rank needs them, for Full/Causal);
- ``local``: a rank's work split by where the keys live, and the LSE merge;
- ``comm``: rounds of isend/irecv with a timeout on every wait (``PeerError``);
- ``attention``: the autograd Function that overlaps each round with the compute of the
  sources already at hand, and ``ContextParallelAttention``.

Usage (one process per rank, after ``torch.distributed.init_process_group``)::

    import sparseforge as sf
    from sparseforge import distributed as sfd

    problem = sf.Problem(grid=(32, 48, 80), heads=8, head_dim=64)
    attn = sfd.ContextParallelAttention(sf.Neighborhood((9, 13, 13)), problem)
    q_l, k_l, v_l = (attn.shard(t) for t in (q, k, v))   # this rank's rows (or build shards directly)
    out_l = attn(q_l, k_l, v_l)          # [B, H, N_local, D], differentiable

DTensors sharded on the token dimension (``Shard(2)`` over a 1-D mesh) go in and come out as
DTensors; under ``torch.compile`` the exchange runs outside the graph (a graph break).

Score modifiers (tables, T5, ALiBi, softcap, sinks, a per-head scale), ``Grouped`` patterns
(group ids per call) and key padding masks are taken; every rank gets its share of the
modifiers' gradients.

Not covered: Routed and Scattered patterns (their routes and coordinates are per call and
global), problems with a ``kv_grid``. The local compute is the CPU executor (torch ops on
whatever device the tensors are on), not the fused Triton kernels, whose grid extents are
compiled in.
"""
from .attention import ContextParallelAttention, context_parallel_attention
from .comm import CommStats, PeerError
from .local import CHUNK_ELEMENTS
from .plan import (EXCHANGES, LAYOUTS, ExchangePlan, brute_force_recv, choose_exchange, plan_exchange,
                   shard_sizes)

__all__ = ["CHUNK_ELEMENTS", "EXCHANGES", "LAYOUTS", "CommStats", "ContextParallelAttention", "ExchangePlan",
           "PeerError", "brute_force_recv", "choose_exchange", "context_parallel_attention", "plan_exchange",
           "shard_sizes"]
