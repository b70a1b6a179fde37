"""Scattered linear attention (ScatterFormer) as four fused Triton kernels, forward and backward.

The math and the plan are ``backends.linear``'s; per window w and kv head::

    KV[w] = sum_{j in w} phi(k_j)^T v_j   [D, D]      S[w] = sum_{j in w} phi(k_j)   [D]
    (neighbour pooling, optional: KV, S <- P KV, P S; torch sparse mm on [W, ...], O(W))
    out_i = phi(q_i) KV[w_i] / (phi(q_i) . S[w_i] + EPS)

Kernels, each launched on the grid (chunk, head) of the plan's ``LinearChunks`` (every window
cut into runs of <= ``CHUNK_ROWS`` window-sorted rows, read through ``order``: no packed
copies of q/k/v); inside, ``BLOCK_R`` rows at a time (>= 16, so ``tl.dot`` runs on tensor
cores), fp32 accumulation:

    lin_fwd_kv   k, v -> KV, S          segment outer product, phi fused; S from the same rows
    lin_fwd_out  q, KV, S -> out        window matmul, phi and the normalisation fused
    lin_bwd_q    q, dout, out, KV, S -> dq, dKV, dS   window matmul with KV^T and segment outer
                 product of phi(q)/den with dout, over the q heads of one kv head
    lin_bwd_kv   k, v, dKV, dS -> dk, dv              two window matmuls (dKV^T, dKV)

A window with more than one chunk adds its chunks' KV (dKV) with ``tl.atomic_add`` into a
zeroed fp32 buffer (exact and order-free for up to two chunks). Half-precision dot operands
that are not inputs (phi(q)/den, KV, dKV) are scaled per tile by a power of two so their
largest entry is 2^8 before the cast (no fp16 overflow where phi(q) . S ~ EPS). fp32 inputs
use IEEE fp32 dots. Head dims up to 128 (padded to a power of two >= 16 with masks). Memory:
O(N) for the outputs plus W x kv_heads x D x D fp32 for KV (and its pooled copy).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import envvars
from ..dsl.problem import DTYPE_NAMES
from .linear import EPS, FEATURE_MAPS, ScatteredLinearPlan, pool
from .triton import interpreted_launch

envvars.pin_triton_fp_fusion()

#: Input dtypes the kernels take.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Largest head dim the kernels take (padded to a power of two >= 16).
MAX_HEAD_DIM = 128
KERNELS = ("lin_fwd_kv", "lin_fwd_out", "lin_bwd_q", "lin_bwd_kv")
_TL_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@triton.jit
def _phi(x, FEATURE: tl.constexpr):
    """Feature map of fp32 x: 0 relu, 1 elu(x) + 1."""
    if FEATURE == 0:
        return tl.maximum(x, 0.0)
    else:
        return tl.where(x > 0, x + 1.0, tl.exp(x))


@triton.jit
def _dphi(x, FEATURE: tl.constexpr):
    """Derivative of ``_phi`` at fp32 x."""
    if FEATURE == 0:
        return tl.where(x > 0, 1.0, 0.0)
    else:
        return tl.where(x > 0, 1.0, tl.exp(x))


@triton.jit
def _scale_of(x):
    """Power of two s with max |x| / s = 2^8 (1 for x == 0): x / s casts to fp16 safely."""
    m = tl.max(tl.max(tl.abs(x), 1), 0)
    return tl.exp2(tl.ceil(tl.log2(tl.maximum(m, 1e-30))) - 8.0)


@triton.jit
def _chunk(CH_START, CH_END, CH_WIN):
    """(first sorted row, end, window int64) of this program's chunk (program axis 0)."""
    c = tl.program_id(0)
    return tl.load(CH_START + c), tl.load(CH_END + c), tl.load(CH_WIN + c).to(tl.int64)


