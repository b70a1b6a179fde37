"""On a CUDA GPU: the default kernels of every kind of schedule (closed-form FULL boxes, tables,
folds, per-head-group folds, GQA, the dK/dV kernel on its own tiles), in fp16 and bf16, with
and without score modifiers, forward and every gradient against the float64 reference.
What the interpreter cannot show (bf16, real tile sizes, the compiled pipeline) is checked
here; ``benchmarks/gpu_round.sh`` runs these first."""
from __future__ import annotations

import pytest
import torch

import sparseforge as sf
from sparseforge.backends.triton import TritonKernels
from sparseforge.codegen.config import default_config
from sparseforge.dsl.modifiers import check_modifiers, modifier_spec, modifier_tensors
from sparseforge.lower import build_schedule
from sparseforge.runtime import check

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CASES = [
    (sf.Neighborhood(7, dilation=2), dict(grid=(56, 56), heads=4, head_dim=64)),
    (sf.Causal() & sf.SlidingWindow(512), dict(grid=2048, heads=8, kv_heads=2, head_dim=128)),
    (sf.Neighborhood((3, 5, 5), dilation=(1, 2, 1)), dict(grid=(8, 16, 16), heads=2, head_dim=64)),
    (sf.PerHead([sf.Blocks(8), sf.Grid(8)]), dict(grid=(64, 64), heads=2, head_dim=32)),
    (sf.StridedShards(64, 16, 4), dict(grid=2048, heads=4, head_dim=128)),
    (sf.Halo(8, 3), dict(grid=(64, 64), heads=2, head_dim=64)),
    (sf.GlobalTokens([0, 1, 2, 3]) | sf.SlidingWindow(64, 64), dict(grid=1024, heads=2, head_dim=96)),
]


def _modifiers(problem, with_modifiers: bool, gen):
    if not with_modifiers:
        return None, None
    mods = [sf.Softcap(20.0), sf.Sinks(torch.randn(problem.heads, generator=gen))]
    if problem.ndim == 1:
        mods.append(sf.ALiBi(sf.ALiBi.geometric_slopes(problem.heads)))
    return mods, 0.5 * problem.head_dim ** -0.5 * (1 + torch.rand(problem.heads, generator=gen))


