"""Small helpers shared by the DSL tests."""
from __future__ import annotations

import numpy as np

import sparseforge as sf


def lit(*rows: str) -> np.ndarray:
    """A bool mask written out by hand: one string of '0'/'1' per query row (spaces ignored)."""
    out = np.array([[c == "1" for c in r.replace(" ", "")] for r in rows], dtype=bool)
    assert out.ndim == 2, rows
    return out


def show(m: np.ndarray) -> str:
    return "\n".join("".join("1" if v else "0" for v in r) for r in np.asarray(m))


def dense(pattern, grid, heads: int = 1, kv_heads: int | None = None, **kw) -> np.ndarray:
    """``sf.dense_mask`` as numpy: [H, N, N] (or [B, H, N, N] for routed patterns)."""
    problem = sf.Problem(grid=grid, heads=heads, head_dim=4, kv_heads=kv_heads)
    return sf.dense_mask(pattern, problem, **kw).numpy()


def assert_mask_equal(got: np.ndarray, want: np.ndarray, what: str = "") -> None:
    got, want = np.asarray(got, dtype=bool), np.asarray(want, dtype=bool)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    if not np.array_equal(got, want):
        bad = np.argwhere(got != want)
        msg = f"{what}: {len(bad)} entries differ, first at {tuple(bad[0])}"
        if got.ndim == 2 and got.shape[0] <= 40:
            msg += f"\n--- got\n{show(got)}\n--- want\n{show(want)}"
        raise AssertionError(msg)
