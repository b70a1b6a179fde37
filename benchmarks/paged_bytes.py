"""K/V bytes one decode step reads from a paged KV cache: our page selection vs the allowed keys vs a
dense paged decode, and what the decode kernel's block walk loads (exact counts from
``sparseforge.dsl.paged`` and ``TritonDecode.keys_read``; no device needed):

    python benchmarks/paged_bytes.py [--out benchmarks/results/paged_bytes.json]

The table: a causal 1-D sliding window of 4096 keys (``SlidingWindow(4095)``: keys in
``[pos - 4095, pos]``) over caches of 8k, 128k and 1M tokens; page_size 16, kv_heads 8,
head_dim 128, bf16, one query (decode, the last position). The pages are described on the meta
device (a 1M-token bf16 cache is 4 GiB): only shapes, dtype and the block table are read.
Extras: an unaligned cache (the window straddles one more page) and StreamingLLM's sink + window.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

import sparseforge as sf
from sparseforge.atomic import write_atomic
from sparseforge.backends.decode import TritonDecode
from sparseforge.bench import run_info
from sparseforge.dsl import paged as P

SETUP = dict(page_size=16, kv_heads=8, head_dim=128, dtype="bf16", n_queries=1)
WINDOW = sf.SlidingWindow(4095)
CACHES = [("8k", 8 << 10), ("128k", 128 << 10), ("1M", 1 << 20)]
EXTRAS = [("1M + 5 (unaligned)", WINDOW, (1 << 20) + 5),
          ("1M, Sink(4) | window", sf.Sink(4) | WINDOW, 1 << 20)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8": torch.float8_e4m3fn}


def meta_cache(length: int, *, page_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> P.PagedKV:
    """One sample holding ``length`` tokens in pages 0, 1, 2, ... (pages on the meta device)."""
    pages = max(1, -(-length // page_size))
    kp = torch.empty(pages, page_size, kv_heads, head_dim, dtype=dtype, device="meta")
    return P.PagedKV(kp, kp, torch.arange(pages, dtype=torch.int32)[None], torch.tensor([length]))


def count(pattern, length: int, *, page_size: int = 16, kv_heads: int = 8, head_dim: int = 128,
          dtype: torch.dtype = torch.bfloat16, n_queries: int = 1) -> dict:
    """One row: pages and bytes of a decode step of ``n_queries`` over a cache of ``length`` tokens."""
    cache = meta_cache(length, page_size=page_size, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype)
    c = P.bytes_read(pattern, cache, n_queries)
    # the decode kernel's own walk: key blocks of its ranges (backends.decode.TritonDecode.keys_read)
    decoder = TritonDecode(pattern, sf.Problem(grid=1, heads=4 * kv_heads, kv_heads=kv_heads, head_dim=head_dim,
                                               dtype=dtype if dtype != torch.float8_e4m3fn else torch.float16),
                           page_size=page_size)
    kernel_keys = decoder.keys_read(n_queries, length)
    kernel_bytes = 2 * kernel_keys * kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()
    return dict(pattern=repr(pattern), cache_tokens=length, pages_read=c.pages[0], allowed_keys=c.keys[0],
                kernel_keys=kernel_keys, kernel_bytes=kernel_bytes,
                dense_pages=c.dense_pages[0], selected_bytes=c.selected_bytes, allowed_bytes=c.allowed_bytes,
                dense_bytes=c.dense_bytes, selected_over_allowed=round(c.selected_bytes / c.allowed_bytes, 4),
                dense_over_selected=round(c.dense_bytes / c.selected_bytes, 1))


def table(rows: list[dict]) -> str:
    """The rows as text: exact bytes (K and V) per decode step, and their ratios."""
    head = f"{'cache':>22} {'pages read':>10} {'selected bytes':>15} {'kernel bytes':>13} {'allowed bytes':>15} " \
           f"{'dense paged bytes':>17} {'sel/allowed':>11} {'dense/sel':>9}"
    lines = [head]
    for r in rows:
        lines.append(f"{r['label']:>22} {r['pages_read']:>10,} {r['selected_bytes']:>15,} {r['kernel_bytes']:>13,} "
                     f"{r['allowed_bytes']:>15,} "
                     f"{r['dense_bytes']:>17,} {r['selected_over_allowed']:>11.4f} {r['dense_over_selected']:>8.1f}x")
    return "\n".join(lines)


def run(setup: dict = SETUP) -> tuple[list[dict], list[dict]]:
    kw = dict(setup, dtype=DTYPES[setup["dtype"]])
    main_rows = [dict(label=label, **count(WINDOW, n, **kw)) for label, n in CACHES]
    extras = [dict(label=label, **count(p, n, **kw)) for label, p, n in EXTRAS]
    return main_rows, extras


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/paged_bytes.json",
                    help="write the results as JSON here ('' for none)")
    args = ap.parse_args(argv)
    main_rows, extras = run()
    print(f"{WINDOW!r} decode, " + ", ".join(f"{k} {v}" for k, v in SETUP.items()))
    print(table(main_rows))
    print("extras")
    print(table(extras))
    if args.out:
        meta = dict(device="none needed (exact counts)", versions=run_info.versions(), date=run_info.utc_now(),
                    command="python benchmarks/paged_bytes.py" + "".join(f" {a}" for a in (argv or sys.argv[1:])))
        doc = dict(meta=meta, setup=SETUP, results=main_rows, extras=extras)
        write_atomic(args.out, json.dumps(doc, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
