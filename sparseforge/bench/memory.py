"""Peak memory of routed (BiFormer) attention: sparseforge's fused kernels vs the gather
implementation (BiFormer's released ``nchwBRA`` code, in ``sparseforge.bench.peers``).

    python benchmarks/memory.py [--grids 64,128] [--batch 1] [--heads 8] [--head-dim 32]
                                [--topk 4] [--region 8] [--p7] [--out benchmarks/results/routed_memory_cpu.json]

The problem is ``sf.compile(sf.Routed(region_size=(8, 8), topk=4), sf.Problem(grid=(G, G),
heads=8, head_dim=32, dtype=...))``. Both implementations get the same inputs (already
allocated, reported separately) and are measured forward (under ``torch.no_grad``) and
forward + backward (``out.backward(dout)`` with a preallocated ``dout``), each in two
variants: routing inside the call (``attn(q, k, v)`` / the gather code's own routing) and
the attention alone with given routes (``routes=``).

How memory is measured:

- CUDA: ``torch.cuda.reset_peak_memory_stats`` then ``max_memory_allocated`` minus the
  bytes allocated before the call: the *extra* peak of the call. Our op runs its generated
  Triton kernels (backend "triton"), in bf16.
- CPU (no CUDA device): ``AllocationTracker``, a ``TorchDispatchMode`` that records the
  storage of every tensor an op creates (its nbytes) and subtracts it when a weakref
  finalizer on that storage fires (the storage is freed); the peak is the largest live sum.
  Custom ops (sparseforge's) are entered with the tracker active, so what their Python
  implementations allocate is counted. Our op runs the *same generated Triton kernels* under
  the Triton interpreter (``backend="interpret"``), in fp16 (the interpreter has no bf16;
  sizes are the same). Triton kernels allocate no global memory, so the op's torch-side
  allocations are what a GPU run allocates. The interpreter itself only creates 0-byte
  placeholder tensors per kernel argument (``new_empty(0)`` then ``set_`` onto the
  argument's storage: ``GridExecutor._init_args_hst``; ``UntypedStorage.cpu()`` returns a CPU
  storage itself); the tracker attributes every allocation made inside a kernel launch and
  the result reports that total (``bytes_allocated_inside_kernel_launches``, 0 expected).
  Its numpy work arrays are the tiles a GPU keeps in registers / shared memory.
  ``--cpu-executor`` also measures the CPU executor (``backend="cpu"``): a different code
  path (chunked torch ops), labelled as such.

Also reported: analytic bytes (inputs, output, LSE, routes, gathered K/V copies, scores,
the routing's float64 chunk and region means, the gather's backward through K/V expanded over the query
regions — ``torch.gather``'s gradient is a zero-filled [B, H, R, R, region_tokens, D] tensor,
O(N^2)) and a model of each implementation's peak from them, with the ratio measured / model.

The interpreter is slow (2 cores: 64x64, 8 heads, batch 1 takes ~35 s forward and ~100 s
forward + backward; 128x128 about 4x that), so the CPU run uses batch 1 (``--batch``; every
term scales linearly with it) and ``--jobs 2`` measures grids in parallel processes.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sparseforge as sf
from sparseforge.dsl.content import ROUTING_CHUNK_TOKENS

from . import peers, run_info  # the torch peers are shared with the suite

SCHEMA = "sparseforge-routed-memory/1"


# ------------------------------------------------------------------------------------
# The CPU tracker
# ------------------------------------------------------------------------------------
def _custom_impl(func):
    """The Python implementation of a ``torch.library.custom_op`` (None for other ops)."""
    try:
        from torch._library.custom_ops import OPDEFS
    except ImportError:  # pragma: no cover - older torch
        return None
    opdef = OPDEFS.get(f"{func.namespace}::{func._opname}") if hasattr(func, "_opname") else None
    if opdef is None:
        return None
    fns = getattr(opdef, "_backend_fns", {}) or {}
    return fns.get("cpu") or fns.get(None) or opdef._init_fn


class AllocationTracker(TorchDispatchMode):
    """Live bytes of the tensor storages created while active, and their peak.

    Every op's outputs are inspected: a storage that is not one of the op's inputs' and not
    seen before is new; its ``nbytes`` is added to ``live`` and a ``weakref.finalize`` on it
    subtracts them when it is freed. ``peak`` is the largest ``live``. A storage that grows in
    place (``resize_``) is re-counted. Custom ops run their Python implementation inside the
    tracker (otherwise a dispatch mode sees only their outputs). ``log`` keeps (op, bytes)
    of every allocation; ``launch_bytes`` those made while ``in_launch`` is set."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.total = 0
        self.count = 0
        self.launch_bytes = 0
        self.launch_allocations = 0
        self.in_launch = False
        self.log: list[tuple[str, int]] = []
        self._counted: dict[int, int] = {}            # id(storage) -> counted nbytes, while alive
        self._owner: dict[int, weakref.ref] = {}

    def _free(self, key):
        self.live -= self._counted.pop(key, 0)
        self._owner.pop(key, None)

    def _track(self, storage, op: str) -> None:
        nbytes = storage.nbytes()
        key = id(storage)
        old = self._counted.get(key)
        if old is not None and self._owner[key]() is storage:
            if nbytes != old:   # grown (or shrunk) in place
                self.live += nbytes - old
                self._counted[key] = nbytes
                self.peak = max(self.peak, self.live)
            return
        self._counted[key] = nbytes
        self._owner[key] = weakref.ref(storage)
        weakref.finalize(storage, self._free, key)
        self.live += nbytes
        self.total += nbytes
        self.count += 1
        if self.in_launch:
            self.launch_bytes += nbytes
            self.launch_allocations += 1
        self.log.append((op, nbytes))
        self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        impl = _custom_impl(func)
        if impl is not None:
            with self:
                out = impl(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        inputs = set()
        for t in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor):
                inputs.add(id(t.untyped_storage()))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                s = t.untyped_storage()
                if id(s) not in inputs or (id(s) in self._counted and s.nbytes() != self._counted[id(s)]):
                    self._track(s, str(func))
        return out

    def summary(self, top: int = 8) -> list[dict]:
        """The ``top`` largest single allocations (op, bytes)."""
        return [dict(op=op, bytes=b) for op, b in sorted(self.log, key=lambda e: -e[1])[:top]]


