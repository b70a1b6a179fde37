"""The harnesses of the content-dependent cases: their run-time content (routes of random
q, k; synthetic voxel coordinates), methods (ours and the peers), set-up steps and exact
counts (``ContentRun``), and their CPU and CUDA runs.

- P7: random q, k, v; our op routes inside every call (``attn(q, k, v)``); the peers are
  BiFormer's released gather implementation (``nchwBRA``: region means, top-k, ``torch.gather``
  of K/V per routed region, matmul / softmax / matmul) and FlexAttention with a block mask
  built from BiFormer's routes in every call (set-up counted). Allowed pairs, exact: N x topk
  x region tokens per head and batch element (from the routes of random q, k).
- P8: a synthetic, spatially clustered voxel set (``peers.make_voxels``, seeded: 4 batch
  elements, 2-D, 131072 voxels, windows of 12x12 cells holding 24-144 voxels, mean 50; the
  result reports the statistics), q, k, v [N, H, D] in shuffled voxel order. Ours:
  ``attn(q, k, v, coords=coords)`` (grouping in every call) and ``attn(q, k, v, plan=plan)`` (a
  reused plan); peers: every window padded to the largest with a key padding mask and one SDPA,
  and FlexAttention with a document mask over the window-sorted voxels (grouping and block mask
  in every call). Allowed pairs: the sum over windows of size^2, per head.
- P9: P8's voxels with ``sf.compile(..., attention="linear")``; peer: ScatterFormer's
  per-window KV / S sums with ``index_add``. No tiles (tile efficiency not applicable); the
  FLOP model is 4 N H D^2.

For P7 and P8 the tile efficiency is exact at FULL size (P7: routes of random q, k; P8: the
full voxel set; P8 also gives the padded-window peer's efficiency: allowed pairs / padded
pairs); the set-up steps (``setup``: our per-call route tables or plan vs the peers' routing /
grouping and ``create_block_mask``) replace ``schedule_build``.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

import sparseforge as sf

from . import peers
from .cases import FLEX, GATHER, PADDED, SCATTER_LINEAR, Case, Shape, random_qkv, window_side
from .efficiency import (routed_allowed_pairs, routed_tile_efficiency, voxel_allowed_pairs,
                         voxel_tile_efficiency)
from .messages import log, why
from .timing import _median_s, _step, _timed_ms, measure_content_compile, speedups


def voxel_coords(case: Case, size: str) -> torch.Tensor:
    """The case's synthetic voxel set (``peers.make_voxels``, seed 0) at ``size`` "full" or "scaled"."""
    n, batch = case.voxels if size == "full" else case.cpu_voxels
    return peers.make_voxels(n, batch=batch, window=window_side(case.pattern))


def voxel_stats(coords: torch.Tensor, pattern: sf.Scattered) -> dict:
    sizes = peers.window_groups(coords, window_side(pattern))["sizes"]
    return dict(voxels=int(coords.shape[0]), batch_elements=int(coords[:, 0].max()) + 1, windows=int(sizes.numel()),
                window_voxels=dict(mean=float(sizes.float().mean()), min=int(sizes.min()), max=int(sizes.max()),
                                   median=float(sizes.float().median())),
                generator="sparseforge/bench/peers.py make_voxels(seed=0): 2-D, spatially clustered occupancy")


@dataclasses.dataclass
class ContentRun:
    """One content-dependent case on one device and dtype: its inputs, methods and set-ups."""

    qkv: Callable[[bool], tuple]                  # requires_grad -> (q, k, v)
    methods: Callable[..., dict]                  # (q, k, v) -> name -> forward() or a reason it does not run
    setups: dict                                  # name -> zero-arg set-up step (timed alone)
    info: dict                                    # allowed pairs / flop model, voxel statistics, ...
    attn: object


