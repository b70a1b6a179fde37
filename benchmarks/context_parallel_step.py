"""CPU wall time of one context-parallel attention step (forward + backward) in gloo process
groups on this machine, against the single-process CPU executor on the whole grid:

    python benchmarks/context_parallel_step.py [--world 2] [--repeat 3]
        [--out benchmarks/results/context_parallel_step_cpu.json]

Each rank runs on one thread (``torch.set_num_threads(1)``), so on a machine with at least
``world`` cores the ranks run side by side; the single-process step runs on one thread too.
Reported: the median over ``--repeat`` steps of the slowest rank's time, and the bytes each
rank handed to isend. A CPU measures the local compute and the exchange's overheads, not a
GPU's speed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

CASES = [
    # label, pattern, grid, heads, head_dim
    ("2-D 48x48, Neighborhood 7x7", "Neighborhood((7, 7))", (48, 48), 4, 32),
    ("1-D 4096, causal window 256", "Causal() & SlidingWindow(256)", (4096,), 4, 32),
    ("1-D 2048, causal (ring)", "Causal()", (2048,), 4, 32),
]


def _rank(rank: int, world: int, port: int, repeat: int, out_dir: str) -> None:
    import torch.distributed as dist

    import sparseforge as sf
    from sparseforge import distributed as sfd

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    results = []
    for label, pattern, grid, heads, head_dim in CASES:
        problem = sf.Problem(grid=grid, heads=heads, head_dim=head_dim, dtype=torch.float32)
        attn = sfd.ContextParallelAttention(sf.parse_pattern(pattern), problem,
                                            layout="zigzag" if pattern == "Causal()" else "contiguous")
        g = torch.Generator().manual_seed(0)
        q, k, v, go = (torch.randn(1, heads, problem.tokens, head_dim, generator=g) for _ in range(4))
        ql, kl, vl = (attn.shard(t).requires_grad_() for t in (q, k, v))
        times = []
        for _ in range(repeat + 1):             # the first step builds and caches the chunks
            dist.barrier()
            t0 = time.perf_counter()
            attn(ql, kl, vl).backward(attn.shard(go))
            times.append(time.perf_counter() - t0)
        results.append(dict(label=label, exchange=attn.exchange, seconds=times[1:],
                            bytes_sent=attn.stats.forward_bytes_sent // (repeat + 1)))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()
    os._exit(0)


def single_process(repeat: int) -> list[float]:
    """Median seconds of the CPU executor's step on the whole grid, per case."""
    import sparseforge as sf

    torch.set_num_threads(1)
    out = []
    for label, pattern, grid, heads, head_dim in CASES:
        problem = sf.Problem(grid=grid, heads=heads, head_dim=head_dim, dtype=torch.float32)
        attn = sf.compile(sf.parse_pattern(pattern), problem, backend="cpu")
        g = torch.Generator().manual_seed(0)
        q, k, v, go = (torch.randn(1, heads, problem.tokens, head_dim, generator=g) for _ in range(4))
        times = []
        for _ in range(repeat + 1):
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            t0 = time.perf_counter()
            attn(*leaves).backward(go)
            times.append(time.perf_counter() - t0)
        out.append(statistics.median(times[1:]))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/context_parallel_step_cpu.json")
    args = ap.parse_args(argv)
    from sparseforge.atomic import write_atomic
    from sparseforge.bench import run_info

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_rank, args=(r, args.world, port, args.repeat, tmp)) for r in range(args.world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(900)
        per_rank = [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(args.world)]
    alone = single_process(args.repeat)
    cases = []
    print(f"{args.world} gloo ranks, one thread each; seconds of one forward + backward step (median of "
          f"{args.repeat}), slowest rank")
    for i, (label, *_rest) in enumerate(CASES):
        steps = [max(per_rank[r][i]["seconds"][j] for r in range(args.world)) for j in range(args.repeat)]
        cp = statistics.median(steps)
        sent = [per_rank[r][i]["bytes_sent"] for r in range(args.world)]
        cases.append(dict(label=label, exchange=per_rank[0][i]["exchange"], context_parallel_seconds=cp,
                          single_process_seconds=alone[i], forward_bytes_sent_per_rank=sent))
        print(f"  {label:<32} {per_rank[0][i]['exchange']:>4}: {cp:7.3f} s vs {alone[i]:7.3f} s in one process "
              f"({alone[i] / cp:.2f}x), forward bytes sent per rank {sent}")
    if args.out:
        meta = dict(device=f"CPU ({os.cpu_count()} cores), gloo", versions=run_info.versions(), date=run_info.utc_now(),
                    command="python benchmarks/context_parallel_step.py" + "".join(f" {a}" for a in (argv or sys.argv[1:])))
        write_atomic(args.out, json.dumps(dict(schema="sparseforge-context-parallel-step/1", meta=meta,
                                               world=args.world, repeat=args.repeat, cases=cases), indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