@contextlib.contextmanager
def kernel_launches_flagged(tracker: AllocationTracker):
    """Flag the tracker while sparseforge launches a (interpreted) Triton kernel."""
    from sparseforge.backends.triton import TritonKernels

    original = TritonKernels._launch

    def launch(self, *args, **kwargs):
        tracker.in_launch = True
        try:
            return original(self, *args, **kwargs)
        finally:
            tracker.in_launch = False
    TritonKernels._launch = launch
    try:
        yield
    finally:
        TritonKernels._launch = original


def measure_cpu(fn):
    """Run ``fn()`` under a fresh ``AllocationTracker``: (stats, what fn returned). stats: its
    peak extra bytes, the bytes still held when it returned (what it returns), the largest
    allocations, and what was allocated inside (interpreted) kernel launches."""
    gc.collect()
    tracker = AllocationTracker()
    t0 = time.perf_counter()
    with kernel_launches_flagged(tracker), tracker:
        result = fn()
    wall = time.perf_counter() - t0
    return dict(peak_extra_bytes=tracker.peak, held_after_bytes=tracker.live, allocated_total_bytes=tracker.total,
                allocations=tracker.count, bytes_allocated_inside_kernel_launches=tracker.launch_bytes,
                allocations_inside_kernel_launches=tracker.launch_allocations,
                largest_allocations=tracker.summary(), wall_s=wall), result


def measure_cuda(fn):  # pragma: no cover - needs a CUDA device
    """(peak extra bytes of ``fn()`` on the current CUDA device and what is still held, what fn returned)."""
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return dict(peak_extra_bytes=torch.cuda.max_memory_allocated() - base,
                held_after_bytes=torch.cuda.memory_allocated() - base, wall_s=wall), result


