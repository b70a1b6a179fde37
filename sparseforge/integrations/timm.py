"""timm vision models on sparseforge attention: ``convert(model)`` switches, in place, the
attention of timm's Swin (v1, v2), MaxViT, HaloNet (stride 1 and 2), Twins (LSA, GSA) and NesT
to sparseforge ops on the full token grid — no window partition, no roll, no mask tensors —
keeping every parameter (relative position tables stay the same trainable ``nn.Parameter``s)::

    import timm
    from sparseforge.integrations.timm import convert

    model = timm.create_model("swin_tiny_patch4_window7_224")
    report = convert(model)          # in place; report.converted / report.skipped
    print(report)

What each converted module computes (the same function as timm's eager module, its pattern
on the module's own grid, compiled lazily per number of grid dimensions and dtype):

- ``SwinTransformerBlock`` / ``SwinTransformerV2Block``: ``Blocks(window, offset=shift)``
  (timm's roll by ``-shift`` then windows is exactly windows starting at ``shift``; its -100
  mask between the wrapped regions is a true mask here), ``RelativePositionBias.from_swin`` of
  ``relative_position_bias_table`` (v1) or of ``16 * sigmoid(cpb_mlp(...))`` computed in the
  forward (v2), cosine attention with the per-head ``logit_scale`` as a [heads] scale (v2).
  A grid that is not a multiple of the window is zero-padded as timm pads it where that
  dimension has no shift; with a shift as well, timm's padded roll is not a window pattern on
  the grid: such a block is skipped at conversion (and at run time such a grid runs timm's own
  forward, with a warning).
- MaxViT ``PartitionAttentionCl`` / ``PartitionAttention2d``: ``Blocks(window)`` or
  ``Grid(grid)``; the relative position bias (``RelPosBias``: ``from_swin``; ``RelPosMlp``,
  ``RelPosBiasTf``: the table gathered from their own ``get_bias()``) as
  ``RelativePositionBias``.
- ``HaloAttn``: ``Halo(block, halo)`` with the keys zero-padded around the grid as timm pads
  them (those keys count in timm's softmax); timm's query-dependent relative logits
  ``q . rel_emb`` are carried as extra channels (the query's logits per key column/row modulo
  the window, against a one-hot of the key's position); stride 2 puts the queries on a grid
  of their own (``kv_grid``, CPU executor until the Triton kernels take ``kv_grid``).
- Twins ``LocallyGroupedAttn`` (LSA): ``Blocks(ws)`` on the zero-padded grid (timm's padding:
  padded tokens are keys); ``GlobalSubSampleAttn`` (GSA): ``Full()`` with the pooled keys on
  their own grid (``kv_grid``, CPU executor for now) when ``sr_ratio > 1``.
- NesT ``Attention``: ``Blocks(block_size)`` on the de-blockified image grid.

Attention dropout (``attn_drop`` p > 0) has no sparseforge counterpart: such modules are
skipped with that reason. Under ``torch.compile`` run the converted model once eagerly per
number of grid dimensions and dtype first (the pattern's compile cannot be traced).
"""
from __future__ import annotations

import dataclasses
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..api import compile as sf_compile
from ..dsl.local import Blocks, Grid, Halo
from ..dsl.modifiers import RelativePositionBias
from ..dsl.problem import Problem
from ..dsl.sequence import Full

__all__ = ["ConversionReport", "ConvertedModule", "SkippedModule", "convert"]


# ------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ConvertedModule:
    """A module whose attention now runs on sparseforge: its qualified name, timm class and
    the pattern (and modifiers) it runs, at the resolution the model was built for."""

    name: str
    timm_class: str
    pattern: str


@dataclasses.dataclass(frozen=True)
class SkippedModule:
    """A timm attention module left as it was, and why."""

    name: str
    timm_class: str
    reason: str


