"""Readable names for schedules, kernels and ops: ``na2d_k7_d2_g56x56_h8_d64_bf16_1a2b3c4d``
(pattern tag, problem, first 8 hex digits of the schedule fingerprint), [a-z0-9_] only."""
from __future__ import annotations

import re

from ..dsl import local, sequence
from ..dsl.content import Routed, Scattered
from ..dsl.pattern import Intersection, Pattern, PerHead, Union
from ..dsl.problem import Problem

# Longest readable part of a name (the fingerprint keeps names unique anyway).
MAX_TAG = 80


def _v(value) -> str:
    if isinstance(value, (tuple, list)):
        if len(set(value)) == 1:
            return _v(value[0])
        return "x".join(_v(x) for x in value)
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def _is_default(value, default) -> bool:
    values = value if isinstance(value, (tuple, list)) else (value,)
    return all(x == default for x in values)


def pattern_tag(pattern: Pattern, ndim: int = 1) -> str:
    """A short readable tag of a pattern: ``Neighborhood(7, dilation=2)`` on a 2-D grid ->
    ``na2d_k7_d2``; unions join with ``_or_``, intersections with ``_and_``."""
    p = pattern
    if isinstance(p, Union):
        return "_or_".join(pattern_tag(c, ndim) for c in p.parts)
    if isinstance(p, Intersection):
        return "_and_".join(pattern_tag(c, ndim) for c in p.parts)
    if isinstance(p, PerHead):
        seen: list[str] = []
        for c in p.patterns:
            t = pattern_tag(c, ndim)
            if t not in seen:
                seen.append(t)
        return f"perhead{len(p.patterns)}_" + "_".join(seen)
    if isinstance(p, local.Neighborhood):
        s = f"na{ndim}d_k{_v(p.kernel_size)}"
        if not _is_default(p.dilation, 1):
            s += f"_d{_v(p.dilation)}"
        if not _is_default(p.stride, 1):
            s += f"_s{_v(p.stride)}"
        if not _is_default(p.causal, False):
            s += f"_c{_v(p.causal)}"
        return s
    if isinstance(p, local.SlidingWindow):
        return f"sw_l{_v(p.left)}_r{_v(p.right)}"
    if isinstance(p, local.Halo):
        return f"halo_b{_v(p.block_size)}_h{_v(p.halo)}"
    if isinstance(p, local.Blocks):
        return f"blocks{_v(p.size)}"
    if isinstance(p, local.Grid):
        return f"grid{_v(p.size)}"
    if isinstance(p, sequence.Full):
        return "full"
    if isinstance(p, sequence.Causal):
        return "causal"
    if isinstance(p, sequence.Sink):
        return f"sink{p.n}"
    if isinstance(p, sequence.GlobalTokens):
        return f"global{len(p.indices)}"
    if isinstance(p, sequence.Documents):
        return f"docs{len(p.lengths)}"
    if isinstance(p, sequence.StridedShards):
        s = f"s2_b{p.block_size}_l{_v(p.local_blocks)}_v{p.vertical_stride}"
        if p.dense_heads:
            s += f"_dh{p.dense_heads}"
        if not p.heterogeneous:
            s += "_hom"
        if not p.causal:
            s += "_bi"
        return s
    if isinstance(p, Scattered):
        return f"scattered_w{_v(p.window_size)}" + ("" if _is_default(p.shift, 0) else f"_s{_v(p.shift)}")
    if isinstance(p, Routed):
        return f"routed_r{_v(p.region_size)}_k{p.topk}" + ("_ph" if p.per_head else "")
    return type(p).__name__.lower()


def _sanitize(text: str) -> str:
    text = re.sub(r"[^a-z0-9_]+", "_", text.lower())
    return re.sub(r"_+", "_", text).strip("_")


def readable_name(pattern: Pattern, problem: Problem, fingerprint: str) -> str:
    """``<pattern tag>_<problem>[_kv<n>]_<fingerprint[:8]>``, sanitized to [a-z][a-z0-9_]*."""
    tag = _sanitize(pattern_tag(pattern, problem.ndim))[:MAX_TAG].rstrip("_") or "pattern"
    prob = problem.name()
    if problem.kv_heads != problem.heads:
        prob += f"_kv{problem.kv_heads}"
    name = _sanitize(f"{tag}_{prob}_{fingerprint[:8]}")
    return name if name[0].isalpha() else "p_" + name