# ------------------------------------------------------------------------------------
# Problems and analytic bytes
# ------------------------------------------------------------------------------------
def analytic(batch: int, heads: int, grid: int, head_dim: int, region: int, topk: int, elem: int) -> dict:
    """Bytes of the tensors that matter, from the shapes alone, and models of the peaks."""
    n = grid * grid
    tokens = region * region
    n_regions = n // tokens
    x = batch * heads * n * head_dim * elem          # one of q, k, v, out, dout, dq, ...
    scores = batch * heads * n * topk * tokens * elem
    a = dict(
        one_qkv_tensor=x, inputs_qkv=3 * x, dout=x, out=x, lse=batch * heads * n * 4,
        routes=batch * n_regions * topk * 8,
        # key_g + value_g: topk * region_tokens * D per query region and head, i.e. topk x K and V
        gather_kv_copies=2 * topk * x,
        gather_scores=scores,                        # [B, H, R, T, topk * T], one copy
        # torch.gather's backward through K/V expanded over the query regions: a zero-filled
        # [B, H, R, R, T, D] gradient (and scatter_add's result of the same size), per K and V
        gather_backward_expanded_grad=batch * heads * n_regions * n * head_dim * elem,
        # Routed.routes at its worst moment (the region sums of k): one float64 chunk of
        # ROUTING_CHUNK_TOKENS tokens and the contiguous copy index_add_ makes of it, q's region
        # means and k's region sums (float64 [B, R, H, D] each), the token -> region ids (int64)
        routing_float64=(2 * batch * min(n, ROUTING_CHUNK_TOKENS) * heads * head_dim * 8
                         + 2 * batch * n_regions * heads * head_dim * 8 + n * 8),
        delta=batch * heads * n * 4,  # rowsum(dO * O), computed by the dQ kernel (no temporaries)
        grads_dq_dk_dv=3 * x,
    )
    # models of the peaks: what must be live at the worst moment (routes given)
    a["model"] = dict(
        gather_forward=3 * x + a["gather_kv_copies"] + 2 * scores,  # region copies of q/k/v, K/V copies, scores + softmax
        gather_forward_backward=2 * a["gather_backward_expanded_grad"],   # a lower bound: the expanded gradient twice
        ours_forward=a["out"] + a["lse"],                                 # + the per-call tables (small)
        ours_forward_backward=a["out"] + a["lse"] + a["delta"] + a["grads_dq_dk_dv"],
        # routing inside: the larger of Routed.routes and the kernels' forward
        ours_routing=max(a["routing_float64"], a["out"] + a["lse"]),
    )
    return a


VARIANTS = ("routes_given", "routing_inside")


