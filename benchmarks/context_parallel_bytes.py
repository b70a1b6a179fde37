"""Bytes each rank sends for one context-parallel attention step: sparseforge's exchange plan
(``sparseforge.distributed.plan_exchange``: exactly the remote K/V rows each rank's queries may
see) vs all-gathering K/V and vs ring attention. Exact counts from the plan; nothing is run on a
device and no process group is started:

    python benchmarks/context_parallel_bytes.py [--out benchmarks/results/context_parallel_bytes.json]

Cases: a 30x48x80 video latent with ``Neighborhood((18, 24, 24))`` (cut along time, and
along time, height and width in halves: ``split=(2, 2, 2)``), a 1,048,576-token
sequence with ``Causal() & SlidingWindow(4096)`` and a 131,072-token ``Causal()`` sequence,
each over 8 ranks sharded contiguously along the slowest dimension (30 frames ->
4,4,4,4,4,4,3,3 frames; 1M tokens -> 131,072 each).
K/V: batch 1, 8 kv heads, head_dim 128, bf16, so one token's K and V rows are 4,096 bytes.

What each column counts, per rank r (bytes sent; S_p = bytes of rank p's K/V shard, T = sum S_p):
- ours: ``ExchangePlan.bytes_sent`` under the exchange ``choose_exchange`` picks (the
  ``exchange`` of each case). p2p forward: the K and V rows of r's tokens that other ranks'
  queries may see (one message per peer); backward: dK and dV of the rows r received, back to
  their owners. ring forward: the shards r passes on, each only as far as the last rank that
  needs it; backward: the same hops with K/V and the dK/dV sum in float32, then the sum home
  (the float32 sums are why the ring's backward moves 3x its forward in bf16: the ring is
  chosen for its memory, at most three shards held at a time, not for its bytes).
- all-gather (ring algorithm, as NCCL/gloo run it): forward all-gather of K/V, r forwards every
  block except that of rank r+1: T - S_{r+1}. Backward: reduce-scatter of dK/dV, r sends a partial
  sum of every block except its own: T - S_r.
- ring attention (ring-flash-attention's schedule): forward rotates K/V R-1 hops: T - S_{r+1};
  backward rotates K/V again (T - S_{r+1}) and the dK/dV accumulators R hops until they are home
  (T). Causal ring variants skip compute, not messages.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import sparseforge as sf
from sparseforge import distributed as sfd
from sparseforge.atomic import write_atomic
from sparseforge.bench import run_info

SETUP = dict(world_size=8, batch=1, kv_heads=8, head_dim=128, dtype="bf16", layout="contiguous")
CASES = [  # (label, pattern, grid, heads, split of the leading grid dimensions or None)
    ("3-D 30x48x80, Neighborhood 18x24x24", sf.Neighborhood((18, 24, 24)), (30, 48, 80), 8, None),
    ("3-D 30x48x80, Neighborhood 18x24x24, split 2x2x2", sf.Neighborhood((18, 24, 24)), (30, 48, 80), 8, (2, 2, 2)),
    ("1-D 1,048,576 tokens, causal window 4096", sf.Causal() & sf.SlidingWindow(4096), (1 << 20,), 32, None),
    ("1-D 131,072 tokens, causal", sf.Causal(), (1 << 17,), 32, None),
]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def count(label: str, pattern, grid, heads: int, setup: dict = SETUP, split=None) -> dict:
    """One case: per-rank exact bytes sent by the plan, by an all-gather and by ring attention."""
    world = setup["world_size"]
    problem = sf.Problem(grid=grid, heads=heads, kv_heads=setup["kv_heads"], head_dim=setup["head_dim"],
                         dtype=DTYPES[setup["dtype"]])
    t0 = time.perf_counter()
    plan = sfd.plan_exchange(pattern, problem, world, layout=setup["layout"], split=split, count_work=False)
    seconds = time.perf_counter() - t0
    row = plan.row_bytes(batch=setup["batch"])
    exchange = sfd.choose_exchange(plan)
    shard = [len(t) * row for t in plan.tokens]
    total = sum(shard)
    ranks = []
    for r in range(world):
        nxt = shard[(r + 1) % world]
        ranks.append(dict(
            rank=r, tokens=len(plan.tokens[r]), rows_sent=plan.rows_sent(r), rows_received=plan.rows_received(r),
            peers_sent_to=[p for p in range(world) if len(plan.recv[p][r])],
            ours_forward=plan.bytes_sent(r, exchange=exchange, batch=setup["batch"]),
            ours_backward=plan.bytes_sent(r, exchange=exchange, direction="backward", batch=setup["batch"]),
            allgather_forward=total - nxt, allgather_backward=total - shard[r],
            ring_forward=total - nxt, ring_backward=(total - nxt) + total))
    sums = {k: sum(x[k] for x in ranks) for k in ranks[0] if k.endswith(("forward", "backward"))}
    maxes = {k: max(x[k] for x in ranks) for k in sums}
    ours_step = sums["ours_forward"] + sums["ours_backward"]
    return dict(label=label, pattern=repr(pattern), grid=list(grid), heads=heads, split=list(plan.split),
                exchange=exchange, token_row_bytes=row,
                plan_seconds=round(seconds, 2), ranks=ranks, total=sums, max_per_rank=maxes,
                allgather_over_ours=round((sums["allgather_forward"] + sums["allgather_backward"]) / ours_step, 2),
                ring_over_ours=round((sums["ring_forward"] + sums["ring_backward"]) / ours_step, 2))


def _mib(b: int) -> str:
    return f"{b / 2**20:,.1f}"


def table(case: dict) -> str:
    """Per-rank MiB sent (forward / backward) and the totals."""
    head = (f"{'rank':>5} {'tokens':>8} {'peers':>12} {'ours fwd':>10} {'ours bwd':>10} {'all-gather fwd':>15} "
            f"{'all-gather bwd':>15} {'ring fwd':>10} {'ring bwd':>10}")
    lines = [f"{case['label']}: {case['pattern']}, ours by {case['exchange']}, MiB sent per rank (1 MiB = 2^20 bytes)",
             head]
    for r in case["ranks"]:
        peers = ",".join(map(str, r["peers_sent_to"])) or "-"
        lines.append(f"{r['rank']:>5} {r['tokens']:>8,} {peers:>12} {_mib(r['ours_forward']):>10} "
                     f"{_mib(r['ours_backward']):>10} {_mib(r['allgather_forward']):>15} "
                     f"{_mib(r['allgather_backward']):>15} {_mib(r['ring_forward']):>10} {_mib(r['ring_backward']):>10}")
    t, m = case["total"], case["max_per_rank"]
    for name, d in (("total", t), ("max", m)):
        lines.append(f"{name:>5} {'':>8} {'':>12} {_mib(d['ours_forward']):>10} {_mib(d['ours_backward']):>10} "
                     f"{_mib(d['allgather_forward']):>15} {_mib(d['allgather_backward']):>15} "
                     f"{_mib(d['ring_forward']):>10} {_mib(d['ring_backward']):>10}")
    lines.append(f"forward + backward, all ranks: all-gather / ours = {case['allgather_over_ours']}x, "
                 f"ring / ours = {case['ring_over_ours']}x (plan built in {case['plan_seconds']} s)")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/context_parallel_bytes.json",
                    help="write the results as JSON here ('' for none)")
    args = ap.parse_args(argv)
    print(", ".join(f"{k} {v}" for k, v in SETUP.items()))
    cases = []
    for label, pattern, grid, heads, split in CASES:
        case = count(label, pattern, grid, heads, split=split)
        cases.append(case)
        print(table(case))
        print()
    if args.out:
        meta = dict(device="none needed (exact counts from the exchange plan)", versions=run_info.versions(),
                    date=run_info.utc_now(),
                    command="python benchmarks/context_parallel_bytes.py" + "".join(f" {a}" for a in (argv or sys.argv[1:])))
        doc = dict(schema="sparseforge-context-parallel-bytes/1", meta=meta, setup=SETUP, cases=cases)
        write_atomic(args.out, json.dumps(doc, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
