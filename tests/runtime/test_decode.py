"""Decode on the Triton kernels through the public API (interpreter): a 1-D compile whose
queries are the last Nq of Nk keys runs the decode kernel for every Nk without a new op, kernel
or schedule; ``attn.paged(q, cache)`` reads a paged cache (the same bits as the contiguous one)
and matches the float64 reference on the interpreter and the CPU executor; the backward and
patterns the kernel does not run are refused by name."""
from __future__ import annotations

import pytest
import torch

import sparseforge as sf
from sparseforge.dsl.paged import paginate
from sparseforge.runtime import check, ops

F32 = torch.float32
PATTERNS = [sf.Causal() & sf.SlidingWindow(12), sf.Sink(2) | (sf.Causal() & sf.SlidingWindow(12)),
            sf.StridedShards(8, 2, 4)]


def problem(nk, heads=4, kv_heads=2, nq=1):
    return sf.Problem(grid=nq, kv_grid=nk, heads=heads, kv_heads=kv_heads, head_dim=16, dtype=F32)


def qkv(batch, nq, nk, seed, heads=4, kv_heads=2):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, nq, 16, generator=gen), torch.randn(batch, kv_heads, nk, 16, generator=gen),
            torch.randn(batch, kv_heads, nk, 16, generator=gen))


def assert_close(out, lse, ref, ref_lse, keys):
    tol = check.attention_tolerances(F32, F32, keys, 1, 16)
    assert check.row_error(out, ref) <= tol["out"] and check.lse_error(lse, ref_lse) <= tol["lse"]


@pytest.mark.parametrize("pattern", PATTERNS, ids=repr)
def test_decode_steps_run_the_decode_kernel_without_new_ops(pattern):
    mods = (sf.Sinks(torch.randn(4)), sf.Softcap(3.0))
    attn = sf.compile(pattern, problem(40), backend="interpret", modifiers=mods)
    op_names = {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("sparseforge::")}
    kernels, grids = len(ops._KERNELS), dict(attn.kernel._grids)
    for step, (nq, nk) in enumerate([(1, 40), (1, 41), (4, 77), (1, 130)]):
        q, k, v = qkv(2, nq, nk, step)
        out, lse = attn(q, k, v, modifiers=mods, return_lse=True)
        ref, ref_lse = sf.reference_attention(q.double(), k.double(), v.double(), pattern, problem(nk, nq=nq),
                                              modifiers=mods, return_lse=True)
        assert_close(out, lse, ref, ref_lse, nk)
    assert {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("sparseforge::")} == op_names
    assert len(ops._KERNELS) == kernels and dict(attn.kernel._grids) == grids
    assert len(attn.kernel._decoders) == 1   # one decode kernel for every step


def test_decode_backward_on_triton_is_refused_by_name():
    attn = sf.compile(PATTERNS[0], problem(40), backend="interpret")
    q, k, v = qkv(1, 1, 40, 0)
    q.requires_grad_()
    out = attn(q, k, v)
    with pytest.raises(NotImplementedError, match="backward.*decode kernel computes the forward.*backend='cpu'"):
        out.sum().backward()


@pytest.mark.parametrize("backend", ["interpret", "cpu"])
def test_paged_cache(backend):
    """Ragged cache lengths, pages in a shuffled order, garbage in unused slots."""
    pattern = PATTERNS[1]
    attn = sf.compile(pattern, problem(64), backend=backend)
    gen = torch.Generator().manual_seed(1)
    q, k, v = qkv(3, 2, 100, 2)
    lengths = torch.tensor([100, 41, 2])
    cache = paginate(k, v, lengths, 16, num_pages=20, generator=gen, fill=float("nan"))
    with torch.no_grad():
        out, lse = attn.paged(q, cache, return_lse=True)
    ref, ref_lse = sf.reference_paged_attention(q.double(), paginate(k.double(), v.double(), lengths, 16), pattern,
                                                return_lse=True)
    assert_close(out, lse, ref, ref_lse, 100)
    if backend == "interpret":   # the paged kernel: the same bits as the contiguous one on full caches
        full = paginate(k, v, torch.tensor([100, 100, 100]), 16, generator=gen)
        with torch.no_grad():
            paged = attn.paged(q, full, return_lse=True)
        contiguous = attn.kernel.decoder(True).forward(q, k, v, torch.full((3,), 100, dtype=torch.int32), 0.25)
        assert torch.equal(paged[0], contiguous[0]) and torch.equal(paged[1], contiguous[1])


def test_paged_errors_name_the_argument():
    attn = sf.compile(PATTERNS[0], problem(64), backend="interpret")
    q, k, v = qkv(2, 1, 32, 0)
    cache = paginate(k, v, torch.tensor([32, 20]), 8)
    with pytest.raises(ValueError, match="batch 1 but cache.block_table has 2"):
        attn.paged(q[:1], cache)
    with pytest.raises(TypeError, match="cache must be a sparseforge PagedKV"):
        attn.paged(q, (k, v))
    with pytest.raises(NotImplementedError, match="forward only"):
        attn.paged(q.clone().requires_grad_(), cache)
    cpu = sf.compile(PATTERNS[0], problem(64), backend="cpu")
    with pytest.raises(ValueError, match=r"cache_lengths\[1\] = 20 is fewer than the 32 queries"):
        cpu.paged(torch.randn(2, 4, 32, 16), cache)


@pytest.mark.parametrize("pattern,grid,kv_grid", [
    (sf.Full(), (8, 8), (4, 4)),          # Twins GSA / PVT: every query over pooled keys
    (sf.Full(), (6,), (4,)),              # cross attention, Nq > Nk
    (sf.Sink(3), (5, 4), (7,)),           # position-free: any two grids, tokens flattened
], ids=["pooled_keys", "cross_nq_gt_nk", "sink_any_grids"])
def test_position_free_cross_attention_on_the_decode_kernel(pattern, grid, kv_grid):
    """A pattern that reads no query position runs its forward on the decode kernel for any
    pair of grids (forward only, as decode)."""
    heads, kv_heads = 4, 2
    problem = sf.Problem(grid=grid, kv_grid=kv_grid, heads=heads, kv_heads=kv_heads, head_dim=16, dtype=F32)
    attn = sf.compile(pattern, problem, backend="interpret")
    q, k, v = qkv(2, problem.tokens, problem.kv_tokens, 4, heads, kv_heads)
    out, lse = attn(q, k, v, return_lse=True)
    ref, ref_lse = sf.reference_attention(q.double(), k.double(), v.double(), pattern, problem, return_lse=True)
    assert_close(out, lse, ref, ref_lse, problem.kv_tokens)
    assert len(attn.kernel._decoders) == 1
