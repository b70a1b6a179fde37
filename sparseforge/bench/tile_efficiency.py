"""Tile efficiency (allowed pairs / pairs inside visited tiles), sparseforge's N-D tiles
against 1-D 128x128 tiles of the row-major sequence (FlexAttention's BlockMask), for the
problems of issue 3. Exact and CPU-only.

    python benchmarks/tile_efficiency.py [--out benchmarks/results/tile_efficiency_cpu.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time

import torch

import sparseforge as sf
from sparseforge.lower import build_schedule

# (label, pattern, grid, N-D query tile[, key tile]; the key tile defaults to the query tile)
PROBLEMS = [
    ("2-D 128x128 kernel 31", sf.Neighborhood(31), (128, 128), (8, 16)),
    ("2-D 256x256 kernel 80", sf.Neighborhood(80), (256, 256), (8, 16)),
    ("2-D 256x256 kernel 80 stride 16", sf.Neighborhood(80, stride=16), (256, 256), (8, 16)),
    ("3-D 30x48x80 kernel 18x24x24", sf.Neighborhood((18, 24, 24)), (30, 48, 80), (4, 4, 8)),
    ("3-D 30x48x80 kernel 18x24x24, 8x4x4", sf.Neighborhood((18, 24, 24)), (30, 48, 80), (8, 4, 4)),
    ("3-D 30x48x80 kernel 18x24x24, k 2x4x4", sf.Neighborhood((18, 24, 24)), (30, 48, 80), (4, 4, 8), (2, 4, 4)),
    ("2-D 56x56 kernel 7", sf.Neighborhood(7), (56, 56), (8, 16)),
    ("2-D 56x56 kernel 7, 4x8 tiles", sf.Neighborhood(7), (56, 56), (4, 8)),
    ("2-D 56x56 kernel 7 dilation 4", sf.Neighborhood(7, dilation=4), (56, 56), (8, 16)),
    ("2-D 14x14 kernel 7 (= one dilation group)", sf.Neighborhood(7), (14, 14), (8, 16)),
    ("2-D 56x56 kernel 7 dilation 4, 4x8 tiles", sf.Neighborhood(7, dilation=4), (56, 56), (4, 8)),
    ("2-D 14x14 kernel 7, 4x8 tiles", sf.Neighborhood(7), (14, 14), (4, 8)),
    ("1-D 32k window 2049", sf.Neighborhood(2049), (32768,), (128,)),
    ("HaloNet 64x64 block 8 halo 3", sf.Halo(8, 3), (64, 64), (8, 16)),
    ("S2 32k block 64 local 16 stride 16", sf.StridedShards(64, 16, 16), (32768,), (128,)),
    ("MaxViT 64x64 block 8", sf.Blocks(8), (64, 64), (8, 16)),
    ("MaxViT 64x64 grid 8", sf.Grid(8), (64, 64), (8, 16)),
]


# Schedule build time at scale (default kernel tiles: codegen.config.default_tile_tokens).
BUILD_TIME = [
    ("1-D 1M tokens, window 2049 (Neighborhood)", sf.Neighborhood(2049), (1 << 20,)),
    ("1-D 1M tokens, SlidingWindow(1024, 1024)", sf.SlidingWindow(1024, 1024), (1 << 20,)),
    ("3-D 30x48x80 kernel 18x24x24", sf.Neighborhood((18, 24, 24)), (30, 48, 80)),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--skip-1d", action="store_true", help="skip the O(N^2) 1-D comparison")
    args = ap.parse_args(argv)
    rows = []
    for label, pattern, grid, tile, *k_tile in PROBLEMS:
        problem = sf.Problem(grid=grid, heads=1)
        k_tile = k_tile[0] if k_tile else tile
        t0 = time.perf_counter()
        s = build_schedule(pattern, problem, q_tile=tile, k_tile=k_tile)
        build = time.perf_counter() - t0
        ours = s.tile_efficiency
        one_d = None if args.skip_1d else s.one_d_efficiency(128)
        row = dict(problem=label, pattern=repr(pattern), grid=list(grid), tile=list(tile), k_tile=list(k_tile),
                   fold=list(s.geometry.fold), loop_bounds=s.loop_bounds,
                   ours=round(ours, 4), one_d_128=None if one_d is None else round(one_d, 4),
                   gain=None if not one_d else round(ours / one_d, 2), visited_tiles=s.visited_tiles,
                   full_tiles=s.full_tiles, schedule_build_s=round(build, 4))
        rows.append(row)
        print(f"{label:36s} ours {ours:.3f}  1-D {one_d if one_d is None else round(one_d, 3)}  "
              f"gain {row['gain']}  build {build * 1e3:.1f} ms", flush=True)
    builds = []
    for label, pattern, grid in BUILD_TIME:
        s = build_schedule(pattern, sf.Problem(grid=grid, heads=1))
        builds.append(dict(problem=label, tiles=[list(s.geometry.q_tile), list(s.geometry.k_tile)],
                           visited_tiles=s.visited_tiles, schedule_build_s=round(s.build_seconds, 4)))
        print(f"build {label:44s} {s.build_seconds * 1e3:.0f} ms ({s.visited_tiles} visited tiles)", flush=True)
    if args.out:
        meta = dict(device="cpu (exact, no GPU needed)", sparseforge=sf.__version__, torch=torch.__version__,
                    python=platform.python_version(), date=datetime.date.today().isoformat(),
                    command="python " + " ".join(sys.argv))
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, results=rows, schedule_build=builds), f, indent=1)


if __name__ == "__main__":
    main()