@dataclasses.dataclass
class ConversionReport:
    converted: list[ConvertedModule] = dataclasses.field(default_factory=list)
    skipped: list[SkippedModule] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} module(s), skipped {len(self.skipped)}"]
        lines += [f"  converted  {c.name or '<model>'} ({c.timm_class}): {c.pattern}" for c in self.converted]
        lines += [f"  skipped    {s.name or '<model>'} ({s.timm_class}): {s.reason}" for s in self.skipped]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------
# Compiled attentions, shared by every converted module (keys are plain values)
# ------------------------------------------------------------------------------------
_COMPILED: dict[tuple, object] = {}


def _attention(key: tuple, make):
    """The compiled attention for ``key``; ``make()`` -> (pattern, problem, modifiers,
    head_scale, backend) compiles it on first use (outside torch.compile)."""
    found = _COMPILED.get(key)
    if found is None:
        if torch.compiler.is_compiling():
            raise RuntimeError(
                f"a sparseforge-converted timm module meets {key} for the first time inside torch.compile; "
                "compiling the pattern cannot be traced: run the converted model once eagerly on an input of "
                "this kind (grid dimensions, dtype) before torch.compile")
        pattern, problem, modifiers, head_scale, backend = make()
        found = sf_compile(pattern, problem, backend=backend, modifiers=modifiers, head_scale=head_scale)
        _COMPILED[key] = found
    return found


def _problem(grid, heads, head_dim, dtype, kv_grid=None) -> Problem:
    return Problem(grid=tuple(grid), heads=heads, head_dim=head_dim, dtype=dtype,
                   kv_grid=None if kv_grid is None else tuple(kv_grid))


_WARNED: set = set()


def _warn_fallback(module: nn.Module, why: str) -> None:
    key = (type(module).__name__, why)
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"sparseforge: {type(module).__mro__[2].__name__} runs timm's own forward here: {why}",
                      stacklevel=3)


def _table_from_dense(bias: torch.Tensor, window: tuple[int, ...]) -> torch.Tensor:
    """A relative position table [H, 2 w_d - 1 ...] (key minus query, sparseforge's layout)
    gathered from a dense window bias [H, A, A] (A = prod(window), row-major queries x keys)
    that depends only on the offset: entry (o_1, ...) is taken from the pair whose query sits
    at ``max(0, -o_d)`` and key at ``query + o_d``. Differentiable (a gather)."""
    idx_q, idx_k = _offset_pairs(window, bias.device)
    extents = tuple(2 * w - 1 for w in window)
    return bias[:, idx_q, idx_k].reshape(bias.shape[0], *extents)


def _offset_pairs(window, device):
    ranges = [torch.arange(-(w - 1), w, device=device) for w in window]
    offs = torch.stack(torch.meshgrid(*ranges, indexing="ij"), -1).reshape(-1, len(window))
    q = (-offs).clamp_min(0)
    k = q + offs
    strides = [math.prod(window[d + 1:]) for d in range(len(window))]
    flat = lambda c: sum(c[:, d] * strides[d] for d in range(len(window)))  # noqa: E731
    return flat(q), flat(k)


