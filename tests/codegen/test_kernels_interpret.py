"""Generated Triton kernels under the Triton interpreter (CPU) against the float64 reference:
forward, LSE and dQ/dK/dV, for every static family, a union and a PerHead mix."""
import pytest
import torch
import torch._dynamo  # noqa: F401  (imports triton.language before any kernel loads, as torch users do)

import sparseforge as sf
from sparseforge.lower import build_schedule
from sparseforge.backends.triton import TritonKernels
from sparseforge.runtime import check

# (pattern, grid, query tile, heads, kv_heads): small shapes, ragged ones included.
CASES = [
    (sf.Neighborhood(3), (10,), (4,), 2, 2),
    (sf.Neighborhood((3, 2), dilation=(2, 1)), (7, 6), (2, 4), 2, 1),
    (sf.Neighborhood(3, stride=2, causal=True), (11,), (4,), 1, 1),
    (sf.SlidingWindow(3, 1), (19,), (8,), 2, 2),
    (sf.Halo(4, 1), (6, 5), (2, 4), 1, 1),
    (sf.Blocks(3), (7, 6), (2, 4), 1, 1),
    (sf.Grid(2), (4, 6), (2, 4), 1, 1),
    (sf.Full(), (9,), (8,), 1, 1),
    (sf.Causal() & (sf.SlidingWindow(5) | sf.Sink(2)), (40,), (16,), 2, 1),
    (sf.Documents([5, 20, 3]) & sf.Causal(), (28,), (16,), 1, 1),
    (sf.GlobalTokens([0, 9]) | sf.SlidingWindow(2, 2), (20,), (8,), 1, 1),
    (sf.StridedShards(4, 2, 3, dense_heads=1), (30,), (8,), 4, 2),
    (sf.PerHead([sf.Neighborhood(3), sf.Blocks(2), sf.Grid(2), sf.Causal()]), (4, 6), (2, 4), 4, 4),
    # per-group folds (schedule.group_geometry): Grid heads folded, the others not; with GQA
    (sf.PerHead([sf.Blocks(4), sf.Grid(4), sf.Blocks(4), sf.Neighborhood(3)]), (16, 16), (4, 4), 4, 4),
    (sf.PerHead([sf.Blocks(4), sf.Blocks(4), sf.Grid(4), sf.Grid(4)]), (16, 8), (4, 4), 4, 2),
]

TOL = {torch.float32: 2e-5, torch.float16: 5e-3}  # whole-tensor relative errors (``rel``)


def assert_match_reference(pattern, grid, heads, kv_heads, dtype, results, lse=None, ref_lse=None, head_dim=16):
    """Every row of out/dq/dk/dv and every LSE value within ``check.attention_tolerances``
    (from the dtypes' epsilons and the keys per query / queries per key of the exact mask):
    a single missing key moves its row by ~1 / sqrt(keys), far above them."""
    problem = sf.Problem(grid=grid, heads=heads, head_dim=head_dim, dtype=dtype, kv_heads=kv_heads)
    keys, queries = check.reductions(pattern, problem)
    tol = check.attention_tolerances(dtype, torch.float32, keys, queries, head_dim)
    for name, (got, want) in results.items():
        assert torch.isfinite(got).all(), name
        err = check.row_error(got, want)
        assert err <= tol[name], f"{name}: largest row error {err:.2e} above {tol[name]:.2e}"
    if lse is not None:
        assert lse.dtype == torch.float32
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), finite)
        err = check.lse_error(lse, ref_lse)
        assert err <= tol["lse"], f"lse: largest error {err:.2e} above {tol['lse']:.2e}"