def content_run(case: Case, shape: Shape, dtype, device: str, flex, size: str) -> ContentRun:
    """Inputs, methods (ours and the peers) and set-up steps of a content-dependent case."""
    import functools

    from torch.nn.attention.flex_attention import create_block_mask

    block_mask = functools.partial(create_block_mask, _compile=device == "cuda")  # no dense N x N mask on CUDA
    flex_fn = flex[0]
    pattern = case.pattern
    problem = shape.problem(dtype)
    gen_seed = 0
    if isinstance(pattern, sf.Routed):
        from sparseforge.lower.routed import routed_tables, routes_for
        from sparseforge.dsl.args import expand

        attn = sf.compile(pattern, problem)
        grid, topk = shape.grid, pattern.topk
        region = tuple(expand("region_size", pattern.region_size, len(grid)))
        n = problem.tokens

        def qkv(requires_grad):
            return random_qkv(shape, dtype, device, requires_grad, gen_seed)

        def flex_forward(q, k, v):
            routes = peers.biformer_routing(q, k, grid, region, topk)
            bm = block_mask(peers.biformer_block_mask_mod(routes, grid, region), q.shape[0], None, n, n, device=device)
            return flex_fn(q, k, v, block_mask=bm)

        def methods(q, k, v):
            return {"sparseforge": lambda: attn(q, k, v),
                    GATHER: lambda: peers.biformer_gather_attention(q, k, v, grid, region, topk),
                    FLEX: lambda: flex_forward(q, k, v)}
        q0, k0, _ = qkv(False)
        routes = routes_for(pattern, problem, q0, k0)
        setups = {"sparseforge_routes_and_tables": lambda: routed_tables(attn.schedule,
                                                                         routes_for(pattern, problem, q0, k0)),
                  "flex_routes_and_create_block_mask": lambda: block_mask(
                      peers.biformer_block_mask_mod(peers.biformer_routing(q0, k0, grid, region, topk), grid, region),
                      shape.batch, None, n, n, device=device)}
        allowed = routed_allowed_pairs(pattern, problem, routes)
        info = dict(allowed_pairs=allowed, density=allowed / (shape.batch * problem.heads * n * n),
                    flop_forward=4 * allowed * shape.head_dim,
                    routing="ours: float64 region means (sparseforge routes_for); the peers: BiFormer's routing in "
                            "the inputs' dtype (sparseforge/bench/peers.py biformer_routing)")
        return ContentRun(qkv, methods, setups, info, attn)

    coords = voxel_coords(case, size).to(device)
    window = window_side(pattern)
    n_vox = int(coords.shape[0])
    linear = case.attention == "linear"
    attn = sf.compile(pattern, problem, attention="linear") if linear else sf.compile(pattern, problem)
    plan = attn.plan(coords)

    def qkv(requires_grad):
        gen = torch.Generator().manual_seed(gen_seed)
        return tuple(torch.randn(n_vox, shape.heads, shape.head_dim, generator=gen).to(device, dtype)
                     .requires_grad_(requires_grad) for _ in range(3))

    def methods(q, k, v):
        ours = {"sparseforge": lambda: attn(q, k, v, coords=coords),
                "sparseforge_plan": lambda: attn(q, k, v, plan=plan)}
        if linear:
            return ours | {SCATTER_LINEAR: lambda: peers.scatter_linear_attention(
                q, k, v, peers.window_groups(coords, window))}
        return ours | {PADDED: lambda: peers.padded_window_sdpa(q, k, v, peers.window_groups(coords, window)),
                       FLEX: lambda: peers.flex_document_attention(q, k, v, peers.window_groups(coords, window),
                                                                   flex_fn, block_mask, device)}

    def flex_setup():
        order, n_pad, doc = peers.flex_document_inputs(peers.window_groups(coords, window))
        return block_mask(lambda b, h, qi, ki: doc[qi] == doc[ki], None, None, n_pad, n_pad, device=device)
    setups = {"sparseforge_plan": lambda: attn.plan(coords), "peers_window_grouping": lambda: peers.window_groups(
        coords, window)}
    if not linear:
        setups["flex_grouping_and_create_block_mask"] = flex_setup
    info = voxel_stats(coords.cpu(), pattern)
    if linear:
        d = shape.head_dim
        info["flop_forward_model"] = 4 * n_vox * shape.heads * d * d
        info["flop_model"] = ("4 N H D^2: per head phi(k)^T v summed per window (2 N D^2) and phi(q) KV (2 N D^2); "
                              "no (query, key) pairs in linear attention")
    else:
        allowed = voxel_allowed_pairs(coords.cpu(), pattern, shape.heads)
        info.update(allowed_pairs=allowed, flop_forward=4 * allowed * shape.head_dim)
    return ContentRun(qkv, methods, setups, info, attn)


def numerics_vs_ours(run: ContentRun) -> dict:
    """Max |method - sparseforge| of every method's forward on the run's inputs (fp32)."""
    q, k, v = run.qkv(False)
    out = {}
    with torch.no_grad():
        methods = run.methods(q, k, v)
        ref = methods["sparseforge"]().float()
        for name, fn in methods.items():
            if name != "sparseforge" and not isinstance(fn, str):
                try:
                    out[name] = (fn().float() - ref).abs().max().item()
                except Exception as exc:  # noqa: BLE001
                    out[name] = f"failed: {why(exc)}"
    return out


