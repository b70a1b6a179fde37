"""How long a new shape costs: the time for a compiled attention to meet a grid it has not
seen — its schedule built (and cached) inside the op, no new op, no recompile. CPU-only.

    python benchmarks/schedule_build.py [--repeat 3] [--out benchmarks/results/schedule_build_cpu.json]

Each case compiles the pattern once at a small grid, then times ``Kernel.at(grid)`` (what the
``sparseforge::attention`` op runs on its first call at that grid) on a fresh kernel entry per
repeat, so every timing builds the schedule from nothing; the median is reported.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import sparseforge as sf
from sparseforge.atomic import write_atomic
from sparseforge.lower.paths import path_of
from sparseforge.runtime import ops

from . import run_info

# (label, pattern, grid the attention is compiled at, the new grid it then meets)
CASES = [
    ("1-D 1M tokens, window 2049", sf.SlidingWindow(1024, 1024), (4096,), (1 << 20,)),
    ("2-D 256x256, kernel 80", sf.Neighborhood(80), (96, 96), (256, 256)),
]


def measure(pattern, small, grid, repeat: int) -> dict:
    """Median seconds of ``Kernel.at(grid)`` on fresh kernel entries, and the schedule's size."""
    problem = sf.Problem(grid=small, heads=8, head_dim=64, dtype=torch.bfloat16)
    attn = sf.compile(pattern, problem)
    seconds, schedule = [], None
    for _ in range(repeat):
        kernel = ops.Kernel(path_of(pattern), attn.schedule, attn.config)  # a fresh cache: nothing built yet
        t0 = time.perf_counter()
        schedule = kernel.at(grid).schedule
        seconds.append(time.perf_counter() - t0)
    return dict(seconds=statistics.median(seconds), all_seconds=seconds, tiles=list(schedule.geometry.q_tile),
                visited_tile_pairs=schedule.visited_tiles, loop_bounds=schedule.loop_bounds)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    rows = []
    for label, pattern, small, grid in CASES:
        row = dict(label=label, pattern=repr(pattern), grid=list(grid), **measure(pattern, small, grid, args.repeat))
        rows.append(row)
        print(f"{label}: {row['seconds'] * 1e3:.0f} ms (median of {args.repeat}), "
              f"{row['visited_tile_pairs']} visited tile pairs (summed over 8 heads), {row['loop_bounds']}", file=sys.stderr)
    result = dict(schema="sparseforge-schedule-build/1", device=run_info.device_name(False),
                  versions=run_info.versions(), date=run_info.utc_now(),
                  command="python benchmarks/schedule_build.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  cases=rows)
    if args.out:
        write_atomic(args.out, json.dumps(result, indent=2) + "\n")
    return 0