def _dense_from_table(table: torch.Tensor, window: tuple[int, ...]) -> torch.Tensor:
    """The dense [H, A, A] bias a table [H, 2 w - 1 ...] gives (the check of ``_table_from_dense``)."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(w) for w in window], indexing="ij"), -1).reshape(-1, len(window))
    rel = coords[None, :, :] - coords[:, None, :] + torch.tensor([w - 1 for w in window])   # [q, k, d]: k - q + w - 1
    return table[(slice(None),) + tuple(rel[..., d] for d in range(len(window)))]


def _dropout_reason(module: nn.Module, attr: str = "attn_drop") -> str | None:
    drop = getattr(module, attr, None)
    p = getattr(drop, "p", 0.0) if drop is not None else 0.0
    if p:
        return (f"attention dropout {attr}.p={p} (sparseforge has no attention dropout; build the model with "
                "attn_drop_rate=0 to convert it)")
    return None


# ------------------------------------------------------------------------------------
# Swin (v1, v2)
# ------------------------------------------------------------------------------------
def _swin_plan(window, shift, grid):
    """(pad per dim, pattern) for a Swin block on ``grid``, or a reason it is not a window
    pattern there (pad and shift in one dimension)."""
    pads = tuple((w - g % w) % w for w, g in zip(window, grid))
    for d, (p, s) in enumerate(zip(pads, shift)):
        if p and s:
            return None, (f"grid {tuple(grid)} is not a multiple of the window {tuple(window)} in dimension {d}, "
                          f"which is also shifted by {s}: timm pads after the roll, which is not a window pattern "
                          "on the grid")
    return pads, Blocks(tuple(window), offset=tuple(shift))


class _SwinMixin:
    _sf_v2 = False

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        window, shift = tuple(self.window_size), tuple(self.shift_size)
        pads, pattern = _swin_plan(window, shift, (H, W))
        if pads is None:
            _warn_fallback(self, pattern)
            return super()._attn(x)
        if getattr(self, "attn_mask", None) is not None and not getattr(self, "dynamic_mask", False):
            hp, wp = H + pads[0], W + pads[1]
            if self.attn_mask.shape[0] != (hp // window[0]) * (wp // window[1]):
                return super()._attn(x)  # timm's own error for an input its static mask does not fit
        if any(pads):
            x = F.pad(x, (0, 0, 0, pads[1], 0, pads[0]))
        grid = (H + pads[0], W + pads[1])
        attn = self.attn
        heads = attn.num_heads
        if self._sf_v2:
            if attn.q_bias is None:
                qkv = attn.qkv(x)
            else:
                qkv_bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
                qkv = attn.qkv(x) + qkv_bias if attn.qkv_bias_separate else \
                    F.linear(x, weight=attn.qkv.weight, bias=qkv_bias)
        else:
            qkv = attn.qkv(x)
        n = grid[0] * grid[1]
        q, k, v = qkv.reshape(B, n, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        head_dim = q.shape[-1]
        if self._sf_v2:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
            scale = torch.clamp(attn.logit_scale, max=math.log(1. / 0.01)).exp().reshape(heads)
            table = 16 * torch.sigmoid(attn.cpb_mlp(attn.relative_coords_table).view(-1, heads))
        else:
            scale = attn.scale
            table = attn.relative_position_bias_table
        mods = (RelativePositionBias.from_swin(table, window),)
        key = ("swin", window, shift, heads, head_dim, q.dtype, self._sf_v2, self._sf_backend)
        op = _attention(key, lambda: (pattern, _problem(grid, heads, head_dim, q.dtype), mods, self._sf_v2,
                                      self._sf_backend))
        out = op(q, k, v, grid=grid, scale=scale, modifiers=mods)
        out = out.transpose(1, 2).reshape(B, grid[0], grid[1], heads * head_dim)[:, :H, :W]
        return attn.proj_drop(attn.proj(out))


def _convert_swin(name, block, v2: bool, classes, report, backend) -> bool:
    cls_name = type(block).__name__
    reason = _dropout_reason(block.attn)
    res = tuple(block.input_resolution)
    window, shift = tuple(block.window_size), tuple(block.shift_size)
    if reason is None:
        pads, pattern = _swin_plan(window, shift, res)
        if pads is None:
            reason = f"at its input_resolution {res}: {pattern}"
    if reason is None and not v2 and tuple(block.attn.window_size) != window:
        reason = f"attn.window_size {block.attn.window_size} differs from the block's window {window}"
    if reason is not None:
        report.skipped.append(SkippedModule(name, cls_name, reason))
        return False
    _swap(block, _SwinMixin, classes, {"_sf_v2": v2})
    block._sf_backend = backend
    table = "16 * sigmoid(cpb_mlp)" if v2 else "relative_position_bias_table"
    extra = ", per-head logit_scale, cosine attention" if v2 else ""
    pad = f", zero-padded by {pads}" if any(pads) else ""
    report.converted.append(ConvertedModule(
        name, cls_name, f"{pattern!r} + RelativePositionBias.from_swin({table}){extra} on {res}{pad}"))
    return True


# ------------------------------------------------------------------------------------
# MaxViT
# ------------------------------------------------------------------------------------
def _maxvit_bias(rel_pos, window, heads):
    """RelativePositionBias of a MaxViT ``rel_pos`` module (or None without one)."""
    if rel_pos is None:
        return None
    from timm.layers.pos_embed_rel import RelPosBias
    if isinstance(rel_pos, RelPosBias):
        return RelativePositionBias.from_swin(rel_pos.relative_position_bias_table, window)
    return RelativePositionBias(_table_from_dense(_dense_bias(rel_pos), window))


def _dense_bias(rel_pos) -> torch.Tensor:
    """[H, A, A]: ``get_bias()`` of a timm relative position module ([1, H, A, A] or [H, A, A])."""
    bias = rel_pos.get_bias()
    return bias[0] if bias.dim() == 4 else bias


def _maxvit_bias_reason(rel_pos, window) -> str | None:
    if rel_pos is None:
        return None
    if getattr(rel_pos, "prefix_tokens", 0):
        return f"{type(rel_pos).__name__} with prefix tokens"
    if not hasattr(rel_pos, "get_bias"):
        return f"relative position module {type(rel_pos).__name__} has no get_bias()"
    with torch.no_grad():
        dense = _dense_bias(rel_pos).float().cpu()
        if dense.dim() != 3 or dense.shape[1:] != (math.prod(window),) * 2:
            return f"{type(rel_pos).__name__}.get_bias() has shape {list(dense.shape)}, not [heads, A, A]"
        table = _table_from_dense(dense, window)
        if not torch.equal(_dense_from_table(table, window), dense):
            return (f"{type(rel_pos).__name__}'s bias is not a function of the key-query offset alone "
                    "(not a relative position table)")
    return None


class _MaxVitMixin:
    _sf_nchw = False

    def _partition_attn(self, x: torch.Tensor) -> torch.Tensor:
        size = tuple(self.partition_size)
        grid = tuple(x.shape[-2:]) if self._sf_nchw else tuple(x.shape[1:3])
        if any(g % s for g, s in zip(grid, size)):
            return super()._partition_attn(x)  # timm's own assertion names the size
        attn = self.attn
        B = x.shape[0]
        heads, dh = attn.num_heads, attn.dim_head
        if self._sf_nchw:
            qkv = attn.qkv(x)
            if attn.head_first:
                q, k, v = qkv.view(B, heads, dh * 3, -1).chunk(3, dim=2)
            else:
                q, k, v = qkv.reshape(B, 3, heads, dh, -1).unbind(1)
            q, k, v = (t.transpose(-1, -2) for t in (q, k, v))
        else:
            qkv = attn.qkv(x)
            if attn.head_first:
                q, k, v = qkv.view(B, -1, heads, dh * 3).transpose(1, 2).chunk(3, dim=3)
            else:
                q, k, v = qkv.reshape(B, -1, 3, heads, dh).transpose(1, 3).unbind(2)
        bias = _maxvit_bias(attn.rel_pos, size, heads)
        mods = () if bias is None else (bias,)
        pattern = Blocks(size) if self.partition_block else Grid(size)
        key = ("maxvit", self.partition_block, size, heads, dh, q.dtype, bias is not None, self._sf_backend)
        op = _attention(key, lambda: (pattern, _problem(grid, heads, dh, q.dtype), mods, False, self._sf_backend))
        out = op(q, k, v, grid=grid, scale=attn.scale, modifiers=mods) if mods else \
            op(q, k, v, grid=grid, scale=attn.scale)                                     # [B, heads, N, dh]
        if self._sf_nchw:
            out = out.transpose(-1, -2).reshape(B, heads * dh, *grid)
        else:
            out = out.transpose(1, 2).reshape(B, *grid, heads * dh)
        return attn.proj_drop(attn.proj(out))


def _convert_maxvit(name, module, nchw: bool, classes, report, backend) -> bool:
    cls_name = type(module).__name__
    size = tuple(module.partition_size)
    reason = _dropout_reason(module.attn) or _maxvit_bias_reason(module.attn.rel_pos, size)
    if reason is not None:
        report.skipped.append(SkippedModule(name, cls_name, reason))
        return False
    _swap(module, _MaxVitMixin, classes, {"_sf_nchw": nchw})
    module._sf_backend = backend
    pattern = Blocks(size) if module.partition_block else Grid(size)
    rel = module.attn.rel_pos
    bias = f" + RelativePositionBias({type(rel).__name__})" if rel is not None else ""
    report.converted.append(ConvertedModule(name, cls_name, f"{pattern!r}{bias}"))
    return True


# ------------------------------------------------------------------------------------
# HaloNet
# ------------------------------------------------------------------------------------
def _halo_rel_index(q_ext: int, bsd: int, bs: int, halo: int, win: int, device) -> torch.Tensor:
    """int64 [q_ext, win]: for a query at padded coordinate c (blocks of ``bsd`` queries, keys
    padded in front by one block of ``bs``) and a key column m = key % win of its window, the
    index into timm's relative embedding [2 win - 1] (rel_logits_1d: key's window position
    minus the query's block position + win - 1)."""
    c = torch.arange(q_ext, device=device)[:, None]
    m = torch.arange(win, device=device)[None, :]
    start = (c // bsd) * bs - halo                 # the window's first key (padded coordinates)
    j = torch.remainder(m - start, win)            # the key's position in the window
    return j - c % bsd + win - 1


class _HaloMixin:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        bs, halo, win, s = self.block_size, self.halo_size, self.win_size, self.block_stride
        if H % bs or W % bs:
            return super().forward(x)  # timm's own assertion
        bsd, heads, dqk, dv = self.block_size_ds, self.num_heads, self.dim_head_qk, self.dim_head_v
        q = self.q(x)                                                      # [B, heads*dqk, Hq, Wq]
        hq, wq = q.shape[-2:]
        qp = (bsd + hq + -(-halo // s), bsd + wq + -(-halo // s))          # padded query grid
        kp = (s * qp[0], s * qp[1])                                        # padded key grid
        q = F.pad(q, (bsd, qp[1] - bsd - wq, bsd, qp[0] - bsd - hq)).reshape(B, heads, dqk, qp[0], qp[1])
        kv = self.kv(x).reshape(B, heads, dqk + dv, H, W)
        kv = F.pad(kv, (bs, kp[1] - bs - W, bs, kp[0] - bs - H))           # zeros, as timm pads
        k, v = kv[:, :, :dqk], kv[:, :, dqk:]
        q = q.permute(0, 1, 3, 4, 2)                                        # [B, heads, Qh, Qw, dqk]
        dev = x.device
        idx_h = _halo_rel_index(qp[0], bsd, bs, halo, win, dev)            # [Qh, win]
        idx_w = _halo_rel_index(qp[1], bsd, bs, halo, win, dev)            # [Qw, win]
        pe = self.pos_embed
        lw = q @ pe.width_rel.transpose(-1, -2)                             # [B, heads, Qh, Qw, 2win-1]
        lh = q @ pe.height_rel.transpose(-1, -2)
        qf_w = torch.gather(lw, -1, idx_w[None, None, None].expand(B, heads, qp[0], -1, -1))
        qf_h = torch.gather(lh, -1, idx_h[None, None, :, None].expand(B, heads, -1, qp[1], -1))
        if self.scale_pos_embed:
            scale = self.scale
            qx = torch.cat([q, qf_w, qf_h], -1)
        else:
            scale = 1.0
            qx = torch.cat([q * self.scale, qf_w, qf_h], -1)
        eye = torch.eye(win, dtype=k.dtype, device=dev)
        one_w = eye[torch.arange(kp[1], device=dev) % win]                  # [Kw, win]
        one_h = eye[torch.arange(kp[0], device=dev) % win]                  # [Kh, win]
        kx = torch.cat([k.permute(0, 1, 3, 4, 2),
                        one_w[None, None, None].expand(B, heads, kp[0], -1, -1),
                        one_h[None, None, :, None].expand(B, heads, -1, kp[1], -1)], -1)
        vx = v.permute(0, 1, 3, 4, 2)
        width = max(dqk + 2 * win, dv)
        qx = F.pad(qx, (0, width - qx.shape[-1])).reshape(B, heads, -1, width)
        kx = F.pad(kx, (0, width - kx.shape[-1])).reshape(B, heads, -1, width)
        vx = F.pad(vx, (0, width - dv)).reshape(B, heads, -1, width)
        kv_grid = kp if s > 1 else None
        key = ("halo", bs, halo, s, heads, width, qx.dtype, self._sf_backend)
        op = _attention(key, lambda: (Halo(bs, halo), _problem(qp, heads, width, qx.dtype, kv_grid), (), False,
                                      self._sf_backend))
        out = op(qx, kx, vx, grid=qp, scale=scale, **({"kv_grid": kp} if s > 1 else {}))
        out = out[..., :dv].reshape(B, heads, qp[0], qp[1], dv)[:, :, bsd:bsd + hq, bsd:bsd + wq]
        out = out.permute(0, 1, 4, 2, 3).reshape(B, heads * dv, hq, wq)
        return self.pool(out)


def _convert_halo(name, module, classes, report, backend) -> bool:
    cls_name = type(module).__name__
    _swap(module, _HaloMixin, classes, {})
    module._sf_backend = backend
    s = module.block_stride
    where = "" if s == 1 else f", queries at stride {s} on a grid of their own (kv_grid: CPU executor)"
    pool = ", then timm's average pool" if not isinstance(module.pool, nn.Identity) else ""
    report.converted.append(ConvertedModule(
        name, cls_name,
        f"{Halo(module.block_size, module.halo_size)!r} on the zero-padded grid, relative logits "
        f"q.rel_emb as {2 * module.win_size} extra channels{where}{pool}"))
    return True


# ------------------------------------------------------------------------------------
# Twins
# ------------------------------------------------------------------------------------
class _LsaMixin:
    def forward(self, x: torch.Tensor, size) -> torch.Tensor:
        B, N, C = x.shape
        H, W = size
        ws, heads = self.ws, self.num_heads
        x = x.view(B, H, W, C)
        pad_r, pad_b = (ws - W % ws) % ws, (ws - H % ws) % ws
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        grid = (H + pad_b, W + pad_r)
        hd = C // heads
        q, k, v = self.qkv(x).reshape(B, grid[0] * grid[1], 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
        key = ("lsa", ws, heads, hd, q.dtype, self._sf_backend)
        op = _attention(key, lambda: (Blocks(ws), _problem(grid, heads, hd, q.dtype), (), False, self._sf_backend))
        out = op(q, k, v, grid=grid, scale=self.scale)
        out = out.transpose(1, 2).reshape(B, grid[0], grid[1], C)[:, :H, :W].reshape(B, N, C)
        return self.proj_drop(self.proj(out))


class _GsaMixin:
    def forward(self, x: torch.Tensor, size) -> torch.Tensor:
        B, N, C = x.shape
        heads = self.num_heads
        hd = C // heads
        grid = tuple(size)
        q = self.q(x).reshape(B, N, heads, hd).permute(0, 2, 1, 3)
        kv_grid = grid
        if self.sr is not None:
            x = self.sr(x.permute(0, 2, 1).reshape(B, C, *size))
            kv_grid = tuple(x.shape[-2:])
            x = self.norm(x.reshape(B, C, -1).permute(0, 2, 1))
        k, v = self.kv(x).reshape(B, -1, 2, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
        cross = kv_grid != grid
        key = ("gsa", cross, heads, hd, q.dtype, self._sf_backend)
        op = _attention(key, lambda: (Full(), _problem(grid, heads, hd, q.dtype, kv_grid if cross else None), (),
                                      False, self._sf_backend))
        out = op(q, k, v, grid=grid, scale=self.scale, **({"kv_grid": kv_grid} if cross else {}))
        out = out.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(out))


def _convert_twins(name, module, gsa: bool, classes, report, backend) -> bool:
    cls_name = type(module).__name__
    reason = _dropout_reason(module)
    if reason is not None:
        report.skipped.append(SkippedModule(name, cls_name, reason))
        return False
    _swap(module, _GsaMixin if gsa else _LsaMixin, classes, {})
    module._sf_backend = backend
    if gsa:
        sr = module.sr_ratio
        what = (f"Full() with keys pooled {sr}x{sr} on a grid of their own (kv_grid: CPU executor)" if sr > 1
                else "Full()")
    else:
        what = f"{Blocks(module.ws)!r} on the grid zero-padded to a multiple of {module.ws} (timm's padding)"
    report.converted.append(ConvertedModule(name, cls_name, what))
    return True


# ------------------------------------------------------------------------------------
# NesT
# ------------------------------------------------------------------------------------
class _NestMixin:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, N, C = x.shape
        bs = self._sf_block_size
        g = math.isqrt(T)
        if g * g != T or bs * bs != N:
            _warn_fallback(self, f"{T} blocks of {N} tokens are not a square grid of {bs}x{bs} blocks")
            return super().forward(x)
        heads = self.num_heads
        hd = C // heads
        grid = (g * bs, g * bs)
        qkv = self.qkv(x).reshape(B, g, g, bs, bs, 3, heads, hd)             # blocks (gy, gx), (by, bx)
        q, k, v = qkv.permute(5, 0, 6, 1, 3, 2, 4, 7).reshape(3, B, heads, grid[0] * grid[1], hd).unbind(0)
        key = ("nest", bs, heads, hd, q.dtype, self._sf_backend)
        op = _attention(key, lambda: (Blocks(bs), _problem(grid, heads, hd, q.dtype), (), False, self._sf_backend))
        out = op(q, k, v, grid=grid, scale=self.scale)                       # [B, heads, (gy by gx bx), hd]
        out = out.reshape(B, heads, g, bs, g, bs, hd).permute(0, 2, 4, 3, 5, 6, 1)   # B, gy, gx, by, bx, hd, heads
        out = out.reshape(B, T, N, C)                                         # timm's (C', heads) channel order
        return self.proj_drop(self.proj(out))


def _convert_nest(name, module, block_size, classes, report, backend) -> bool:
    cls_name = type(module).__name__
    reason = _dropout_reason(module)
    if reason is not None:
        report.skipped.append(SkippedModule(name, cls_name, reason))
        return False
    _swap(module, _NestMixin, classes, {})
    module._sf_backend = backend
    module._sf_block_size = block_size
    report.converted.append(ConvertedModule(
        name, cls_name, f"{Blocks(block_size)!r} on the de-blockified image grid"))
    return True


# ------------------------------------------------------------------------------------
# convert
# ------------------------------------------------------------------------------------
_SUBCLASSES: dict[tuple, type] = {}


def _swap(module: nn.Module, mixin: type, classes: dict, attrs: dict) -> None:
    """Give ``module`` a subclass of its own class that overrides the attention path
    (parameters, buffers, names and state_dict unchanged; ``isinstance`` still holds)."""
    base = type(module)
    key = (mixin, base, tuple(sorted(attrs.items())))
    cls = _SUBCLASSES.get(key)
    if cls is None:
        name = f"Sparse{base.__name__}"
        cls = type(name, (mixin, base), dict(attrs, __module__=__name__, __qualname__=name))
        _SUBCLASSES[key] = cls
    module.__class__ = cls


#: timm attention classes this module does not convert (reported as skipped, with the reason).
_KNOWN_UNSUPPORTED = {
    "ParallelPartitionAttention": "MaxViT's experimental parallel block+grid attention is not supported",
    "WindowMultiHeadAttention": "Swin V2 CR (swin_transformer_v2_cr) is not supported",
    "Attention": "plain global attention: not one of the supported sparse families",
}


def convert(model: nn.Module, *, backend: str | None = None) -> ConversionReport:
    """Convert, in place, the attention of timm's Swin (v1, v2), MaxViT, HaloNet, Twins and NesT
    modules inside ``model`` to sparseforge ops, and return a ``ConversionReport`` of the
    converted modules (with the pattern each runs) and the skipped ones (with the reason).

    backend: as in ``sparseforge.compile`` (None: the Triton kernels on CUDA tensors, the CPU
    executor on CPU tensors). Parameters, buffers and the state_dict are unchanged; the
    converted model computes the function timm's eager model computes (see the module
    docstring for how, module by module). Converting twice converts nothing new."""
    import timm  # noqa: F401  (ImportError here, not at sparseforge's import)
    from timm.layers.halo_attn import HaloAttn
    from timm.models import maxxvit, nest, swin_transformer, swin_transformer_v2, twins

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    from ..runtime.inputs import check_backend
    check_backend(backend)
    report = ConversionReport()
    covered: set[int] = set()
    classes: dict = {}
    block_sizes = {}
    for _, level in model.named_modules():
        if isinstance(level, nest.NestLevel):
            for layer in level.transformer_encoder:
                block_sizes[id(layer.attn)] = level.block_size
    mixins = (_SwinMixin, _MaxVitMixin, _HaloMixin, _LsaMixin, _GsaMixin, _NestMixin)
    for name, m in model.named_modules():
        if id(m) in covered:
            continue
        if isinstance(m, mixins):
            covered.update(id(c) for c in m.modules())
            continue
        done = None
        if isinstance(m, swin_transformer.SwinTransformerBlock):
            done = _convert_swin(name, m, False, classes, report, backend)
        elif isinstance(m, swin_transformer_v2.SwinTransformerV2Block):
            done = _convert_swin(name, m, True, classes, report, backend)
        elif isinstance(m, maxxvit.PartitionAttentionCl):
            done = _convert_maxvit(name, m, False, classes, report, backend)
        elif isinstance(m, maxxvit.PartitionAttention2d):
            done = _convert_maxvit(name, m, True, classes, report, backend)
        elif isinstance(m, HaloAttn):
            done = _convert_halo(name, m, classes, report, backend)
        elif isinstance(m, twins.LocallyGroupedAttn):
            done = _convert_twins(name, m, False, classes, report, backend)
        elif isinstance(m, twins.GlobalSubSampleAttn):
            done = _convert_twins(name, m, True, classes, report, backend)
        elif isinstance(m, nest.Attention):
            if id(m) in block_sizes:
                done = _convert_nest(name, m, block_sizes[id(m)], classes, report, backend)
            else:
                report.skipped.append(SkippedModule(name, type(m).__name__,
                                                    "a NesT Attention outside a NestLevel (its block size is unknown)"))
                done = False
        elif type(m).__name__ in _KNOWN_UNSUPPORTED and type(m).__module__.startswith("timm."):
            report.skipped.append(SkippedModule(name, type(m).__name__, _KNOWN_UNSUPPORTED[type(m).__name__]))
            done = False
        if done is not None:
            covered.update(id(c) for c in m.modules())
    return report