@triton.jit
def _row_tile(ORDER, r0, end, h, heads, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """(element offsets [BLOCK_R, BLOCK_D], mask) of head ``h`` of sorted rows r0 .. r0 +
    BLOCK_R (clipped to ``end``) in an [N, heads, D] tensor, rows read through ``ORDER``."""
    pos = r0 + tl.arange(0, BLOCK_R)
    ok = pos < end
    rows = tl.load(ORDER + pos, mask=ok, other=0).to(tl.int64)
    dd = tl.arange(0, BLOCK_D)
    return rows[:, None] * (heads * D) + h * D + dd[None, :], ok[:, None] & (dd < D)[None, :]


@triton.jit
def lin_fwd_kv(K, V, KV, S, ORDER, CH_START, CH_END, CH_WIN, kv_heads, D,
               FEATURE: tl.constexpr, FP32: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """k, v [N, kv_heads, D] -> KV [W, kv_heads, BLOCK_D, BLOCK_D] += phi(k)^T v and
    S [W, kv_heads, BLOCK_D] += sum phi(k), over the rows of one chunk (program (chunk, kv head))."""
    h = tl.program_id(1)
    start, end, w = _chunk(CH_START, CH_END, CH_WIN)
    dd = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    s = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        off, m = _row_tile(ORDER, r0, end, h, kv_heads, D, BLOCK_R, BLOCK_D)
        v = tl.load(V + off, mask=m, other=0.0)
        fk = tl.where(m, _phi(tl.load(K + off, mask=m, other=0.0).to(tl.float32), FEATURE), 0.0)
        s += tl.sum(fk, 0)
        if FP32:
            acc = tl.dot(tl.trans(fk), v, acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(fk.to(v.dtype)), v, acc)
    base = w * kv_heads + h
    tl.atomic_add(KV + base * BLOCK_D * BLOCK_D + dd[:, None] * BLOCK_D + dd[None, :], acc)
    tl.atomic_add(S + base * BLOCK_D + dd, s)


@triton.jit
def lin_fwd_out(Q, KV, S, O, ORDER, CH_START, CH_END, CH_WIN, heads, kv_heads, D, eps,
                FEATURE: tl.constexpr, FP32: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out [N, heads, D] = phi(q) KV[w] / (phi(q) . S[w] + eps) for the rows of one chunk
    (program (chunk, head)); KV, S as ``lin_fwd_kv`` writes them (pooled or not)."""
    h = tl.program_id(1)
    start, end, w = _chunk(CH_START, CH_END, CH_WIN)
    dd = tl.arange(0, BLOCK_D)
    base = w * kv_heads + h // (heads // kv_heads)
    kv = tl.load(KV + base * BLOCK_D * BLOCK_D + dd[:, None] * BLOCK_D + dd[None, :])
    s = tl.load(S + base * BLOCK_D + dd)
    if FP32:
        kv_scale = 1.0
    else:
        kv_scale = _scale_of(kv)
        kv = (kv / kv_scale).to(O.dtype.element_ty)
    for r0 in range(start, end, BLOCK_R):
        off, m = _row_tile(ORDER, r0, end, h, heads, D, BLOCK_R, BLOCK_D)
        fq = tl.where(m, _phi(tl.load(Q + off, mask=m, other=0.0).to(tl.float32), FEATURE), 0.0)
        if FP32:
            num = tl.dot(fq, kv, input_precision="ieee")
        else:
            num = tl.dot(fq.to(O.dtype.element_ty), kv) * kv_scale
        den = tl.sum(fq * s[None, :], 1) + eps
        tl.store(O + off, (num / den[:, None]).to(O.dtype.element_ty), mask=m)


@triton.jit
def lin_bwd_q(Q, DO, O, KV, S, DQ, DKV, DS, ORDER, CH_START, CH_END, CH_WIN, heads, kv_heads, D, eps,
              FEATURE: tl.constexpr, FP32: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (chunk, kv head), over its q heads: dq = phi'(q) (dout KV^T / den + dden S) with
    den = phi(q) . S + eps, dden = -(dout . out) / den; DKV += (phi(q) / den)^T dout and
    DS += sum dden phi(q) (the gradients of the pooled KV, S)."""
    hk = tl.program_id(1)
    start, end, w = _chunk(CH_START, CH_END, CH_WIN)
    dd = tl.arange(0, BLOCK_D)
    base = w * kv_heads + hk
    s = tl.load(S + base * BLOCK_D + dd)
    kv_t = tl.load(KV + base * BLOCK_D * BLOCK_D + dd[None, :] * BLOCK_D + dd[:, None])  # KV^T
    if FP32:
        kv_scale = 1.0
    else:
        kv_scale = _scale_of(kv_t)
        kv_t = (kv_t / kv_scale).to(DO.dtype.element_ty)
    dkv = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    ds = tl.zeros((BLOCK_D,), dtype=tl.float32)
    group = heads // kv_heads
    for g in range(0, group):
        h = hk * group + g
        for r0 in range(start, end, BLOCK_R):
            off, m = _row_tile(ORDER, r0, end, h, heads, D, BLOCK_R, BLOCK_D)
            x = tl.load(Q + off, mask=m, other=0.0).to(tl.float32)
            fq = tl.where(m, _phi(x, FEATURE), 0.0)
            do = tl.load(DO + off, mask=m, other=0.0)
            o = tl.load(O + off, mask=m, other=0.0).to(tl.float32)
            den = tl.sum(fq * s[None, :], 1) + eps
            dden = -tl.sum(do.to(tl.float32) * o, 1) / den
            a = fq / den[:, None]                                   # segment outer: (phi(q) / den)^T dout
            if FP32:
                dkv = tl.dot(tl.trans(a), do, dkv, input_precision="ieee")
            else:
                a_scale = _scale_of(a)
                dkv += tl.dot(tl.trans((a / a_scale).to(do.dtype)), do) * a_scale
            ds += tl.sum(dden[:, None] * fq, 0)
            if FP32:                                                # window matmul: dout KV^T
                dokv = tl.dot(do, kv_t, input_precision="ieee")
            else:
                dokv = tl.dot(do, kv_t) * kv_scale
            dq = (dokv / den[:, None] + dden[:, None] * s[None, :]) * _dphi(x, FEATURE)
            tl.store(DQ + off, dq.to(DQ.dtype.element_ty), mask=m)
    tl.atomic_add(DKV + base * BLOCK_D * BLOCK_D + dd[:, None] * BLOCK_D + dd[None, :], dkv)
    tl.atomic_add(DS + base * BLOCK_D + dd, ds)


@triton.jit
def lin_bwd_kv(K, V, DKV, DS, DK, DV, ORDER, CH_START, CH_END, CH_WIN, kv_heads, D,
               FEATURE: tl.constexpr, FP32: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (chunk, kv head): dk = phi'(k) (v dKV^T + dS), dv = phi(k) dKV for the rows of
    one chunk; dKV, dS the gradients of the un-pooled KV, S."""
    h = tl.program_id(1)
    start, end, w = _chunk(CH_START, CH_END, CH_WIN)
    dd = tl.arange(0, BLOCK_D)
    base = w * kv_heads + h
    dkv = tl.load(DKV + base * BLOCK_D * BLOCK_D + dd[:, None] * BLOCK_D + dd[None, :])
    dkv_t = tl.load(DKV + base * BLOCK_D * BLOCK_D + dd[None, :] * BLOCK_D + dd[:, None])
    ds = tl.load(DS + base * BLOCK_D + dd)
    if FP32:
        scale = 1.0
    else:
        scale = _scale_of(dkv)
        dkv = (dkv / scale).to(DK.dtype.element_ty)
        dkv_t = (dkv_t / scale).to(DK.dtype.element_ty)
    for r0 in range(start, end, BLOCK_R):
        off, m = _row_tile(ORDER, r0, end, h, kv_heads, D, BLOCK_R, BLOCK_D)
        x = tl.load(K + off, mask=m, other=0.0).to(tl.float32)
        fk = tl.where(m, _phi(x, FEATURE), 0.0)
        v = tl.load(V + off, mask=m, other=0.0)
        if FP32:
            dfk = tl.dot(v, dkv_t, input_precision="ieee")
            dv = tl.dot(fk, dkv, input_precision="ieee")
        else:
            dfk = tl.dot(v, dkv_t) * scale
            dv = tl.dot(fk.to(v.dtype), dkv) * scale
        dk = (dfk + ds[None, :]) * _dphi(x, FEATURE)
        tl.store(DK + off, dk.to(DK.dtype.element_ty), mask=m)
        tl.store(DV + off, dv.to(DV.dtype.element_ty), mask=m)


# ---------------------------------------------------------------------------- launching

def block_d(head_dim: int) -> int:
    """The padded head dim the kernels work on: a power of two >= 16."""
    return max(16, triton.next_power_of_2(head_dim))


#: (BLOCK_R, num_warps) per kernel and padded head dim: the smallest settings with no
#: register spills on sm_80 and sm_90 (``tests/codegen/test_linear_kernels.py`` checks 32, 64).
LAUNCH = {
    "lin_fwd_kv": {16: (32, 4), 32: (32, 4), 64: (32, 8), 128: (16, 8)},
    "lin_fwd_out": {16: (32, 4), 32: (32, 4), 64: (32, 8), 128: (16, 8)},
    "lin_bwd_q": {16: (32, 8), 32: (32, 8), 64: (16, 8), 128: (16, 8)},
    "lin_bwd_kv": {16: (32, 4), 32: (32, 4), 64: (32, 8), 128: (16, 8)},
}


def launch_config(name: str, head_dim: int) -> dict:
    """BLOCK_R (rows per step), BLOCK_D and num_warps of kernel ``name`` at ``head_dim``:
    what runs, and what the ahead-of-time checks compile."""
    bd = block_d(head_dim)
    rows, warps = LAUNCH[name][bd]
    return dict(BLOCK_R=rows, BLOCK_D=bd, num_warps=warps)


def aot_args(name: str, dtype: torch.dtype, head_dim: int, feature_map: str = "relu"):
    """(signature, constexprs, num_warps) of kernel ``name`` as ``launch`` runs it, for
    ``backends.aot.aot_compile``."""
    if name not in KERNELS:
        raise ValueError(f"name must be one of {list(KERNELS)}, got {name!r}")
    t = "*" + _TL_DTYPES[dtype]
    f32, i32 = "*fp32", "*i32"
    tensors = {
        "lin_fwd_kv": dict(K=t, V=t, KV=f32, S=f32),
        "lin_fwd_out": dict(Q=t, KV=f32, S=f32, O=t),
        "lin_bwd_q": dict(Q=t, DO=t, O=t, KV=f32, S=f32, DQ=t, DKV=f32, DS=f32),
        "lin_bwd_kv": dict(K=t, V=t, DKV=f32, DS=f32, DK=t, DV=t),
    }[name]
    sig = dict(tensors, ORDER=i32, CH_START=i32, CH_END=i32, CH_WIN=i32, kv_heads="i32", D="i32")
    if name in ("lin_fwd_out", "lin_bwd_q"):
        sig.update(heads="i32", eps="fp32")
    cfg = launch_config(name, head_dim)
    consts = dict(FEATURE=FEATURE_MAPS.index(feature_map), FP32=dtype == torch.float32,
                  BLOCK_R=cfg["BLOCK_R"], BLOCK_D=cfg["BLOCK_D"])
    return sig, consts, cfg["num_warps"]


@functools.cache
def _interpreted(name: str):
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(globals()[name].fn)


def launch(name: str, grid, *args, interpret: bool, head_dim: int, feature: int, fp32: bool):
    """Run kernel ``name`` on ``grid`` (compiled for the GPU, or under the Triton interpreter
    on CPU tensors with ``TRITON_INTERPRET`` set only for the call)."""
    cfg = launch_config(name, head_dim)
    meta = dict(FEATURE=feature, FP32=fp32, BLOCK_R=cfg["BLOCK_R"], BLOCK_D=cfg["BLOCK_D"])
    if not interpret:
        globals()[name][grid](*args, **meta, num_warps=cfg["num_warps"])
        return
    with interpreted_launch():
        _interpreted(name)[grid](*args, **meta)


def check_kernel_inputs(q, k, v, plan: ScatteredLinearPlan, interpret: bool) -> None:
    """What the kernels need beyond ``runtime.compiled.check_voxel_qkv``: dtype, head dim and
    device (CUDA, or CPU under the interpreter)."""
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"q has dtype {q.dtype}; the linear-attention Triton kernels take "
                        f"{[DTYPE_NAMES[d] for d in KERNEL_DTYPES]} (float64 runs on backend='cpu')")
    if interpret and q.dtype == torch.bfloat16:
        raise TypeError("q has dtype bf16, which cannot run under the Triton interpreter (its tl.dot multiplies "
                        "bfloat16 bit patterns, triton-lang/triton#11584); use fp16/fp32, backend='cpu' or a GPU")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"head_dim={q.shape[-1]} is above {MAX_HEAD_DIM}, the largest the linear-attention "
                         "Triton kernels take; use backend='cpu'")
    want = "cpu" if interpret else "cuda"
    if q.device.type != want:
        raise ValueError(f"q is on {q.device} but the linear-attention Triton kernels run on "
                         f"{'CPU tensors under the interpreter' if interpret else 'CUDA tensors'} here")
    if plan.chunks is None:
        raise ValueError("plan has no chunks (made by an older sparseforge?): make it with lin.plan(coords)")


def forward(q, k, v, plan: ScatteredLinearPlan, feature_map: str, interpret: bool):
    """out [N, H, D] of q [N, H, D], k/v [N, kv_heads, D] (contiguous, checked) with the two
    forward kernels; also the per-window KV [W, kv_heads, BD, BD] and S [W, kv_heads, BD]
    (fp32, pooled when the plan pools) that the backward reads."""
    n, heads, d = q.shape
    kv_heads = k.shape[1]
    ch = plan.chunks
    bd = block_d(d)
    opts = _options(q, feature_map, interpret)
    kv = torch.zeros(plan.n_windows, kv_heads, bd, bd, device=q.device, dtype=torch.float32)
    s = torch.zeros(plan.n_windows, kv_heads, bd, device=q.device, dtype=torch.float32)
    out = torch.empty_like(q)
    idx = (ch.order, ch.start, ch.end, ch.win)
    if ch.n_chunks:
        launch("lin_fwd_kv", (ch.n_chunks, kv_heads), k, v, kv, s, *idx, kv_heads, d, **opts)
        if plan.neighbor_pooling:
            kv, s = pool(kv, plan.pool_index), pool(s, plan.pool_index)
        launch("lin_fwd_out", (ch.n_chunks, heads), q, kv, s, out, *idx, heads, kv_heads, d, EPS, **opts)
    return out, kv, s


def backward(q, k, v, out, kv, s, dout, plan: ScatteredLinearPlan, feature_map: str, interpret: bool):
    """dq, dk, dv of ``forward`` (first derivatives) with the two backward kernels."""
    n, heads, d = q.shape
    kv_heads = k.shape[1]
    ch = plan.chunks
    opts = _options(q, feature_map, interpret)
    dout = dout.to(q.dtype).contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if not ch.n_chunks:
        return dq, dk, dv
    idx = (ch.order, ch.start, ch.end, ch.win)
    dkv, ds = torch.zeros_like(kv), torch.zeros_like(s)
    launch("lin_bwd_q", (ch.n_chunks, kv_heads), q, dout, out, kv, s, dq, dkv, ds, *idx, heads, kv_heads, d,
           EPS, **opts)
    if plan.neighbor_pooling:  # the pooling matrix is symmetric: its transpose is itself
        dkv, ds = pool(dkv, plan.pool_index), pool(ds, plan.pool_index)
    launch("lin_bwd_kv", (ch.n_chunks, kv_heads), k, v, dkv, ds, dk, dv, *idx, kv_heads, d, **opts)
    return dq, dk, dv


def _options(q, feature_map: str, interpret: bool) -> dict:
    return dict(interpret=interpret, head_dim=q.shape[-1], feature=FEATURE_MAPS.index(feature_map),
                fp32=q.dtype == torch.float32)