def measure_grid(grid: int, *, batch: int, heads: int, head_dim: int, region: int, topk: int, device: str,
                 cpu_executor: bool = False, variants=VARIANTS) -> dict:
    """Every implementation x variant x (forward, forward + backward) at one grid."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    elem = torch.tensor([], dtype=dtype).element_size()
    problem = sf.Problem(grid=(grid, grid), heads=heads, head_dim=head_dim, dtype=dtype)
    pattern = sf.Routed(region_size=(region, region), topk=topk)
    backends = {"sparseforge": "triton" if device == "cuda" else "interpret"}
    if cpu_executor and device == "cpu":
        backends["sparseforge_cpu_executor"] = "cpu"
    measure = measure_cuda if device == "cuda" else measure_cpu
    gen = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(batch, heads, grid * grid, head_dim, generator=gen).to(device, dtype)
                     for _ in range(4))
    routes = peers.biformer_routing(q, k, (grid, grid), (region, region), topk)
    impls = {"gather": lambda r=None: peers.biformer_gather_attention(q, k, v, (grid, grid), (region, region), topk,
                                                                      routes=r)}
    for name, b in backends.items():
        impls[name] = lambda r=None, a=sf.compile(pattern, problem, backend=b): a(q, k, v, routes=r)
    out: dict = dict(grid=[grid, grid], batch=batch, heads=heads, head_dim=head_dim, region=[region, region],
                     topk=topk, dtype=str(dtype).replace("torch.", ""),
                     inputs_bytes=dict(q_k_v=3 * q.nbytes, dout=dout.nbytes, routes=routes.nbytes),
                     analytic=analytic(batch, heads, grid, head_dim, region, topk, elem), measured={},
                     max_abs_diff_vs_gather={})
    reference = None
    for name, fn in impls.items():
        entry = out["measured"].setdefault(name, {})
        for variant in variants:
            r = routes if variant == "routes_given" else None
            with torch.no_grad():
                entry[f"forward_{variant}"], result = measure(lambda: fn(r))
            if variant == "routes_given":    # numerics on the measured call's output
                if reference is None:
                    reference = result.float()
                else:
                    out["max_abs_diff_vs_gather"][name] = (result.float() - reference).abs().max().item()
            del result
            for t in (q, k, v):
                t.requires_grad_(True)

            def fwd_bwd():
                fn(r).backward(dout)
            entry[f"forward_backward_{variant}"], _ = measure(fwd_bwd)
            for t in (q, k, v):
                t.grad = None
                t.requires_grad_(False)
            print(f"  {grid}x{grid} topk {topk} D {head_dim} {name} {variant}: fwd "
                  f"{entry[f'forward_{variant}']['peak_extra_bytes'] / 2**20:.2f} MiB, fwd+bwd "
                  f"{entry[f'forward_backward_{variant}']['peak_extra_bytes'] / 2**20:.2f} MiB", file=sys.stderr,
                  flush=True)
    return compare(out)


def compare(out: dict) -> dict:
    """Add the ratios of one grid's result: gather / ours per key and measured / model."""
    m, model = out["measured"], out["analytic"]["model"]
    out["gather_over_ours"] = {key: m["gather"][key]["peak_extra_bytes"] / max(m["sparseforge"][key]["peak_extra_bytes"], 1)
                               for key in m["sparseforge"]}
    out["measured_over_model"] = dict(
        gather_forward=m["gather"]["forward_routes_given"]["peak_extra_bytes"] / model["gather_forward"],
        gather_forward_backward=m["gather"]["forward_backward_routes_given"]["peak_extra_bytes"]
        / model["gather_forward_backward"],
        ours_forward=m["sparseforge"]["forward_routes_given"]["peak_extra_bytes"] / model["ours_forward"],
        ours_forward_backward=m["sparseforge"]["forward_backward_routes_given"]["peak_extra_bytes"]
        / model["ours_forward_backward"])
    if "forward_routing_inside" in m["sparseforge"]:
        out["measured_over_model"]["ours_forward_routing_inside"] = \
            m["sparseforge"]["forward_routing_inside"]["peak_extra_bytes"] / model["ours_routing"]
    return out


def _measure_case(kwargs: dict) -> dict:
    torch.set_num_threads(kwargs.pop("threads"))
    return measure_grid(**kwargs)


def metadata(device: str, command: str) -> dict:
    how = ("torch.cuda max_memory_allocated - memory_allocated before the call; ours: generated Triton kernels, bf16"
           if device == "cuda" else
           "AllocationTracker (TorchDispatchMode + storage finalizers: live bytes of storages created by the call); "
           "ours: the generated Triton kernels under the Triton interpreter (backend='interpret'), fp16")
    return dict(schema=SCHEMA, device=run_info.device_name(device == "cuda"), cpu_threads=torch.get_num_threads(),
                method=how, versions=run_info.versions(), date=run_info.utc_now(), command=command,
                peak_definition="extra bytes at the peak of the call above what was allocated before it "
                                "(inputs q, k, v, dout and routes are allocated before and reported separately)")


def _result_or_failure(get, kw: dict) -> dict:
    """A case's result, or its parameters and the failure (one failing case keeps the others)."""
    try:
        return get()
    except Exception as exc:  # noqa: BLE001
        print(f"  case {kw} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return dict(grid=[kw["grid"]] * 2, topk=kw["topk"], head_dim=kw["head_dim"],
                    failed=f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}")