def rel(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def run_case(pattern, grid, tile, heads, kv_heads, dtype, batch=1, head_dim=16):
    torch.manual_seed(0)
    problem = sf.Problem(grid=grid, heads=heads, head_dim=head_dim, dtype=dtype, kv_heads=kv_heads)
    schedule = build_schedule(pattern, problem, q_tile=tile)
    if isinstance(pattern, sf.PerHead) and grid[0] == 16:  # the per-group-fold cases really are
        assert schedule.group_folds is not None
    kernels = TritonKernels(schedule, interpret=True)
    n = problem.tokens
    q = torch.randn(batch, heads, n, head_dim, dtype=dtype)
    k = torch.randn(batch, kv_heads, n, head_dim, dtype=dtype)
    v = torch.randn(batch, kv_heads, n, head_dim, dtype=dtype)
    scale = 0.7 * head_dim ** -0.5
    out, lse = kernels.forward(q, k, v, scale, schedule.tables())

    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = sf.reference_attention(q64, k64, v64, pattern, problem, scale=scale, return_lse=True)
    dout = torch.randn_like(ref)
    ref.backward(dout)
    dq, dk, dv, _ = kernels.backward(q, k, v, out, lse, dout.to(dtype), scale, schedule.tables())
    return dict(out=(out, ref), dq=(dq, q64.grad), dk=(dk, k64.grad), dv=(dv, v64.grad)), (lse, ref_lse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("pattern,grid,tile,heads,kv_heads", CASES, ids=[repr(c[0]) for c in CASES])
def test_kernels_match_reference(pattern, grid, tile, heads, kv_heads, dtype):
    results, (lse, ref_lse) = run_case(pattern, grid, tile, heads, kv_heads, dtype)
    assert_match_reference(pattern, grid, heads, kv_heads, dtype, results, lse, ref_lse)


def test_empty_rows_give_zeros_and_minus_inf():
    # Queries 3.. see nothing: their window of one past key misses the two sink keys.
    pattern = sf.Causal() & sf.Sink(2) & sf.SlidingWindow(1)
    problem = sf.Problem(grid=16, heads=1, head_dim=16, dtype=torch.float32)
    mask = sf.dense_mask(pattern, problem)
    empty = ~mask[0].any(-1)
    assert empty.any()
    results, (lse, _) = run_case(pattern, (16,), (8,), 1, 1, torch.float32, batch=2)
    out = results["out"][0]
    assert torch.all(out[:, :, empty] == 0)
    assert torch.all(lse[:, :, empty] == float("-inf"))
    for name in ("dq", "dk", "dv"):
        assert torch.isfinite(results[name][0]).all()


@pytest.mark.parametrize("head_dim", [32, 96])
def test_head_dims_that_pad(head_dim):
    results, (lse, ref_lse) = run_case(sf.Neighborhood(3), (9,), (4,), 1, 1, torch.float32, head_dim=head_dim)
    assert_match_reference(sf.Neighborhood(3), (9,), 1, 1, torch.float32, results, lse, ref_lse, head_dim=head_dim)


def test_source_is_readable_and_names_the_problem():
    problem = sf.Problem(grid=(56, 56), heads=8, head_dim=64, dtype=torch.bfloat16)
    kernels = TritonKernels(build_schedule(sf.Neighborhood(7, dilation=2), problem))
    src = kernels.source("fwd")
    assert "Neighborhood(7, dilation=2)" in src and "grid=(56, 56)" in src
    assert "# FULL key tiles" in src and "# PARTIAL key tiles" in src
    compile(src, "fwd.py", "exec")
    for kind in ("bwd_dq", "bwd_dkdv"):
        compile(kernels.source(kind), f"{kind}.py", "exec")
    with pytest.raises(ValueError, match="kind"):
        kernels.source("sideways")


def test_interpreted_launch_leaves_triton_language_unpatched():
    """The interpreter patches triton.language for every helper call and never undoes it; a
    real compile later in the same process then met lambdas ("Unsupported function
    referenced"). The launch must restore it."""
    import triton.language as tl

    names = ("arange", "zeros", "where", "maximum", "max", "sum")
    before = {(obj, n): getattr(obj, n) for obj in (tl, tl.core, tl.standard) for n in names if hasattr(obj, n)}
    run_case(sf.Neighborhood(3), (10,), (4,), 1, 1, torch.float16)
    assert all(getattr(obj, n) is f for (obj, n), f in before.items())
    problem = sf.Problem(grid=(10,), heads=1, head_dim=16, dtype=torch.float16)
    report = TritonKernels(build_schedule(sf.Neighborhood(5), problem, q_tile=(16,))).aot("fwd", "sm_80")
    assert report.tensor_core == "mma"


# ------------------------------------------------------------------------------------
# NaN/Inf containment (DESIGN.md: a query is never affected by a key it may not see)
# ------------------------------------------------------------------------------------
# One case per path; the interpreter costs ~1 s per case, the 2-D neighborhood ~6 s.
CONTAINMENT = [("neighborhood_gqa", torch.float32), ("documents_padding", torch.float32),
               ("documents_padding", torch.float16), ("routed", torch.float32), ("scattered", torch.float32),
               ("grouped", torch.float16)]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter: "invalid value" (NaN)
@pytest.mark.parametrize("case,dtype", CONTAINMENT, ids=[f"{c}-{str(d)[6:]}" for c, d in CONTAINMENT])
def test_kernels_contain_nan_and_inf(case, dtype):
    """NaN/Inf in k/v rows of keys some rows of a visited tile may not see, in q/dO rows of
    queries some keys' tiles meet masked, and in whole padding tokens: every output and
    gradient they may not reach matches the reference on the same inputs (per element) and
    is finite; keys nobody sees get dK = dV = 0. Fails without the containment kernels
    (``*_fix``): a PARTIAL tile multiplies p = 0 by the NaN rows."""
    from tests.runtime._containment import assert_contained, clean_positions, make_cases, run

    c = make_cases(dtype)[case]
    _, poisoned, taint, unseen = c.poisoned()
    got, want = run(c.compiled("interpret"), *poisoned), run(c.reference(), *poisoned)
    assert_contained(got, want, clean_positions(*taint), dtype, c.tokens)
    for name in ("dk", "dv"):
        assert (got[name][unseen] == 0).all(), name


def test_containment_kernels_exist_where_tiles_hold_masked_pairs():
    """Static and segment schedules get a containment kernel after each kernel; routed ones
    (only padding is masked inside a visited tile, and it is never loaded) do not."""
    from sparseforge.codegen.config import KernelConfig
    from sparseforge.lower.paths import ROUTED

    problem = sf.Problem(grid=(8, 8), heads=1, head_dim=16, dtype=torch.float16)
    static = TritonKernels(build_schedule(sf.Neighborhood(3), problem))
    for kind in ("fwd", "bwd_dq", "bwd_dkdv"):
        assert f"def {static.name}_{kind}_fix(" in static.source(kind)
        compile(static.source(kind), f"{kind}.py", "exec")
    routed = TritonKernels(ROUTED.build(sf.Routed((4, 4), 2), problem, KernelConfig()))
    assert not any("_fix(" in routed.source(kind) for kind in ("fwd", "bwd_dq", "bwd_dkdv"))


def test_no_containment_launch_where_every_visited_tile_is_full(monkeypatch):
    """A static schedule of FULL tiles only holds no masked pair: its kernels run alone (and
    still match the reference); a schedule with PARTIAL tiles runs the containment pass."""
    problem = sf.Problem(grid=(8, 8), heads=1, head_dim=16, dtype=torch.float32)
    for pattern, expect in ((sf.Blocks(4), ["fwd"]), (sf.Neighborhood(3), ["fwd", "fwd_fix"])):
        schedule = build_schedule(pattern, problem, q_tile=(4, 4))
        kernels = TritonKernels(schedule, interpret=True)
        launched, real = [], kernels.kernel

        def recording(name, real=real, launched=launched):
            launched.append(name)
            return real(name)
        monkeypatch.setattr(kernels, "kernel", recording)
        q, k, v = (torch.randn(1, 1, 64, 16) for _ in range(3))
        out, _ = kernels.forward(q, k, v, 0.25, schedule.tables())
        assert launched == expect and kernels.masks_pairs("fwd") == (expect != ["fwd"])
        ref = sf.reference_attention(q.double(), k.double(), v.double(), pattern, problem, scale=0.25)
        assert (out.double() - ref).abs().max() < 1e-4
