"""Timing: wall-clock medians of repeated calls, a forward (+ backward) step, the speedup
over the best peer, and the set-up measurements: ``build_schedule`` vs FlexAttention's
``create_block_mask``, and cold / warm ``sf.compile`` in an empty cache directory."""
from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from typing import Callable

import torch

import sparseforge as sf
from sparseforge.lower.schedule import build_schedule

from .cases import Case
from .messages import why
from .peers import vectorised_mask_mod


def _times_s(fn: Callable[[], object], repeat: int) -> list[float]:
    """Wall seconds of ``repeat`` calls after one warm-up call."""
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _median_s(fn: Callable[[], object], repeat: int) -> float:
    return statistics.median(_times_s(fn, repeat))


def _timed_ms(fn: Callable[[], object], repeat: int) -> dict:
    """median and min (the min is robust to other processes sharing the CPU) in ms."""
    times = _times_s(fn, repeat)
    return dict(median_ms=statistics.median(times) * 1e3, min_ms=min(times) * 1e3, runs=repeat)


def _step(forward: Callable[[], torch.Tensor], backward: bool, grads: tuple[torch.Tensor, ...]):
    def run():
        for t in grads:
            t.grad = None
        out = forward()
        if backward:
            out.float().sum().backward()
        return out
    return run


def speedups(op_times: dict, ours: str = "sparseforge") -> dict:
    """Per direction: best peer's median / ours (> 1: we are faster) and which peer (names
    starting with ``ours``, such as ``sparseforge_plan``, are ours, not peers)."""
    out = {}
    for key in ("forward", "forward_backward"):
        mine = op_times.get(ours, {}).get(key, {}).get("median_ms")
        peers = {n: t[key]["median_ms"] for n, t in op_times.items()
                 if not n.startswith(ours) and "median_ms" in t.get(key, {})}
        if mine and peers:
            best = min(peers, key=peers.get)
            out[key] = dict(best_peer=best, speedup_x=peers[best] / mine)
    return out


def measure_schedule_build(pattern: sf.Pattern, problem: sf.Problem, repeat: int, device="cpu") -> dict:
    """build_schedule vs FlexAttention's create_block_mask (vectorised mask_mod), seconds."""
    from torch.nn.attention.flex_attention import create_block_mask

    out = dict(problem=repr(problem),
               sparseforge_build_schedule_s=_median_s(lambda: build_schedule(pattern, problem), repeat))
    try:
        mask_mod, per_head = vectorised_mask_mod(pattern, problem)
        h = problem.heads if per_head else None
        out["flex_create_block_mask_s"] = _median_s(
            lambda: create_block_mask(mask_mod, None, h, problem.tokens, problem.tokens, device=device), repeat)
        out["flex_mask_mod"] = "pattern.mask under vmap"
    except Exception as exc:  # noqa: BLE001 - report, do not hide
        out["flex_create_block_mask_s"] = None
        out["flex_error"] = why(exc)
    return out


@contextlib.contextmanager
def fresh_cache_dir():
    """A temporary, empty SPARSEFORGE_CACHE_DIR for the duration of the block."""
    from sparseforge import envvars

    old = os.environ.get(envvars.CACHE_DIR.name)
    with tempfile.TemporaryDirectory(prefix="sf-bench-cache-") as tmp:
        os.environ[envvars.CACHE_DIR.name] = tmp
        try:
            yield tmp
        finally:
            if old is None:
                os.environ.pop(envvars.CACHE_DIR.name, None)
            else:
                os.environ[envvars.CACHE_DIR.name] = old


def measure_compile(pattern: sf.Pattern, problem: sf.Problem) -> tuple[dict, sf.CompiledAttention]:
    """Cold (empty cache dir, first call in this process) and warm (second call) sf.compile."""
    with fresh_cache_dir():
        t0 = time.perf_counter()
        sf.compile(pattern, problem)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        attn = sf.compile(pattern, problem)
        warm = time.perf_counter() - t0
    return dict(problem=repr(problem), cold_s=cold, warm_s=warm,
                note="cold: empty SPARSEFORGE_CACHE_DIR, first sf.compile of this pattern in the process"), attn


def measure_content_compile(case: Case, problem: sf.Problem) -> dict:
    """Cold / warm sf.compile of a content-dependent case (attention="linear" for P9)."""
    kw = dict(attention="linear") if case.attention == "linear" else {}
    with fresh_cache_dir():
        t0 = time.perf_counter()
        sf.compile(case.pattern, problem, **kw)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        sf.compile(case.pattern, problem, **kw)
        warm = time.perf_counter() - t0
    return dict(problem=repr(problem), cold_s=cold, warm_s=warm,
                note="cold: empty SPARSEFORGE_CACHE_DIR, first sf.compile of this pattern in the process")
