"""Running the suite: one case in CPU mode (scaled, exact counts and CPU op times) or GPU
mode (full size on CUDA), the selected cases one after another (a failing case is
reported and the others go on), and the metadata every result starts with. The cases
and their scaling are in ``cases``; content-dependent cases run through ``content``.

CPU mode (``--cpu``) measures what is exact on a CPU:

- tile efficiency (allowed pairs / pairs inside visited tiles) of our default schedule and of
  1-D 128x128 tiles of the row-major sequence (FlexAttention's BlockMask), and both visited
  tile counts, at FULL size where an exact method is cheap, otherwise at the scaled size
  (the result says which and how);
- schedule build time (``build_schedule``) vs ``create_block_mask`` with a vectorised
  ``mask_mod`` (the pattern's own ``mask`` under vmap) for the same mask, at the scaled size;
- cold (empty ``SPARSEFORGE_CACHE_DIR``, first call in the process) and warm (second call)
  ``sf.compile`` time, at the scaled size;
- CPU op time, forward and forward + backward, median of ``--repeat`` runs after one warm-up
  on random fp32 inputs: sf.compile's CPU path, FlexAttention (``torch.compile`` on CPU,
  eager when that fails; FlexAttention has no backward on CPU, reported as such), masked SDPA
  (a dense boolean mask, only when it fits in memory), and the torch peers of P10/P11.

GPU mode (no ``--cpu``): full-size problems on CUDA in bf16: forward and forward + backward
time with ``triton.testing.do_bench`` (median, L2 flushed), set-up time (compile / block
mask), peak memory, effective TFLOP/s from the exact allowed-pair count (forward
4 * pairs * D FLOP, backward 2.5x forward), speedup over the best peer and the ratio to
dense SDPA time x density. P7-P9 report set-up steps, times, the extra peak memory of each
call and TFLOP/s (P9: from the FLOP model), with the peers' agreement with ours. A peer
that is not installed is reported as not run, with the
reason. Without a CUDA device it stops with "no CUDA device: use --cpu".
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable

import torch

import sparseforge as sf

from . import peers, run_info
from .cases import FLEX, NATTEN, SDPA, Case, not_runnable_reason, random_qkv, select
from .content import run_cpu_content_case, run_gpu_content_case
from .efficiency import exact_allowed_pairs, measure_tile_efficiency
from .messages import log, why
from .peers import dense_mask_mod, make_flex, natten_forward, sdpa_mask_bytes, torch_peer, vectorised_mask_mod
from .timing import _step, _timed_ms, measure_compile, measure_schedule_build, speedups

SCHEMA = "sparseforge-bench-suite/1"
#: Largest memory (bytes) masked SDPA may need on CPU: the bool mask plus float32 scores.
SDPA_MEMORY_LIMIT = 4 << 30


def run_cpu_case(case: Case, repeat: int, flex) -> dict:
    if not case.pattern.is_static:
        return run_cpu_content_case(case, repeat, flex)
    scaled = case.cpu.problem(torch.float32)
    out = dict(scaled=case.cpu.as_dict(), scaled_pattern=repr(case.cpu_pattern))
    log(f"{case.id}: tile efficiency")
    # the tiles of the GPU kernels: default config for bf16 at the case's head dim
    eff = measure_tile_efficiency(case.pattern, case.full.problem(torch.bfloat16), "full")
    if eff is None:
        eff = measure_tile_efficiency(case.cpu_pattern, case.cpu.problem(torch.bfloat16), "scaled")
        eff["note"] = "no cheap exact method at full size; computed at the scaled size"
    out["tile_efficiency"] = eff
    log(f"{case.id}: schedule build vs create_block_mask")
    out["schedule_build"] = measure_schedule_build(case.cpu_pattern, scaled, repeat)
    log(f"{case.id}: sf.compile cold / warm")
    out["compile"], attn = measure_compile(case.cpu_pattern, scaled)
    out["op_time_cpu"] = measure_cpu_ops(case, attn, repeat, flex)
    out["speedup_vs_best_peer"] = speedups(out["op_time_cpu"])
    return out


def measure_cpu_ops(case: Case, attn: sf.CompiledAttention, repeat: int, flex) -> dict:
    """Median seconds of forward and forward + backward on CPU for every method."""
    from torch.nn.attention.flex_attention import create_block_mask

    shape, problem, pattern = case.cpu, attn.problem, attn.pattern
    flex_fn, flex_variant = flex
    results = {}
    mask = None
    for backward in (False, True):
        q, k, v = random_qkv(shape, torch.float32, "cpu", backward)
        methods: dict[str, Callable | str] = {"sparseforge": lambda: attn(q, k, v)}
        try:
            if mask is None:
                mask = sf.dense_mask(pattern, problem)
            heads = problem.heads if mask.shape[0] > 1 else None
            bm = create_block_mask(dense_mask_mod(mask), None, heads, problem.tokens, problem.tokens, device="cpu")
            methods[FLEX] = (lambda: flex_fn(q, k, v, block_mask=bm)) if not backward else \
                "not supported: FlexAttention has no backward on CPU (torch raises NotImplementedError)"
        except Exception as exc:  # noqa: BLE001
            methods[FLEX] = f"failed: {why(exc)}"
        need = sdpa_mask_bytes(shape)
        if need <= SDPA_MEMORY_LIMIT:
            methods["sdpa_masked"] = lambda: torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask[None] if mask is not None else sf.dense_mask(pattern, problem)[None])
        else:
            methods["sdpa_masked"] = f"skipped: mask would need {need / 2 ** 30:.1f} GB"
        peer = torch_peer(case, shape, pattern)
        if peer is not None:
            methods[peer[0]] = (lambda f=peer[1]: f(q, k, v))
        for name, fn in methods.items():
            entry = results.setdefault(name, {})
            key = "forward_backward" if backward else "forward"
            if isinstance(fn, str):
                entry[key] = dict(skipped=fn)
                continue
            log(f"  {case.id}: timing {name} {key.replace('_', ' + ')}")
            try:
                entry[key] = _timed_ms(_step(fn, backward, (q, k, v)), repeat)
            except Exception as exc:  # noqa: BLE001 - a failing method is reported, the rest go on
                entry[key] = dict(skipped=f"failed: {why(exc)}")
    results[FLEX]["variant"] = flex_variant
    results["sparseforge"]["variant"] = "sf.compile CPU executor"
    return results


def run_gpu_case(case: Case, flex) -> dict:  # pragma: no cover - needs a CUDA device
    """Full size, bf16, on CUDA: times with do_bench, set-up, peak memory, TFLOP/s."""
    if not case.pattern.is_static:
        return run_gpu_content_case(case, flex)
    import triton.testing
    from torch.nn.attention.flex_attention import create_block_mask

    shape = case.full
    problem = shape.problem(torch.bfloat16)
    counted = exact_allowed_pairs(case.pattern, problem)
    pairs = None if counted is None else counted[0] * shape.batch
    n = problem.tokens
    density = None if pairs is None else pairs / (shape.batch * shape.heads * n * n)
    flex_fn, flex_variant = flex

    def bench(fn) -> float:
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def peak(fn) -> int:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()

    setups: dict[str, Callable[[], Callable]] = {}
    setups["sparseforge"] = lambda: (lambda attn: lambda q, k, v: attn(q, k, v))(sf.compile(case.pattern, problem))
    if FLEX in case.peers:
        def flex_setup():
            try:
                mask_mod, per_head = vectorised_mask_mod(case.pattern, problem)
                bm = create_block_mask(mask_mod, None, shape.heads if per_head else None, n, n, device="cuda",
                                       _compile=True)
            except Exception as exc:  # noqa: BLE001 - fall back to a dense mask where it fits
                if shape.heads * n * n > 8 << 30:
                    raise
                log(f"  {case.id}: vectorised mask_mod failed ({why(exc)}); using a dense mask")
                mask = sf.dense_mask(case.pattern, problem).cuda()
                bm = create_block_mask(dense_mask_mod(mask), None, mask.shape[0] if mask.shape[0] > 1 else None,
                                       n, n, device="cuda")
            return lambda q, k, v: flex_fn(q, k, v, block_mask=bm)
        setups[FLEX] = flex_setup
    if NATTEN in case.peers:
        setups[NATTEN] = lambda: natten_forward(case.pattern, shape)
    peer = torch_peer(case, shape, case.pattern)
    if peer is not None:
        setups[peer[0]] = lambda f=peer[1]: f
    setups["sdpa_dense"] = lambda: torch.nn.functional.scaled_dot_product_attention

    results = {}
    for name, setup in setups.items():
        entry = results.setdefault(name, {})
        try:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn = setup()
            torch.cuda.synchronize()
            entry["setup_ms"] = (time.perf_counter() - t0) * 1e3
        except ImportError as exc:
            entry["not_run"] = f"not installed: {why(exc)}"
            continue
        except Exception as exc:  # noqa: BLE001
            entry["not_run"] = f"failed: {why(exc)}"
            continue
        for backward in (False, True):
            key = "forward_backward" if backward else "forward"
            q, k, v = random_qkv(shape, torch.bfloat16, "cuda", backward)
            step = _step(lambda: fn(q, k, v), backward, (q, k, v))
            try:
                ms = bench(step)
                work = shape.batch * shape.heads * n * n if name == "sdpa_dense" else pairs   # dense: every pair
                flop = None if work is None else 4 * work * shape.head_dim * (3.5 if backward else 1.0)
                entry[key] = dict(median_ms=ms, peak_memory_bytes=peak(step),
                                  tflops=None if flop is None else flop / (ms * 1e-3) / 1e12)
            except Exception as exc:  # noqa: BLE001
                entry[key] = dict(skipped=f"failed: {why(exc)}")
    results.get(FLEX, {})["variant"] = flex_variant
    out = dict(op_time_cuda=results, allowed_pairs=pairs, density=density,
               speedup_vs_best_peer=speedups({k: v for k, v in results.items()
                                              if k != "sdpa_dense" or SDPA in case.peers}))
    for key in ("forward", "forward_backward"):
        mine = results["sparseforge"].get(key, {}).get("median_ms")
        dense = results["sdpa_dense"].get(key, {}).get("median_ms")
        if mine and dense and density:
            out.setdefault("ratio_to_dense_x_density", {})[key] = mine / (dense * density)
    return out


def metadata(mode: str, repeat: int | None, command: str | None) -> dict:
    return dict(schema=SCHEMA, mode=mode, device=run_info.device_name(mode != "cpu"),
                cpu_threads=torch.get_num_threads(), versions=run_info.versions(), date=run_info.utc_now(),
                command=command or " ".join(sys.argv), repeat=repeat,
                scaling_rule=None if mode != "cpu" else
                "B -> 1, H -> 2, D -> min(D, 64); grid extents / s_d to about 4096 tokens, pattern lengths "
                "(kernel, window, stride, block) / the same s_d, counts (dilation, S2 local blocks and stride) kept",
                time_unit="ms for op times, s for build and compile times")


def run_suite(only: str | None = None, *, cpu: bool = True, repeat: int = 3, command: str | None = None) -> dict:
    """Run the selected cases; the result dict (``meta`` and one entry per case)."""
    cases = select(only)
    if not cpu and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: use --cpu")
    mode = "cpu" if cpu else "cuda"
    flex = None
    rows = []
    t_start, load_start = time.perf_counter(), _load_average()
    for case in cases:
        row = dict(id=case.id, problem=case.problem, title=case.title, pattern=repr(case.pattern),
                   full=case.full.as_dict(), peers=list(case.peers))
        reason = not_runnable_reason(case)
        if reason is not None:
            row.update(status="not runnable", reason=f"not runnable: {reason}")
            log(f"{case.id}: not runnable")
            rows.append(row)
            continue
        if flex is None:
            flex = make_flex("cpu" if cpu else "cuda")
        elif peers.FLEX_COMPILE:
            # A fresh compile cache per case: otherwise the cases' shapes and block masks pile up
            # recompiles until torch.compile hits its recompile limit and silently runs eager.
            torch._dynamo.reset()
        t0 = time.perf_counter()
        try:
            row.update(run_cpu_case(case, repeat, flex) if cpu else run_gpu_case(case, flex))
            row["status"] = "ok"
        except Exception as exc:  # noqa: BLE001 - one failing case must not lose the others
            row.update(status="failed", reason=f"failed: {why(exc)}")
        row["wall_s"] = time.perf_counter() - t0
        log(f"{case.id}: {row['status']} in {row['wall_s']:.1f} s")
        rows.append(row)
    meta = metadata(mode, repeat, command) | dict(wall_s=time.perf_counter() - t_start)
    meta["load_average_1m"] = dict(start=load_start, end=_load_average())   # > cores: timings shared the CPU
    return dict(meta=meta, cases=rows)


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None