def run_cpu_content_case(case: Case, repeat: int, flex) -> dict:
    """A content-dependent case in CPU mode: exact tile efficiency at full size (routes of
    random q, k / the synthetic voxels), set-up times, compile, op times at the scaled size."""
    out = dict(scaled=case.cpu.as_dict(), scaled_pattern=repr(case.cpu_pattern))
    if case.voxels is not None:
        out["scaled"]["voxels"], out["scaled"]["voxel_batch_elements"] = case.cpu_voxels
    log(f"{case.id}: tile efficiency")
    if isinstance(case.pattern, sf.Routed):
        out["tile_efficiency"] = routed_tile_efficiency(case, case.full, "full")
    elif case.attention == "linear":
        out["tile_efficiency_note"] = ("not applicable: linear attention visits no (query, key) tiles; its cost is "
                                       "O(N H D^2) segment sums")
    else:
        full_coords = voxel_coords(case, "full")
        out["voxels_full"] = voxel_stats(full_coords, case.pattern)
        out["tile_efficiency"] = voxel_tile_efficiency(case, case.full, full_coords, "full")
    log(f"{case.id}: sf.compile cold / warm")
    out["compile"] = measure_content_compile(case, case.cpu.problem(torch.float32))
    run = content_run(case, case.cpu, torch.float32, "cpu", flex, "scaled")
    out["inputs"] = run.info
    out["max_abs_diff_vs_sparseforge"] = numerics_vs_ours(run)
    log(f"{case.id}: set-up steps")
    out["setup"] = _measure_setups(run, lambda fn: _median_s(fn, repeat))
    no_flex_backward = ("not supported: FlexAttention has no backward on CPU (torch raises "
                        "NotImplementedError)")
    results = _measure_methods(run, lambda step, backward: _timed_ms(step, repeat), case.id,
                               skip=lambda name, backward: no_flex_backward if backward and name == FLEX else None)
    if FLEX in results:
        results[FLEX]["variant"] = flex[1] + "; block mask built in every call (set-up counted)"
    results["sparseforge"]["variant"] = ("sf.compile(attention='linear'): torch segment ops" if case.attention == "linear"
                                         else "sf.compile CPU executor") + "; routing / grouping in every call"
    if "sparseforge_plan" in results:
        results["sparseforge_plan"]["variant"] = "as sparseforge, with a reused plan (attn.plan(coords))"
    out["op_time_cpu"] = results
    out["speedup_vs_best_peer"] = speedups(results)
    return out


def _measure_setups(run, seconds) -> dict:
    """{step + "_s": seconds(fn)} of a content case's set-up steps (or step + "_error": why)."""
    out = {}
    for name, fn in run.setups.items():
        try:
            out[name + "_s"] = seconds(fn)
        except Exception as exc:  # noqa: BLE001 - a failing step is reported, the rest go on
            out[name + "_error"] = why(exc)
    return out


def _measure_methods(run, measure, case_id: str, skip=lambda name, backward: None) -> dict:
    """{method: {"forward" | "forward_backward": measure(step, backward)}} over a content
    case's methods (ours and the peers); ``skip(name, backward)`` gives a reason to skip, and a
    method that fails is reported as skipped with the reason while the rest go on."""
    results = {}
    for backward in (False, True):
        key = "forward_backward" if backward else "forward"
        q, k, v = run.qkv(backward)
        for name, fn in run.methods(q, k, v).items():
            entry = results.setdefault(name, {})
            why = skip(name, backward)
            if why is not None:
                entry[key] = dict(skipped=why)
                continue
            log(f"  {case_id}: timing {name} {key.replace('_', ' + ')}")
            try:
                entry[key] = measure(_step(fn, backward, (q, k, v)), backward)
            except Exception as exc:  # noqa: BLE001
                entry[key] = dict(skipped=f"failed: {why(exc)}")
    return results


def run_gpu_content_case(case: Case, flex) -> dict:  # pragma: no cover - needs a CUDA device
    """A content-dependent case at full size, bf16, on CUDA: set-up times, do_bench times,
    peak memory and TFLOP/s from the exact allowed pairs (P9: the flop model)."""
    import triton.testing

    shape = case.full
    run = content_run(case, shape, torch.bfloat16, "cuda", flex, "full")
    flop_fwd = run.info.get("flop_forward", run.info.get("flop_forward_model"))

    def bench(fn) -> float:
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def peak(fn) -> int:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    def measure(step, backward) -> dict:
        ms = bench(step)
        flop = flop_fwd * (3.5 if backward else 1.0)
        return dict(median_ms=ms, peak_memory_extra_bytes=peak(step), tflops=flop / (ms * 1e-3) / 1e12)

    setups = _measure_setups(run, lambda fn: bench(fn) * 1e-3)
    results = _measure_methods(run, measure, case.id)
    if FLEX in results:
        results[FLEX]["variant"] = flex[1] + "; block mask built in every call (set-up counted)"
    return dict(op_time_cuda=results, setup=setups, inputs=run.info, numerics=numerics_vs_ours(run),
                allowed_pairs=run.info.get("allowed_pairs"), density=run.info.get("density"),
                tflops_basis="exact allowed pairs: 4 * pairs * D forward, x3.5 forward + backward"
                if "flop_forward" in run.info else run.info.get("flop_model"),
                speedup_vs_best_peer=speedups(results))
