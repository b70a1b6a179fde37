"""One decode step on a GPU: sparseforge's decode kernel (contiguous and paged caches) against
torch's SDPA over the keys the window allows and over the whole cache (masked).

    python benchmarks/decode.py [--caches 8192,131072] [--out benchmarks/results/decode_gpu.json]

Setup: batch 1, 32 query heads on 8 KV heads, head_dim 128, bf16, one query (the last
position), a causal window of 4096 keys plus 4 sink tokens, pages of 16. Times are medians of
``triton.testing.do_bench`` in ms. Needs a CUDA GPU (the ahead-of-time figures of the kernel
are in tests/codegen/test_decode_kernels.py; its bytes in benchmarks/paged_bytes.py).
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
from sparseforge.dsl.paged import paginate

HEADS, KV_HEADS, HEAD_DIM, WINDOW, SINKS, PAGE = 32, 8, 128, 4096, 4, 16


def bench_cache(n: int) -> dict:
    """Median ms of one decode step over a cache of ``n`` tokens, four ways."""
    from triton.testing import do_bench

    pattern = sf.Sink(SINKS) | (sf.Causal() & sf.SlidingWindow(WINDOW - 1))
    problem = sf.Problem(grid=1, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype=torch.bfloat16)
    dev = "cuda"
    q = torch.randn(1, HEADS, 1, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    k, v = (torch.randn(1, KV_HEADS, n, HEAD_DIM, device=dev, dtype=torch.bfloat16) for _ in range(2))
    lengths = torch.tensor([n], dtype=torch.int32, device=dev)
    cache = paginate(k, v, lengths.cpu(), PAGE)
    scale = HEAD_DIM ** -0.5
    contiguous, paged = TritonDecode(pattern, problem), TritonDecode(pattern, problem, page_size=PAGE)
    # SDPA over the allowed keys only (sinks + window, gathered once outside the timing)
    keys = torch.cat([torch.arange(SINKS), torch.arange(max(SINKS, n - WINDOW), n)]).to(dev)
    k_sel, v_sel = (t[:, :, keys].repeat_interleave(HEADS // KV_HEADS, 1) for t in (k, v))
    k_all, v_all = (t.repeat_interleave(HEADS // KV_HEADS, 1) for t in (k, v))
    allowed = torch.zeros(1, 1, 1, n, dtype=torch.bool, device=dev)
    allowed[..., keys] = True
    sdpa = torch.nn.functional.scaled_dot_product_attention
    ms = {
        "sparseforge_contiguous": do_bench(lambda: contiguous.forward(q, k, v, lengths, scale)),
        "sparseforge_paged": do_bench(lambda: paged.forward(q, cache.k_pages, cache.v_pages, lengths, scale,
                                                            block_table=cache.block_table)),
        "sdpa_allowed_keys_only": do_bench(lambda: sdpa(q, k_sel, v_sel, scale=scale)),
        "sdpa_whole_cache_masked": do_bench(lambda: sdpa(q, k_all, v_all, attn_mask=allowed, scale=scale)),
    }
    kv_bytes = 2 * contiguous.keys_read(1, n) * KV_HEADS * HEAD_DIM * 2
    return dict(cache_tokens=n, median_ms=ms, kernel_kv_bytes=kv_bytes,
                kernel_gb_per_s=round(kv_bytes / (ms["sparseforge_paged"] * 1e-3) / 1e9, 1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--caches", default="8192,131072,1048576", help="cache lengths, comma separated")
    ap.add_argument("--out", default="benchmarks/results/decode_gpu.json", help="JSON to write ('' for none)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/decode.py times the decode kernel on a CUDA GPU; none here (its static figures: "
              "pytest tests/codegen/test_decode_kernels.py -k sm90 -s)", file=sys.stderr)
        return 2
    rows = [bench_cache(int(n)) for n in args.caches.split(",")]
    for r in rows:
        print(r["cache_tokens"], {k: round(v, 4) for k, v in r["median_ms"].items()}, f"{r['kernel_gb_per_s']} GB/s")
    if args.out:
        meta = dict(device=run_info.device_name(True), versions=run_info.versions(), date=run_info.utc_now(),
                    command="python benchmarks/decode.py" + "".join(f" {a}" for a in (argv or sys.argv[1:])))
        setup = dict(batch=1, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype="bf16", window=WINDOW,
                     sinks=SINKS, page_size=PAGE, n_queries=1)
        write_atomic(args.out, json.dumps(dict(meta=meta, setup=setup, results=rows), indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
