"""The sparseforge benchmark suite: every problem of the issue, side by side with its peers.

    sparseforge bench --suite --cpu [--only P1,P4] [--json] [--out FILE] [--plot FILE]
    sparseforge bench --suite            # GPU mode: full-size problems on a CUDA device
    python benchmarks/suite.py plot RESULTS.json OUT.png

This module gathers the suite's public names (what the CLI and the tests use) and its
command line; the code lives by concern in ``cases`` (the problems and the scaling rule),
``efficiency`` (exact tile counts), ``peers``, ``timing``, ``content`` (P7-P9 harnesses),
``runner`` (CPU and GPU modes, metadata) and ``report`` (table, plot).

The settings are read in their own modules, so patch them there, not here:
``cases.CASES`` / ``cases.PROBLEM_IDS`` (what ``select`` and ``run_suite`` see) and
``peers.FLEX_COMPILE``.
"""
from __future__ import annotations

import json
import sys

from .cases import (CASES, FLEX, GATHER, HALO, MAXVIT, NATTEN, PADDED, PROBLEM_IDS, SCATTER_LINEAR, SDPA, Case,
                    Shape, has_harness, not_runnable_reason, random_qkv, select)
from .content import ContentRun, content_run, numerics_vs_ours, voxel_coords, voxel_stats
from .efficiency import (exact_allowed_pairs, measure_tile_efficiency, one_d_visited_tiles, routed_allowed_pairs,
                         routed_tile_efficiency, voxel_allowed_pairs, voxel_tile_efficiency)
from .messages import log
from .peers import (FLEX_COMPILE, dense_mask_mod, halo_attention_unfold, make_flex, maxvit_reshape_sdpa,
                    natten_forward, sdpa_mask_bytes, torch_peer, vectorised_mask_mod)
from .report import plot, table_rows
from .runner import SCHEMA, metadata, run_cpu_case, run_gpu_case, run_suite
from .timing import measure_compile, measure_schedule_build, speedups

__all__ = [
    "CASES", "FLEX", "GATHER", "HALO", "MAXVIT", "NATTEN", "PADDED", "PROBLEM_IDS", "SCATTER_LINEAR", "SDPA", "Case",
    "Shape", "has_harness", "not_runnable_reason", "random_qkv", "select",
    "ContentRun", "content_run", "numerics_vs_ours", "voxel_coords", "voxel_stats",
    "exact_allowed_pairs", "measure_tile_efficiency", "one_d_visited_tiles", "routed_allowed_pairs",
    "routed_tile_efficiency", "voxel_allowed_pairs", "voxel_tile_efficiency",
    "FLEX_COMPILE", "dense_mask_mod", "halo_attention_unfold", "make_flex", "maxvit_reshape_sdpa", "natten_forward",
    "sdpa_mask_bytes", "torch_peer", "vectorised_mask_mod",
    "plot", "table_rows", "SCHEMA", "metadata", "run_cpu_case", "run_gpu_case", "run_suite",
    "measure_compile", "measure_schedule_build", "speedups", "main",
]


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="sparseforge benchmark suite helpers "
                                             "(run the suite with 'sparseforge bench --suite').")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("plot", help="plot RESULTS.json into OUT.png")
    p.add_argument("results")
    p.add_argument("out")
    args = ap.parse_args(argv)
    with open(args.results) as f:
        plot(json.load(f), args.out)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
