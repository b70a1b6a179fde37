"""How much of the scattered (voxel-window) kernels' tile work is useful, per tile shape
and window alignment of the packed sequence: exact counts, no timing.

Today (``lower.segments``) windows are packed back to back, so a tile of packed rows can
straddle two windows and visit the key tiles of both. Starting every window at a multiple
of ``align`` rows (padding rows in between) trades extra rows for fewer straddling tiles.
For each (query tile, key tile, align) this prints the (query tile, key tile) pairs the
forward visits, the tile efficiency (allowed pairs / visited pairs x tile area) and the
extra rows. Input: P8's synthetic voxel set (``peers.make_voxels``, 131072 voxels, 4 batch
elements, windows 12x12).

    python benchmarks/scattered_packing.py [--voxels 131072] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

TILES = ((128, 32), (64, 32), (64, 64), (32, 32), (32, 16), (16, 16))


def packed_windows(sizes: np.ndarray, align: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(start [W], end [W], rows): window w holds packed rows [start, end); every start is a
    multiple of ``align``; ``rows`` is the padded sequence length."""
    padded = -(-sizes // align) * align
    start = np.concatenate([[0], np.cumsum(padded)[:-1]]).astype(np.int64)
    return start, start + sizes, int(padded.sum())


def visited_tiles(sizes: np.ndarray, block_m: int, block_n: int, align: int) -> tuple[int, int]:
    """(visited (query tile, key tile) pairs, packed rows) of the forward: a query tile visits
    the key tiles from its first window's first row to its last window's last row (the
    range ``lower.segments`` builds)."""
    start, end, rows = packed_windows(sizes, align)
    first = np.arange(0, rows, block_m)
    # windows overlapping each query tile: the first whose end is past the tile's first row,
    # the last whose start is before the tile's end
    w0 = np.searchsorted(end, first, side="right")
    w1 = np.searchsorted(start, first + block_m, side="left") - 1
    real = w0 <= w1  # a tile of padding rows only visits nothing
    w0, w1 = w0[real], w1[real]
    return int(((end[w1] - 1) // block_n - start[w0] // block_n + 1).sum()), rows


def allowed_pairs(sizes: np.ndarray) -> int:
    """(query, key) pairs of windows of ``sizes`` voxels: every voxel attends to its window."""
    return int((sizes.astype(np.int64) ** 2).sum())


def measure(sizes: np.ndarray) -> list[dict]:
    pairs = allowed_pairs(sizes)
    out = []
    for bm, bn in TILES:
        for align in sorted({1, 16, 32, bm}):
            tiles, rows = visited_tiles(sizes, bm, bn, align)
            out.append(dict(q_tile=bm, k_tile=bn, align=align, visited_tiles=tiles,
                            tile_efficiency=pairs / (tiles * bm * bn), packed_rows=rows,
                            extra_rows=rows / int(sizes.sum()) - 1))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--voxels", type=int, default=131072)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--out", help="write the result as JSON here")
    args = ap.parse_args(argv)

    import sparseforge as sf
    from sparseforge.atomic import write_atomic
    from sparseforge.lower.segments import sort_into_windows

    from . import peers, run_info

    pattern = sf.Scattered((12, 12))
    coords = peers.make_voxels(args.voxels, batch=args.batch, seed=0)
    seg = sort_into_windows(pattern, coords)[1]
    sizes = np.bincount(seg.numpy())
    rows = measure(sizes)
    for r in rows:
        print(f"q {r['q_tile']:3} k {r['k_tile']:3} align {r['align']:3}: visited {r['visited_tiles']:6}, "
              f"tile efficiency {r['tile_efficiency']:.3f}, rows +{r['extra_rows']:.1%}")
    if args.out:
        meta = dict(device=run_info.device_name(cuda=False) + " (exact counts, no timing)",
                    versions=run_info.versions(), date=run_info.utc_now(),
                    command="python benchmarks/scattered_packing.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                    pattern=repr(pattern), voxels=int(sizes.sum()), windows=len(sizes),
                    window_voxels=dict(mean=float(sizes.mean()), min=int(sizes.min()), max=int(sizes.max())),
                    generator="sparseforge/bench/peers.py make_voxels(seed=0)", allowed_pairs=allowed_pairs(sizes),
                    note="exact counts of the forward's visited (query tile, key tile) pairs; align 1 is what "
                         "lower.segments packs today")
        write_atomic(args.out, (json.dumps(dict(meta=meta, results=rows), indent=1) + "\n").encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
