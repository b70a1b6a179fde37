"""Queries and keys of different lengths through ``sf.compile`` on the CPU executor: cross
attention, pooled keys, strided queries, decode and chunked prefill (queries the last Nq
positions of the keys' sequence), GQA — out, LSE and dq/dk/dv against the float64 reference
with per-row tolerances from the dtype and the reduction lengths (``runtime.check``); Nk
changing every call builds nothing and registers nothing; the Triton backends refuse it."""
from __future__ import annotations

import pytest
import torch

import sparseforge as sf
from sparseforge.runtime import check, ops

from ._common import TOL, finite_lse_err, rand, rel_err


def inputs(problem: sf.Problem, nq: int, nk: int, *, batch: int = 2, dtype=None, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    dtype = problem.dtype if dtype is None else dtype
    d = problem.head_dim
    return (rand((batch, problem.heads, nq, d), dtype, gen, True), rand((batch, problem.kv_heads, nk, d), dtype, gen, True),
            rand((batch, problem.kv_heads, nk, d), dtype, gen, True))


def assert_matches_reference(attn, call: sf.Problem, q, k, v, *, reference_kw=None, call_kw=None, modifiers=()):
    """Run ``attn`` and the float64 reference on ``call`` (the call's grids); compare out, LSE
    and the gradients of (out * dout).sum() row by row against ``check.attention_tolerances``
    (keys a query sees, (query, head) rows that see a key: from the exact mask), and as whole
    tensors against TOL."""
    reference_kw, call_kw = reference_kw or {}, call_kw or {}
    out, lse = attn(q, k, v, return_lse=True, **call_kw)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == q.shape[:3]
    dout = rand(out.shape, q.dtype, torch.Generator().manual_seed(7))
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    pattern = attn.pattern
    ref, ref_lse = sf.reference_attention(q64, k64, v64, pattern, call, return_lse=True, modifiers=modifiers,
                                          **reference_kw)
    rq, rk, rv = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    keys, queries = check.reductions(pattern, call, **reference_kw)
    tols = check.attention_tolerances(q.dtype, lse.dtype, keys, queries, call.head_dim)
    rows = {"out": check.row_error(out, ref), "lse": check.lse_error(lse, ref_lse), "dq": check.row_error(dq, rq),
            "dk": check.row_error(dk, rk), "dv": check.row_error(dv, rv)}
    bad = {name: e for name, e in rows.items() if not e <= tols[name]}
    assert not bad, f"{pattern!r} on {call!r}: row errors {bad} above {tols}"
    whole = {"out": rel_err(out, ref), "lse": finite_lse_err(lse, ref_lse), "dq": rel_err(dq, rq),
             "dk": rel_err(dk, rk), "dv": rel_err(dv, rv)}
    assert all(e <= TOL[q.dtype] for e in whole.values()), whole
    return rows


# ------------------------------------------------------------------------------------
# Decode and chunked prefill: every 1-D family, Nq = 1, 4, 64, GQA
# ------------------------------------------------------------------------------------
NK = 80
ONE_D = {
    "causal": sf.Causal(),
    "window": sf.SlidingWindow(16),
    "causal&window": sf.Causal() & sf.SlidingWindow(24, 24),
    "shards": sf.StridedShards(8, 2, 3),
    "sink|window": sf.Sink(4) | sf.SlidingWindow(12),
    "documents&causal": sf.Documents((30, 20, 30)) & sf.Causal(),
    "global|causal&window": sf.GlobalTokens((0, 40)) | (sf.Causal() & sf.SlidingWindow(8)),
}


@pytest.mark.parametrize("nq", [1, 4, 64])
@pytest.mark.parametrize("name", list(ONE_D))
def test_decode_every_1d_family(name, nq):
    problem = sf.Problem(grid=nq, kv_grid=NK, heads=4, kv_heads=2, head_dim=16, dtype=torch.float32)
    attn = sf.compile(ONE_D[name], problem, backend="cpu")
    assert_matches_reference(attn, problem, *inputs(problem, nq, NK))


def test_decode_fp16_and_float64():
    pattern = sf.Causal() & sf.SlidingWindow(20)
    for dtype in (torch.float16, torch.float64):
        problem = sf.Problem(grid=4, kv_grid=NK, heads=2, head_dim=16, dtype=torch.float16)
        attn = sf.compile(pattern, problem, backend="cpu")
        assert_matches_reference(attn, problem, *inputs(problem, 4, NK, dtype=dtype))


def test_decode_from_a_prefill_compile():
    """An attention compiled for 1-D self attention takes q shorter than k: decode alignment."""
    pattern = sf.Causal() & sf.SlidingWindow(16)
    attn = sf.compile(pattern, sf.Problem(grid=NK, heads=2, head_dim=16, dtype=torch.float32), backend="cpu")
    for nq in (1, 5):
        call = sf.Problem(grid=nq, kv_grid=NK, heads=2, head_dim=16, dtype=torch.float32)
        assert_matches_reference(attn, call, *inputs(call, nq, NK, seed=nq))


def test_decode_with_sinks_and_softcap():
    mods = (sf.Softcap(8.0), sf.Sinks(torch.tensor([0.5, -1.0])))
    problem = sf.Problem(grid=3, kv_grid=40, heads=2, head_dim=16, dtype=torch.float32)
    attn = sf.compile(sf.Causal() & sf.SlidingWindow(6), problem, backend="cpu", modifiers=mods)
    assert_matches_reference(attn, problem, *inputs(problem, 3, 40), call_kw=dict(modifiers=mods), modifiers=mods)


def test_nk_changing_every_call_builds_and_registers_nothing():
    pattern = sf.Causal() & sf.SlidingWindow(16)
    problem = sf.Problem(grid=1, kv_grid=32, heads=2, head_dim=16, dtype=torch.float32)
    attn = sf.compile(pattern, problem, backend="cpu")
    op_names = {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("sparseforge::")}
    kernels, grids = len(ops._KERNELS), dict(attn.kernel._grids)
    for nk in (33, 47, 90, 91):
        call = sf.Problem(grid=1, kv_grid=nk, heads=2, head_dim=16, dtype=torch.float32)
        assert_matches_reference(attn, call, *inputs(call, 1, nk, batch=1, seed=nk))
    assert {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("sparseforge::")} == op_names == {
        "sparseforge::attention", "sparseforge::attention_backward", "sparseforge::linear_attention",
        "sparseforge::linear_attention_backward"}
    assert len(ops._KERNELS) == kernels and dict(attn.kernel._grids) == grids  # no kernel, no schedule per Nk


def test_decode_under_torch_compile_one_graph():
    """fullgraph + dynamic=True: Nk grows call after call in the one captured graph, forward
    and backward."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    pattern = sf.Causal() & sf.SlidingWindow(8)
    problem = sf.Problem(grid=1, kv_grid=20, heads=2, head_dim=8, dtype=torch.float32)
    attn = sf.compile(pattern, problem, backend="cpu")
    torch._dynamo.reset()
    counters.clear()
    f = torch.compile(lambda q, k, v: attn(q, k, v), fullgraph=True, dynamic=True, backend="aot_eager")
    for nk in (20, 27, 41):
        q, k, v = inputs(problem, 2, nk, seed=nk)
        call = sf.Problem(grid=2, kv_grid=nk, heads=2, head_dim=8, dtype=torch.float32)
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref = sf.reference_attention(q64, k64, v64, pattern, call)
        got = f(q, k, v)
        assert rel_err(got, ref) < TOL[torch.float32]
        grads = torch.autograd.grad(got.square().sum(), (q, k, v))
        want = torch.autograd.grad(ref.square().sum(), (q64, k64, v64))
        assert all(rel_err(g, w) < TOL[torch.float32] for g, w in zip(grads, want))
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------
# Cross attention, pooled keys, strided queries
# ------------------------------------------------------------------------------------
CROSS = [
    # (pattern, query grid, key grid)
    (sf.Full(), (3, 4), (7,)),                    # image queries, text keys
    (sf.Full(), 9, 5),                            # Nq > Nk: Full reads no position
    (sf.Sink(3), (2, 5), (6,)),
    (sf.Neighborhood(3), (8, 8), (4, 4)),         # pooled keys (PVT / Twins GSA / HiLo "Lo")
    (sf.Blocks(2), (8, 6), (4, 3)),
    (sf.Halo(4, 1), (4, 4), (8, 8)),              # strided queries (HaloNet stride 2)
    (sf.Neighborhood((5, 3)), (4, 8), (8, 4)),    # one dimension each way
]


@pytest.mark.parametrize("case", CROSS, ids=lambda c: f"{c[0]!r}-{c[1]}-{c[2]}")
def test_cross_grids(case):
    pattern, grid, kv_grid = case
    problem = sf.Problem(grid=grid, kv_grid=kv_grid, heads=4, kv_heads=2, head_dim=16, dtype=torch.float32)
    attn = sf.compile(pattern, problem, backend="cpu")
    assert_matches_reference(attn, problem, *inputs(problem, problem.tokens, problem.kv_tokens))


def test_cross_another_key_grid_per_call():
    problem = sf.Problem(grid=(8, 8), kv_grid=(4, 4), heads=2, head_dim=16, dtype=torch.float32)
    attn = sf.compile(sf.Neighborhood(3), problem, backend="cpu")
    call = sf.Problem(grid=(8, 8), kv_grid=(4, 8), heads=2, head_dim=16, dtype=torch.float32)
    assert_matches_reference(attn, call, *inputs(call, 64, 32), call_kw=dict(kv_grid=(4, 8)))


@pytest.mark.parametrize("causal", [False, True])
def test_grouped_cross(causal):
    nq, nk = 6, 11
    problem = sf.Problem(grid=nq, kv_grid=nk, heads=4, kv_heads=2, head_dim=16, dtype=torch.float32)
    attn = sf.compile(sf.Grouped(causal=causal), problem, backend="cpu")
    gen = torch.Generator().manual_seed(1)
    groups, kv_groups = torch.randint(-1, 3, (2, nq), generator=gen), torch.randint(-1, 3, (2, 4, nk), generator=gen)
    q, k, v = inputs(problem, nq, nk)
    ids = dict(groups=groups, kv_groups=kv_groups)
    assert_matches_reference(attn, problem, q, k, v, reference_kw=ids, call_kw=ids)


def test_check_numerics_of_a_cross_problem():
    problem = sf.Problem(grid=(4, 4), kv_grid=(8, 8), heads=2, head_dim=16, dtype=torch.float32)
    result = check.check_numerics(sf.compile(sf.Halo(4, 1), problem, backend="cpu"), device="cpu")
    assert result.passed, result


def test_opcheck_with_kv_grid():
    problem = sf.Problem(grid=3, kv_grid=10, heads=2, head_dim=8, dtype=torch.float32)
    attn = sf.compile(sf.Causal(), problem, backend="cpu")
    q, k, v = inputs(problem, 3, 10)
    args = attn.op_inputs(q, k, v, scale=0.3, kv_grid=(10,))
    assert args[-1] == [10]
    torch.library.opcheck(attn.op.default, args)
    out, lse = attn.op.default(*args)
    do, dl = torch.randn_like(out), torch.randn_like(lse)
    q, k, v, out, lse = (t.detach() for t in (q, k, v, out, lse))
    torch.library.opcheck(attn.backward_op.default, (q, k, v, out, lse, do, dl, *args[3:]))


# ------------------------------------------------------------------------------------
# Refusals
# ------------------------------------------------------------------------------------
def test_triton_backends_refuse_kv_grid():
    """What the decode kernel does not run (N-D grids for patterns that read query positions, a
    mask that depends on the length, the backward) is refused by name on the Triton backends
    (tests/runtime/test_decode.py: what it runs)."""
    pooled = sf.Problem(grid=(4, 4), kv_grid=(2, 2), heads=2, head_dim=16, dtype=torch.float32)
    problem = sf.Problem(grid=4, kv_grid=16, heads=2, head_dim=16, dtype=torch.float32)
    for backend in ("interpret", "triton"):
        with pytest.raises(NotImplementedError, match=rf"kv_grid.*backend='{backend}'"):
            sf.compile(sf.Neighborhood(3), pooled, backend=backend)
        with pytest.raises(NotImplementedError, match=rf"kv_grid.*backend='{backend}'"):
            sf.compile(sf.Neighborhood(3), problem, backend=backend)
    attn = sf.compile(sf.Neighborhood(3), sf.Problem(grid=16, heads=2, head_dim=16, dtype=torch.float32),
                      backend="interpret")
    q, k, v = inputs(problem, 4, 16)
    with pytest.raises(NotImplementedError, match="kv_grid.*not implemented on backend='interpret'"):
        attn(q, k, v)
    with pytest.raises(NotImplementedError, match="autotune"):
        sf.compile(sf.Causal(), problem, autotune=True)


def test_bad_calls_name_the_argument():
    problem = sf.Problem(grid=(4, 4), kv_grid=(2, 2), heads=2, head_dim=8, dtype=torch.float32)
    attn = sf.compile(sf.Neighborhood(1), problem, backend="cpu")
    q, k, v = inputs(problem, 16, 4)
    with pytest.raises(ValueError, match=r"k has shape \(2, 2, 9, 8\).*pass kv_grid="):
        attn(q, *inputs(problem, 16, 9)[1:])
    with pytest.raises(ValueError, match=r"kv_grid=\(3, 3\) has 9 tokens but k has shape"):
        attn(q, k, v, kv_grid=(3, 3))
    _, k6, v6 = inputs(problem, 16, 6)
    with pytest.raises(ValueError, match=r"Neighborhood.*kv_grid=\(3, 2\).*no integer ratio in dimension 0"):
        attn(q, k6, v6, kv_grid=(3, 2))
    self_attn = sf.compile(sf.Causal(), sf.Problem(grid=8, heads=2, head_dim=8, dtype=torch.float32), backend="cpu")
    q8, k4, v4 = inputs(sf.Problem(grid=8, heads=2, head_dim=8), 8, 4)
    with pytest.raises(ValueError, match=r"Causal.*Nq <= Nk; got Nq=8 \(grid\) > Nk=4 \(kv_grid\)"):
        self_attn(q8.float(), k4.float(), v4.float())
    with pytest.raises(ValueError, match="lengths is not supported with kv_grid"):
        self_attn(*inputs(sf.Problem(grid=8, heads=2, head_dim=8, dtype=torch.float32), 2, 8), lengths=[8, 8])
    with pytest.raises(ValueError, match=r"modifiers\[0\] \(ALiBi\).*no place there.*Nq=8 \(grid\) > Nk=4"):
        sf.compile(sf.Full(), sf.Problem(grid=8, kv_grid=4, heads=2, head_dim=8), modifiers=(sf.ALiBi(torch.ones(2)),))
    with pytest.raises(ValueError, match="Routed.*one set of tokens"):
        sf.compile(sf.Routed((2, 2), 1), sf.Problem(grid=(4, 4), kv_grid=(8, 8), heads=2, head_dim=8))


@pytest.mark.parametrize("args,words", [
    (["--seq", "4", "--kv-grid", "64"], ["'--kv-grid'", "kv_grid", "not implemented on backend='triton'"]),
    (["--seq", "64", "--kv-grid", "4"], ["'--kv-grid'", "Causal", "Nq <= Nk"]),
    (["--seq", "4", "--kv-grid", "4xa"], ["'--kv-grid'", "not a grid"]),
    (["--seq", "4", "--kv-grid", "0"], ["'--kv-grid'", "kv_grid[0] must be >= 1"]),
])
def test_cli_compile_kv_grid(args, words, tmp_path, monkeypatch):
    """``sparseforge compile --kv-grid``: checked against the pattern, and a build (Triton
    kernels) refused by name until the kernels take it; exit 2, one line."""
    from click.testing import CliRunner

    from sparseforge.cli.main import main

    monkeypatch.setenv("SPARSEFORGE_CACHE_DIR", str(tmp_path))
    result = CliRunner().invoke(main, ["compile", "Causal()", *args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for w in words:
        assert w in result.stderr, (w, result.stderr)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["t5", "alibi"])
@pytest.mark.parametrize("backend", ["cpu", "interpret"])
def test_position_biases_in_decode_are_the_bottom_rows(kind, backend):
    """T5 buckets (a T5/Whisper-style decoder) and ALiBi measure on the key grid, each query at
    its place: a decode step is exactly the last Nq rows of self attention over the Nk keys, on
    the CPU executor and on the decode kernel; the CPU executor's gradients too."""
    heads, pattern = 4, sf.Causal() & sf.SlidingWindow(30)
    gen = torch.Generator().manual_seed(3)
    mods = ((sf.T5Bias(torch.randn(heads, 8, generator=gen), max_distance=12, bidirectional=False),) if kind == "t5"
            else (sf.ALiBi(sf.ALiBi.geometric_slopes(heads)), sf.Softcap(2.0)))
    attn = sf.compile(pattern, sf.Problem(grid=1, kv_grid=64, heads=heads, kv_heads=2, head_dim=16,
                                          dtype=torch.float32), backend=backend, modifiers=mods)
    for nq, nk in [(1, 64), (4, 90)]:
        q = torch.randn(2, heads, nq, 16, generator=gen, requires_grad=backend == "cpu")
        k, v = (torch.randn(2, 2, nk, 16, generator=gen) for _ in range(2))
        out, lse = attn(q, k, v, modifiers=mods, return_lse=True)
        full = sf.Problem(grid=nk, heads=heads, kv_heads=2, head_dim=16, dtype=torch.float64)
        q_full = torch.zeros(2, heads, nk, 16, dtype=torch.float64)
        q_full[:, :, nk - nq:] = q.detach().double()
        q_full.requires_grad_()
        ref, ref_lse = sf.reference_attention(q_full, k.double(), v.double(), pattern, full, modifiers=mods,
                                              return_lse=True)
        tol = check.attention_tolerances(torch.float32, torch.float32, 31, 1, 16)
        assert check.row_error(out, ref[:, :, nk - nq:]) <= tol["out"]
        assert check.lse_error(lse, ref_lse[:, :, nk - nq:]) <= tol["lse"]
        if backend == "cpu":
            dout = torch.randn(out.shape, generator=gen)
            out.backward(dout)
            ref[:, :, nk - nq:].backward(dout.double())
            assert check.row_error(q.grad, q_full.grad[:, :, nk - nq:]) <= tol["dq"]
