"""The decode kernel: queries at the last positions of a cache of run-time length, keys split
across programs and merged by LSE (flash-decoding), from a contiguous or a paged cache.

    dec = TritonDecode(Causal() & SlidingWindow(4096), Problem(grid=1, heads=32, kv_heads=8, head_dim=128))
    out, lse = dec.forward(q, k, v, n_keys, scale)                      # k, v [B, KVH, N, D]
    out, lse = dec_paged.forward(q, k_pages, v_pages, n_keys, scale, block_table=table)

``n_keys`` (int32 [B], on the device) is each sample's cache length: the kernel reads it, so a
call never synchronises with the host and can be captured in a CUDA graph (the split count
comes from shapes alone). The query heads of a GQA group share every K/V load.
"""
from __future__ import annotations

import hashlib
import math

import sympy as sp
import torch

from ..codegen.render import block_d, modifier_context, render_decode
from ..dsl.modifiers import Modifiers
from ..dsl.pattern import Pattern
from ..dsl.problem import DTYPE_NAMES, Problem
from ..lower.decode import NK, QP, lower_decode
from ..lower.naming import readable_name
from .aot import aot_compile
from .triton import MODIFIER_ARGUMENTS, interpreted_launch, load_generated, modifier_inputs

#: programs a decode launch aims for (a GPU's SMs, twice over): the split count fills them
TARGET_PROGRAMS = 264
BLOCK_N = 64
#: The modifier tensors the decode kernel takes (the sinks join at the merge, on the host).
DECODE_MODIFIERS = tuple((arg, key) for arg, key in MODIFIER_ARGUMENTS if arg != "SINKS")


