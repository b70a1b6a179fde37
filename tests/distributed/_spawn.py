"""Spawned gloo process groups for the context-parallel tests (CPU only).

``spawn(world, job, payload, timeout)`` starts ``world`` fresh interpreters
(``torch.multiprocessing``'s spawn context), each running ``job(rank, world, payload)`` inside a
gloo (or ``backend``) process group on 127.0.0.1, and returns what each rank's job returned (a JSON-able value)
or ``{"crashed": exitcode}`` for a rank that wrote nothing. The processes are joined with a
timeout and terminated (by their own handles) if they outlive it. Jobs live in this module so
the children can import them by name.
"""
from __future__ import annotations

import datetime
import json
import os
import pathlib
import socket
import tempfile
import time
import traceback

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, job_name: str, payload, out_dir: str, pg_timeout: float,
           backend: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    result = None
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=pg_timeout))
        result = globals()[job_name](rank, world, payload)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        result = {"exception": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()}
    path = pathlib.Path(out_dir) / f"rank{rank}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.rename(path)
    # Leave without gloo's teardown, which can wait on a dead peer.
    os._exit(0)


def spawn(world: int, job: str, payload, *, timeout: float = 120.0, pg_timeout: float = 30.0,
          backend: str = "gloo") -> list:
    ctx = mp.get_context("spawn")
    port = _free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [ctx.Process(target=_entry, args=(r, world, port, job, payload, out_dir, pg_timeout, backend), daemon=True)
                 for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
        results = []
        for r, p in enumerate(procs):
            path = pathlib.Path(out_dir) / f"rank{r}.json"
            results.append(json.loads(path.read_text()) if path.exists() else {"crashed": p.exitcode})
        return results


# ------------------------------------------------------------------------------------
# Jobs
# ------------------------------------------------------------------------------------
DTYPES = {"fp32": "float32", "fp64": "float64", "bf16": "bfloat16"}


def _case_objects(case: dict):
    import torch

    import sparseforge as sf

    pattern = sf.parse_pattern(case["pattern"])
    dtype = getattr(torch, DTYPES[case["dtype"]])
    problem = sf.Problem(grid=tuple(case["grid"]), heads=case["heads"], kv_heads=case.get("kv_heads", case["heads"]),
                         head_dim=case["head_dim"], dtype=dtype)
    return pattern, problem, dtype


def full_inputs(case: dict):
    """The full q, k, v and output gradient of a case (same on every rank: seeded)."""
    import torch

    pattern, problem, dtype = _case_objects(case)
    g = torch.Generator().manual_seed(case.get("seed", 0))
    b, n, d = case.get("batch", 1), problem.tokens, problem.head_dim

    def rand(h):
        return torch.randn(b, h, n, d, generator=g, dtype=torch.float64).to(dtype)

    return pattern, problem, dtype, rand(problem.heads), rand(problem.kv_heads), rand(problem.kv_heads), \
        rand(problem.heads)


def _per_head_scale(case: dict, heads: int, dtype):
    """A [H] scale (same on every rank: seeded), or None for the default."""
    import torch

    if case.get("scale") != "per_head":
        return None
    g = torch.Generator().manual_seed(case.get("seed", 0) + 1)
    return (0.2 + 0.3 * torch.rand(heads, generator=g, dtype=torch.float64)).to(dtype)


def _modifiers(case: dict, pattern, problem, dtype):
    """The case's score modifiers (same on every rank: seeded), as leaf tensors; () for none."""
    import torch

    import sparseforge as sf

    g = torch.Generator().manual_seed(case.get("seed", 0) + 2)
    h = problem.heads

    def rand(*shape, low=None):
        t = torch.randn(*shape, generator=g, dtype=torch.float64) if low is None else \
            low + 0.4 * torch.rand(*shape, generator=g, dtype=torch.float64)
        return t.to(dtype).to(case.get("device", "cpu")).requires_grad_()

    make = {
        "alibi": lambda: sf.ALiBi(rand(h, low=0.05)),
        "softcap": lambda: sf.Softcap(2.0),
        "sinks": lambda: sf.Sinks(rand(h)),
        "rpb": lambda: sf.RelativePositionBias(rand(*sf.relative_position_bias_shape(pattern, problem))),
        "t5": lambda: sf.T5Bias(rand(h, 8), max_distance=16, bidirectional=False),
    }
    return tuple(make[name]() for name in case.get("modifiers", ()))


def _as_double(modifiers):
    """The same modifiers over float64 leaf copies of their tensors."""
    import dataclasses

    out = []
    for m in modifiers:
        fields = {f.name: getattr(m, f.name) for f in dataclasses.fields(m)}
        fields = {k: (v.detach().double().cpu().clone().requires_grad_() if hasattr(v, "requires_grad") else v)
                  for k, v in fields.items()}
        out.append(type(m)(**fields))
    return tuple(out)


def _groups_and_padding(case: dict, batch: int, n: int):
    """(group ids int64 [B, N] or None, key padding mask bool [B, N] or None) of a case, seeded:
    ``groups="documents"`` packs documents of 1..n/3 tokens with a few tokens in no group (-1);
    ``padding="both_sides"`` pads sample 0 on the left and the others on the right."""
    import torch

    g = torch.Generator().manual_seed(case.get("seed", 0) + 3)
    ids = None
    if case.get("groups") == "documents":
        ids = torch.empty(batch, n, dtype=torch.long)
        for b in range(batch):
            doc, t = 0, 0
            while t < n:
                length = int(torch.randint(1, max(2, n // 3), (), generator=g))
                ids[b, t:t + length] = doc
                doc, t = doc + 1, t + length
        ids[torch.rand(batch, n, generator=g) < 0.1] = -1
    real = None
    if case.get("padding") == "both_sides":
        real = torch.ones(batch, n, dtype=torch.bool)
        real[0, :n // 4] = False
        real[1:, n - n // 5:] = False
    return ids, real


class _Trace:
    """Records, in order, the rounds a rank posts and waits for and the sources it computes
    (``ContextParallelAttention``'s own methods, wrapped while the trace is on)."""

    def __init__(self):
        from sparseforge.distributed import attention, comm

        self.events, self._undo = [], []
        self._wrap(comm.Link, "post", lambda a, kw: f"post {a[3] if len(a) > 3 else kw['phase']}")
        self._wrap(comm.Link, "wait", lambda a, kw: f"wait {a[1].phase}")
        self._wrap(comm.Link, "received", lambda a, kw: f"wait {a[1].phase}")
        self._wrap(attention._Call, "forward", lambda a, kw: f"compute forward {a[1]}")
        self._wrap(attention._Call, "backward", lambda a, kw: f"compute backward {a[1]}")

    def _wrap(self, cls, name, label):
        orig = getattr(cls, name)

        def wrapper(*a, **kw):
            self.events.append(label(a, kw))
            return orig(*a, **kw)

        setattr(cls, name, wrapper)
        self._undo.append((cls, name, orig))

    def close(self):
        for cls, name, orig in self._undo:
            setattr(cls, name, orig)


def attention_cases(rank: int, world: int, cases: list) -> list:
    """For every case: this rank's output and gradient errors against the single-process
    float64 reference (and the single-process CPU executor), the tolerances, the bytes sent
    as the plan counts them and as handed to isend, and the order of its rounds and computes."""
    import torch

    import sparseforge as sf
    from sparseforge import distributed as sfd
    from sparseforge.runtime import check

    from sparseforge.distributed import local

    out = []
    default_cache = local.CACHE_ELEMENTS
    for case in cases:
        local.CACHE_ELEMENTS = case.get("cache_elements", default_cache)  # 0: chunks made as the executor walks
        pattern, problem, dtype, q, k, v, go = full_inputs(case)
        scale = _per_head_scale(case, problem.heads, dtype)
        # single process: the float64 reference and its gradients
        q64, k64, v64 = (t.detach().double().clone().requires_grad_() for t in (q, k, v))
        s64 = None if scale is None else scale.double().clone().requires_grad_()
        device = torch.device(case.get("device", "cpu"))
        mods = _modifiers(case, pattern, problem, dtype)
        mods64 = _as_double(mods)
        ids, real = _groups_and_padding(case, q.shape[0], problem.tokens)
        ref, ref_lse = sf.reference_attention(q64, k64, v64, pattern, problem, scale=s64, modifiers=mods64,
                                              groups=ids, key_padding_mask=real, return_lse=True)
        # with "lse_grad" the loss reads the LSE too: its gradient flows back through dLSE
        glse = torch.randn(ref_lse.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64) \
            if case.get("lse_grad") else None
        ref_loss = (ref * go.double()).sum() + (0 if glse is None else (ref_lse * glse).sum())
        ref_loss.backward()
        keys, queries = check.reductions(pattern, problem, groups=ids)
        tol = check.attention_tolerances(dtype, dtype, keys, queries, problem.head_dim)
        # this rank's shard
        split = case.get("split", {}).get(str(world))
        group = None
        if case.get("mesh"):      # the split as the shape of a DeviceMesh
            from torch.distributed.device_mesh import init_device_mesh

            group, split = init_device_mesh("cpu", tuple(split)), None
        attn = sfd.ContextParallelAttention(pattern, problem, layout=case.get("layout", "contiguous"), group=group,
                                            split=None if split is None else tuple(split),
                                            exchange=case.get("exchange", "auto"),
                                            chunk_elements=case.get("chunk_elements", sfd.CHUNK_ELEMENTS))
        plan = attn.plan
        ql, kl, vl = (attn.shard(t).to(device).requires_grad_() for t in (q, k, v))
        sl = None if scale is None else scale.to(device).requires_grad_()
        trace = _Trace()
        try:
            o, lse = attn(ql, kl, vl, scale=sl, modifiers=mods or None, return_lse=True,
                          groups=None if ids is None else attn.shard(ids, 1).to(device),
                          key_padding_mask=None if real is None else attn.shard(real, 1).to(device))
            loss = (o * attn.shard(go).to(device)).sum()
            if glse is not None:
                loss = loss + (lse * attn.shard(glse).to(device, lse.dtype)).sum()
            loss.backward()
        finally:
            trace.close()
        errors = {
            "out": check.row_error(o, attn.shard(ref)),
            "lse": check.lse_error(lse, attn.shard(ref_lse)),
            "dq": check.row_error(ql.grad, attn.shard(q64.grad)),
            "dk": check.row_error(kl.grad, attn.shard(k64.grad)),
            "dv": check.row_error(vl.grad, attn.shard(v64.grad)),
        }
        if sl is not None:
            # every rank holds its share of the shared parameter's gradient: their sum is the whole
            torch.distributed.all_reduce(sl.grad)
            errors["dscale"] = check.row_error(sl.grad, s64.grad)
            tol["dscale"] = check.tolerance(dtype, problem.tokens * keys)
        for i, (m, m64) in enumerate(zip(mods, mods64)):
            for t, t64 in zip(m.tensors(), m64.tensors()):   # summed over the ranks, as for the scale
                torch.distributed.all_reduce(t.grad)
                errors[f"d{m.kind}{i}"] = check.row_error(t.grad.reshape(1, -1), t64.grad.reshape(1, -1))
                tol[f"d{m.kind}{i}"] = check.tolerance(dtype, problem.tokens * keys)
        if case.get("executor"):
            # the single-process CPU executor (sf.compile(..., backend="cpu")) in the case's dtype
            qe, ke, ve = (t.detach().clone().requires_grad_() for t in (q, k, v))
            oe = sf.compile(pattern, problem, backend="cpu")(qe, ke, ve)
            oe.backward(go)
            errors.update({f"executor_{name}": check.row_error(got, attn.shard(want)) for name, got, want in
                           (("out", o, oe), ("dq", ql.grad, qe.grad), ("dk", kl.grad, ke.grad), ("dv", vl.grad, ve.grad))})
        row_kw = dict(batch=q.shape[0], kv_heads=problem.kv_heads, head_dim=problem.head_dim, dtype=dtype)
        out.append(dict(
            errors=errors, tol=tol, stats=attn.stats.as_dict(), exchange=attn.exchange,
            plan_sent={d: plan.bytes_sent(rank, exchange=attn.exchange, direction=d, **row_kw)
                       for d in ("forward", "backward")},
            plan_received=plan.bytes_received(rank, **row_kw), senders=plan.senders(rank),
            tokens=len(plan.tokens[rank]), split=list(plan.split), events=trace.events, grouped=ids is not None or real is not None))
        torch.distributed.barrier()
    return out


def dtensor_and_compile(rank: int, world: int, case: dict) -> dict:
    """DTensor inputs sharded on the tokens (Shard(2)) over a 1-D CPU mesh, and a function
    around the attention under ``torch.compile``: output and gradient errors against the
    float64 reference (DTensor) and against the same function run eagerly (compile)."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    import sparseforge as sf
    from sparseforge import distributed as sfd
    from sparseforge.runtime import check

    pattern, problem, dtype, q, k, v, go = full_inputs(case)
    q64, k64, v64 = (t.detach().double().clone().requires_grad_() for t in (q, k, v))
    ref = sf.reference_attention(q64, k64, v64, pattern, problem)
    ref.backward(go.double())
    mesh = init_device_mesh("cpu", (world,))
    attn = sfd.ContextParallelAttention(pattern, problem, group=mesh)
    qd, kd, vd = (distribute_tensor(t, mesh, [Shard(2)]).requires_grad_() for t in (q, k, v))
    od = attn(qd, kd, vd)
    od.backward(distribute_tensor(go, mesh, [Shard(2)]))
    result = dict(
        dtensor_out=isinstance(od, DTensor) and tuple(od.placements) == (Shard(2),),
        dtensor_errors={name: check.row_error(got.full_tensor(), want) for name, got, want in
                        (("out", od, ref), ("dq", qd.grad, q64.grad), ("dk", kd.grad, k64.grad),
                         ("dv", vd.grad, v64.grad))})

    def step(q, k, v):
        return (attn(q * 1.5, k, v) + 1).sin()

    ql, kl, vl = (attn.shard(t) for t in (q, k, v))
    runs = {}
    for name, fn in (("eager", step), ("compiled", torch.compile(step, backend="aot_eager"))):
        leaves = [t.clone().requires_grad_() for t in (ql, kl, vl)]
        o = fn(*leaves)
        o.backward(attn.shard(go))
        runs[name] = [o] + [t.grad for t in leaves]
    result["compile_errors"] = {name: check.row_error(c, e) for name, c, e in
                                zip(("out", "dq", "dk", "dv"), runs["compiled"], runs["eager"])}
    result["argument_errors"] = argument_errors(attn, mesh, q, k, v)
    return result


def argument_errors(attn, mesh, q, k, v) -> dict:
    """The message of each bad call (None where nothing was raised)."""
    import torch
    from torch.distributed.tensor import Replicate, distribute_tensor

    import sparseforge as sf
    from sparseforge import distributed as sfd

    ql, kl, vl = (attn.shard(t) for t in (q, k, v))
    b, n_r = ql.shape[0], ql.shape[2]
    calls = {
        "exchange": lambda: sfd.ContextParallelAttention(attn.pattern, attn.problem, exchange="allgather"),
        "chunk_elements": lambda: sfd.ContextParallelAttention(attn.pattern, attn.problem, chunk_elements=0),
        "shape": lambda: attn(ql[:, :, 1:], kl, vl),
        "placements": lambda: attn(*(distribute_tensor(t, mesh, [Replicate()]) for t in (q, k, v))),
        "mixed": lambda: attn(distribute_tensor(q, mesh, [Replicate()]), kl, vl),
        "groups_unexpected": lambda: attn(ql, kl, vl, groups=torch.zeros(b, n_r, dtype=torch.long)),
        "groups_missing": lambda: sfd.ContextParallelAttention(sf.Grouped(), attn.problem)(ql, kl, vl),
        "groups_shape": lambda: sfd.ContextParallelAttention(sf.Grouped(), attn.problem)(
            ql, kl, vl, groups=torch.zeros(b, n_r + 1, dtype=torch.long)),
        "padding_dtype": lambda: attn(ql, kl, vl, key_padding_mask=torch.ones(b, n_r)),
        "scale": lambda: attn(ql, kl, vl, scale=torch.ones(3)),
    }
    out = {}
    for name, call in calls.items():
        try:
            call()
            out[name] = None
        except (TypeError, ValueError) as e:
            out[name] = f"{type(e).__name__}: {e}"
    return out


def dies_mid_step(rank: int, world: int, payload: dict) -> dict:
    """Every rank runs one step; then rank ``payload['victim']`` exits before the second step
    (or, with ``payload['hang']``, sleeps that many seconds without taking part) and the
    others must raise ``PeerError``: at once for a closed connection, after
    ``payload['timeout']`` seconds for a silent peer."""
    from sparseforge import distributed as sfd

    case = payload["case"]
    pattern, problem, dtype, q, k, v, go = full_inputs(case)
    attn = sfd.ContextParallelAttention(pattern, problem, timeout=payload.get("timeout"))
    ql, kl, vl = (attn.shard(t).clone().requires_grad_() for t in (q, k, v))
    attn(ql, kl, vl).backward(attn.shard(go))  # step 1: everyone alive
    if rank == payload["victim"]:
        if payload.get("hang"):
            time.sleep(payload["hang"])
            return {"slept": payload["hang"]}
        os._exit(3)
    t0 = time.monotonic()
    try:
        attn(ql, kl, vl).backward(attn.shard(go))  # step 2: the victim is gone
    except sfd.PeerError as e:
        return {"raised": "PeerError", "message": str(e), "seconds": time.monotonic() - t0}
    return {"raised": None, "seconds": time.monotonic() - t0}