def run(grids, *, batch=1, heads=8, head_dim=32, region=8, topk=4, device=None, cpu_executor=False,
        extra=(), variants=VARIANTS, jobs=1, command="") -> dict:
    """Measure every grid (and the ``extra`` (grid, topk, head_dim) cases); ``jobs`` > 1 runs
    the cases in that many fresh processes at once (CPU only: each case is measured alone in
    its process, so the peaks do not mix)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    specs = [(g, topk, head_dim) for g in grids] + list(extra)
    kwargs = [dict(grid=g, batch=batch, heads=heads, head_dim=d, region=region, topk=t, device=device,
                   cpu_executor=cpu_executor, variants=tuple(variants)) for g, t, d in specs]
    if jobs > 1 and device == "cpu" and len(kwargs) > 1:
        import concurrent.futures
        import multiprocessing

        threads = max(1, torch.get_num_threads() // jobs)
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_measure_case, dict(kw, threads=threads)) for kw in kwargs]
            cases = [_result_or_failure(f.result, kw) for f, kw in zip(futures, kwargs)]
    else:
        cases = [_result_or_failure(lambda kw=kw: measure_grid(**kw), kw) for kw in kwargs]
    return dict(meta=metadata(device, command) | dict(jobs=jobs), cases=cases)


def _mib(b: int) -> str:
    return f"{b / 2 ** 20:.2f}"


def table(result: dict) -> str:
    lines = ["| grid, topk, D | variant | ours fwd MiB | gather fwd MiB | x | ours fwd+bwd MiB | gather fwd+bwd MiB | x |",
             "|---|---|---|---|---|---|---|---|"]
    for c in result["cases"]:
        if "failed" in c:
            lines.append(f"| {c['grid'][0]}x{c['grid'][1]}, {c['topk']}, {c['head_dim']} | failed: {c['failed']} "
                         "| | | | | | |")
            continue
        m = c["measured"]
        for variant in VARIANTS:
            o, g = m["sparseforge"], m["gather"]
            f, fb = f"forward_{variant}", f"forward_backward_{variant}"
            if f not in o:
                continue
            lines.append(f"| {c['grid'][0]}x{c['grid'][1]}, {c['topk']}, {c['head_dim']} | {variant.replace('_', ' ')} | "
                         f"{_mib(o[f]['peak_extra_bytes'])} | {_mib(g[f]['peak_extra_bytes'])} | "
                         f"{c['gather_over_ours'][f]:.1f} | {_mib(o[fb]['peak_extra_bytes'])} | "
                         f"{_mib(g[fb]['peak_extra_bytes'])} | {c['gather_over_ours'][fb]:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grids", default="64,128", help="comma-separated square grid sides [64,128]")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--region", type=int, default=8)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--p7", action="store_true", help="also the suite's P7 routing (topk 8, head_dim 64) at 64x64")
    ap.add_argument("--cpu-executor", action="store_true", help="also measure backend='cpu' (a different code path)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None)
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated, of {', '.join(VARIANTS)} [both]")
    ap.add_argument("--jobs", type=int, default=1, help="CPU: cases measured in this many processes at once")
    ap.add_argument("--out", default=None, help="write the JSON here")
    args = ap.parse_args(argv)
    grids = [int(g) for g in args.grids.split(",") if g.strip()]
    command = "python benchmarks/memory.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result = run(grids, batch=args.batch, heads=args.heads, head_dim=args.head_dim, region=args.region,
                 topk=args.topk, device=args.device, cpu_executor=args.cpu_executor,
                 extra=[(64, 8, 64)] if args.p7 else (), variants=[v.strip() for v in args.variants.split(",")],
                 jobs=args.jobs, command=command.strip())
    text = json.dumps(result, indent=1)
    if args.out:
        from sparseforge.atomic import write_atomic

        write_atomic(args.out, text.encode() + b"\n")
    print(f"peak extra memory (MiB; x = gather / ours), {result['meta']['device']}, batch {args.batch}, "
          f"heads {args.heads}, region {args.region}x{args.region}:")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