class TritonDecode:
    """The decode kernel of a 1-D ``pattern`` on ``problem``'s heads, head dim and dtype;
    ``page_size``: the cache is paged (None: contiguous); ``modifiers``: their spec
    (``dsl.modifiers.modifier_spec``); ``padding``: calls pass a key padding mask."""

    def __init__(self, pattern: Pattern, problem: Problem, *, page_size: int | None = None, modifiers: tuple = (),
                 padding: bool = False, interpret: bool = False):
        if page_size is not None and (isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1):
            raise ValueError(f"page_size must be a positive int, got {page_size!r}")
        self.pattern, self.problem, self.page_size, self.interpret = pattern, problem, page_size, interpret
        self.lowering = lower_decode(pattern, problem.heads, problem.kv_heads)
        self.modifiers, self.padding = modifiers, padding
        self.mods = modifier_context(modifiers, pattern, problem)
        heads = Problem(heads=problem.heads, head_dim=problem.head_dim, dtype=problem.dtype, kv_heads=problem.kv_heads)
        key = hashlib.sha256(repr((pattern, modifiers, page_size, padding)).encode()).hexdigest()
        self.name = f"sf_decode_{readable_name(pattern, heads, key)}"
        self.source = render_decode(self.lowering, problem, self.name, page_size=page_size, modifiers=modifiers,
                                    padding=padding)
        self._module = None

    @property
    def kernel(self):
        if self._module is None:
            self._module = load_generated(self.name, "decode", self.source, self.interpret)
        return getattr(self._module, f"{self.name}_decode")

    def blocks(self, n_queries: int) -> tuple[int, int]:
        """(BLOCK_Q queries, BLOCK_M rows) per program: the rows are BLOCK_Q x KV_GROUP
        (query, head) pairs, padded to at least 64 rows, wgmma's M on sm_90 (a single query's
        16 rows on mma.sync took 1025 SASS instructions per key block and 232 registers at d128;
        padded to 64 on wgmma, 762 and 176: the kernel reads K/V, the idle rows cost nothing)."""
        group = self.problem.heads // self.problem.kv_heads
        block_q = 1 << max(0, min(math.ceil(math.log2(max(n_queries, 1))), int(math.log2(max(64 // group, 1)))))
        return block_q, max(64, 1 << math.ceil(math.log2(block_q * group)))

    def splits(self, batch: int, q_tiles: int, max_keys: int) -> int:
        """Programs per row tile: enough to fill TARGET_PROGRAMS, at most one per key block."""
        programs = batch * self.problem.kv_heads * q_tiles
        return max(1, min(math.ceil(TARGET_PROGRAMS / programs), math.ceil(max_keys / BLOCK_N)))

    def forward(self, q, k, v, n_keys: torch.Tensor, scale: float, *, block_table=None, modifiers: Modifiers | None = None,
                head_scale=None, key_valid=None, n_splits: int | None = None):
        """out [B, H, Nq, D] (q's dtype), lse fp32 [B, H, Nq] (natural log, sinks included).
        q [B, H, Nq, D]; k, v [B, KVH, N, D] or pages [P, PAGE_SIZE, KVH, D] with ``block_table``
        int32 [B, max_pages]; ``n_keys`` int32 [B] (<= N, or <= max_pages * PAGE_SIZE);
        ``key_valid``: bool [B, N] (True = real key), for a kernel made with ``padding``."""
        b, h, nq, d = q.shape
        paged = self.page_size is not None
        if paged != (block_table is not None):
            raise ValueError(f"block_table is {'required' if paged else 'not taken'} by this decode kernel "
                             f"(page_size={self.page_size})")
        max_keys = block_table.shape[1] * self.page_size if paged else k.shape[2]
        block_q, block_m = self.blocks(nq)
        q_tiles = math.ceil(nq / block_q)
        splits = n_splits or self.splits(b, q_tiles, max_keys)
        o_part = torch.empty(splits, b, h, nq, d, device=q.device, dtype=torch.float32)
        lse_part = torch.empty(splits, b, h, nq, device=q.device, dtype=torch.float32)
        extra = modifier_inputs(self.mods, modifiers, head_scale, q.device)
        args = [q, k, v, o_part, lse_part, *(extra[arg] for arg, _ in DECODE_MODIFIERS if arg in extra)]
        if self.padding != (key_valid is not None):
            raise ValueError(f"key_valid is {'required' if self.padding else 'not taken'} by this decode kernel")
        if paged:
            args += [block_table, block_table.stride(0)]
            strides = [k.stride(0), k.stride(2), k.stride(1)]          # page, head, slot
        else:
            strides = [k.stride(0), k.stride(1), k.stride(2)]          # batch, head, token
        if key_valid is not None:
            valid = key_valid.to(device=q.device, dtype=torch.int8).contiguous()
            args += [valid, valid.stride(0)]
        if k.stride(3) != 1 or v.stride() != k.stride() or q.stride(3) != 1:
            raise ValueError("q, k and v must have unit stride along head_dim, and v the strides of k")
        args += [n_keys, nq, splits, q.stride(0), q.stride(1), q.stride(2), *strides, scale * math.log2(math.e)]
        meta = dict(BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_D=block_d(d))
        grid = (splits, q_tiles, b * self.problem.kv_heads)
        if self.interpret:
            with interpreted_launch():
                self.kernel[grid](*args, **meta)
        else:
            self.kernel[grid](*args, **meta, **self.LAUNCH)
        sinks = modifiers.sinks.logits if modifiers is not None and modifiers.sinks is not None else None
        return merge_splits(o_part, lse_part, sinks, q.dtype)


    def keys_read(self, n_queries: int, n_keys: int) -> int:
        """Key rows (of K, and as many of V) one sample's decode step loads: the kernel's own
        walk (``_key_blocks`` of every query tile, blocks an earlier range covers skipped, rows
        past ``n_keys`` masked), summed over the tiles and splits. Exact, from its loop bounds."""
        block_q, _ = self.blocks(n_queries)
        ranges = [(sp.lambdify((QP, NK), lo), sp.lambdify((QP, NK), hi)) for lo, hi in self.lowering.intervals]
        rows = 0
        for tile in range(math.ceil(n_queries / block_q)):
            first = tile * block_q + n_keys - n_queries
            last = min(first + block_q, n_keys) - 1
            blocks: set[int] = set()
            for lo, hi in ranges:
                a, b = max(int(lo(first, n_keys)), 0), min(int(hi(last, n_keys)) + 1, n_keys)
                blocks.update(range(a // BLOCK_N, max(-(-b // BLOCK_N), a // BLOCK_N)))
            rows += sum(min(BLOCK_N, n_keys - kb * BLOCK_N) for kb in blocks)
        return rows

    # -- ahead-of-time compile (no GPU needed) -------------------------------------------------
    #: 8 warps: on 4, the 16-row x 64-key tiles of a d128 decode spill on sm_90
    LAUNCH = dict(num_warps=8, num_stages=2)

    def signature(self) -> dict[str, str]:
        """Triton type string of every runtime argument of the decode kernel."""
        dt = "*" + DTYPE_NAMES[self.problem.dtype]
        sig = dict(Q=dt, K=dt, V=dt, O_PART="*fp32", LSE_PART="*fp32")
        sig.update({arg: "*fp32" for arg, key in DECODE_MODIFIERS if self.mods[key]})
        if self.page_size is not None:
            sig.update(BLOCK_TABLE="*i32", stride_table="i32")
        if self.padding:
            sig.update(KEY_VALID="*i8", stride_valid="i32")
        sig.update(N_KEYS="*i32", n_queries="i32", n_splits="i32")
        sig.update({s: "i64" for s in ("stride_qb", "stride_qh", "stride_qn", "stride_kb", "stride_kh", "stride_kn")})
        sig["qk_scale"] = "fp32"
        return sig

    def aot(self, n_queries: int = 1, target="sm_90"):
        """Compile the kernel for ``n_queries`` queries per call for ``target`` on the CPU; its
        ResourceReport."""
        block_q, block_m = self.blocks(n_queries)
        constexprs = dict(BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_D=block_d(self.problem.head_dim))
        return aot_compile(self.kernel, self.signature(), constexprs, target=target, **self.LAUNCH)


def merge_splits(o_part, lse_part, sinks, dtype):
    """The splits' partial outputs [S, B, H, Nq, D] and LSEs [S, B, H, Nq] merged by LSE, the
    sink logits [H] (or None) joining the denominator; empty rows: zeros and LSE -inf (or the sink)."""
    parts = lse_part
    if sinks is not None:
        sink = sinks.detach().float().to(lse_part.device)[None, None, :, None].expand(1, *lse_part.shape[1:])
        parts = torch.cat([lse_part, sink])
    lse = torch.logsumexp(parts, dim=0)
    weight = torch.where(torch.isfinite(lse), torch.exp(lse_part - lse), 0.0)
    out = (weight[..., None] * o_part).sum(dim=0)
    return out.to(dtype), lse

