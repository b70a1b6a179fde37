"""A build of a long pattern expression loads back (issue 16: the repr of a 600-term union
did not parse, and ``sf.load`` raised the RecursionError raw)."""
from __future__ import annotations

import sparseforge as sf
from sparseforge.runtime.build import save


def test_build_of_a_600_term_union_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEFORGE_CACHE_DIR", str(tmp_path / "cache"))
    union = sf.Union((sf.Sink(1), sf.SlidingWindow(2)) * 300)   # repeated parts: cheap kernels, a long repr
    attn = sf.compile(union, sf.Problem(grid=(64,), heads=1, head_dim=16, dtype="fp16"))
    path = save(attn, tmp_path / "u600", targets=())
    loaded = sf.load(path)
    assert loaded.pattern == union and loaded.name == attn.name