@pytest.mark.parametrize("with_modifiers", [False, True], ids=["plain", "modifiers"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("pattern,shape", CASES, ids=[repr(c[0]) for c in CASES])
def test_default_kernels_match_reference_on_gpu(pattern, shape, dtype, with_modifiers):
    gen = torch.Generator().manual_seed(0)
    problem = sf.Problem(dtype=dtype, **shape)
    mods, head_scale = _modifiers(problem, with_modifiers, gen)
    checked = check_modifiers(mods, pattern, problem) if mods else None
    config = default_config(problem, pattern)
    schedule = build_schedule(pattern, problem, q_tile=config.q_tile, k_tile=config.k_tile)
    kernels = TritonKernels(schedule, config=config, modifiers=modifier_spec(checked, head_scale is not None))
    n, d = problem.tokens, problem.head_dim
    q = torch.randn(2, problem.heads, n, d, generator=gen).to(dtype)
    k = torch.randn(2, problem.kv_heads, n, d, generator=gen).to(dtype)
    v = torch.randn(2, problem.kv_heads, n, d, generator=gen).to(dtype)
    dout = torch.randn(2, problem.heads, n, d, generator=gen).to(dtype)
    scale = d ** -0.5
    tables = {name: t.cuda() for name, t in schedule.tables().items()}
    out, lse = kernels.forward(q.cuda(), k.cuda(), v.cuda(), scale, tables, modifiers=checked, head_scale=head_scale)
    dq, dk, dv, grads = kernels.backward(q.cuda(), k.cuda(), v.cuda(), out, lse, dout.cuda(), scale, tables,
                                         modifiers=checked, head_scale=head_scale)
    torch.cuda.synchronize()

    params = [t.double().requires_grad_() for t in modifier_tensors(checked, head_scale)]
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref_mods = ()
    if checked is not None:
        it = iter(params)
        ref_mods = tuple(m.with_tensors(*[next(it) for _ in m.tensors()]) for m in checked.biases) + \
            ((checked.softcap,) if checked.softcap is not None else ()) + \
            ((checked.sinks.with_tensors(next(it)),) if checked.sinks is not None else ())
    ref, ref_lse = sf.reference_attention(q64, k64, v64, pattern, problem, return_lse=True, modifiers=ref_mods,
                                          scale=params[-1] if head_scale is not None else scale)
    ref.backward(dout.double())
    keys, queries = check.reductions(pattern, problem)
    tol = check.attention_tolerances(dtype, torch.float32, keys, queries, d)
    for name, got, want in (("out", out, ref), ("dq", dq, q64.grad), ("dk", dk, k64.grad), ("dv", dv, v64.grad)):
        err = check.row_error(got.cpu(), want)
        assert err <= tol[name], f"{name}: largest row error {err:.2e} above {tol[name]:.2e}"
    assert check.lse_error(lse.cpu(), ref_lse) <= tol["lse"]
    # the modifiers' gradients: sums over rows of fp32 partials; the main error is delta's, from
    # O stored in 16 bits (a few eps); an all-zero gradient has relative error 1
    for got, p in zip(grads, params):
        rel = ((got.cpu().double() - p.grad).abs().max() / p.grad.abs().max()).item()
        assert rel <= 32 * torch.finfo(dtype).eps, rel


@pytest.mark.parametrize("page_size", [None, 16], ids=["contiguous", "paged"])
@pytest.mark.parametrize("nq", [1, 4, 64])
def test_decode_kernel_on_gpu(nq, page_size):
    """The decode kernel (backends.decode) in bf16 on ragged caches, contiguous or paged, against
    float64; then the same call captured in a CUDA graph and replayed after the cache grew in
    place (no host synchronisation inside the call)."""
    from sparseforge.backends.decode import TritonDecode
    from sparseforge.dsl.paged import paginate

    pattern = sf.Sink(4) | (sf.Causal() & sf.SlidingWindow(1024))
    heads, kv_heads, d, n = 32, 8, 128, 5000
    problem = sf.Problem(grid=1, heads=heads, kv_heads=kv_heads, head_dim=d, dtype=torch.bfloat16)
    gen = torch.Generator(device="cuda").manual_seed(nq)
    q = torch.randn(2, heads, nq, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    k, v = (torch.randn(2, kv_heads, n, d, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(2))
    lengths = torch.tensor([n, 3001], dtype=torch.int32, device="cuda")
    dec = TritonDecode(pattern, problem, page_size=page_size)
    if page_size is None:
        def step():
            return dec.forward(q, k, v, lengths, d ** -0.5)
    else:
        cache = paginate(k, v, lengths.cpu(), page_size)
        def step():
            return dec.forward(q, cache.k_pages, cache.v_pages, lengths, d ** -0.5, block_table=cache.block_table)
    out, lse = step()
    for b, length in enumerate(lengths.tolist()):
        call = sf.Problem(grid=nq, kv_grid=length, heads=heads, kv_heads=kv_heads, head_dim=d)
        ref, ref_lse = sf.reference_attention(q[b:b + 1].double(), k[b:b + 1, :, :length].double(),
                                              v[b:b + 1, :, :length].double(), pattern, call, return_lse=True)
        tol = check.attention_tolerances(torch.bfloat16, torch.float32, 1028, 1, d)
        assert check.row_error(out[b:b + 1], ref) <= tol["out"] and check.lse_error(lse[b:b + 1], ref_lse) <= tol["lse"]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    lengths[1] += 7                      # the cache grew: same buffers, new length, no recapture
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured[0], step()[0])
