"""benchmarks/paged_bytes.py: the K/V bytes of a decode step over a paged cache, checked against
arithmetic done by hand (independent of sparseforge.dsl.paged)."""
from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest
import torch

import sparseforge as sf
from sparseforge.bench import run_info

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "paged_bytes.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("paged_bytes_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SMALL = dict(page_size=4, kv_heads=2, head_dim=8, dtype=torch.float16)
PAGE = 4 * 2 * 8 * 2 * 2        # page_size x kv_heads x head_dim x itemsize x (K and V) = 256
TOKEN = 2 * 8 * 2 * 2           # kv_heads x head_dim x itemsize x 2 = 64 per key


@pytest.mark.parametrize("pattern, n_queries, keys, pages", [
    # one query at position 36 sees 31..36: pages 7, 8, 9
    (sf.SlidingWindow(5), 1, 6, 3),
    # queries 34..36 see 29..36: still pages 7, 8, 9
    (sf.SlidingWindow(5), 3, 8, 3),
    # a sink of 2 adds keys 0, 1 and page 0
    (sf.Sink(2) | sf.SlidingWindow(5), 1, 8, 4),
    # causal: all 37 keys, all 10 pages
    (sf.Causal(), 1, 37, 10),
])
def test_small_case_by_hand(bench, pattern, n_queries, keys, pages):
    row = bench.count(pattern, 37, n_queries=n_queries, **SMALL)
    assert row["pages_read"] == pages and row["allowed_keys"] == keys
    assert row["selected_bytes"] == pages * PAGE
    assert row["allowed_bytes"] == keys * TOKEN
    assert row["dense_pages"] == 10 and row["dense_bytes"] == 10 * PAGE     # ceil(37 / 4) pages


def test_itemsize_counts(bench):
    row = bench.count(sf.SlidingWindow(5), 37, page_size=4, kv_heads=2, head_dim=8, dtype=torch.float32)
    assert row["selected_bytes"] == 3 * 4 * 2 * 8 * 4 * 2 and row["allowed_bytes"] == 6 * 2 * 8 * 4 * 2


def test_the_table_by_hand(bench, tmp_path, capsys):
    main_rows, extras = bench.run()
    per_token = 8 * 128 * 2 * 2                                    # kv_heads x head_dim x bf16 x (K, V)
    for row, n in zip(main_rows, (8192, 131072, 1 << 20)):
        # the window's 4096 keys are exactly 256 aligned pages of 16 (n is a multiple of 16)
        assert (row["cache_tokens"], row["pages_read"], row["allowed_keys"]) == (n, 256, 4096)
        assert row["selected_bytes"] == row["allowed_bytes"] == 4096 * per_token == 16 << 20
        assert row["dense_bytes"] == n * per_token
    unaligned, sink = extras
    assert unaligned["pages_read"] == 257 and unaligned["dense_pages"] == (1 << 16) + 1
    assert sink["pages_read"] == 257 and sink["allowed_keys"] == 4100
    out = tmp_path / "paged_bytes.json"
    assert bench.main(["--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["meta"]["versions"] == run_info.versions() and doc["meta"]["date"]
    assert doc["results"] == main_rows and doc["extras"] == extras
    assert "4,294,967,296" in capsys.readouterr().out             # the 1M dense paged decode, printed exactly

