"""Readable names for schedules, kernels and build directories:
``na2d_k7_d2_g56x56_h8_d64_bf16_1a2b3c4d`` (the pattern's tag from its families' entries,
``lower.families.pattern_tag``; the problem; the first 8 hex digits of the schedule
fingerprint), [a-z0-9_] only."""
from __future__ import annotations

import re

from ..dsl.pattern import Pattern
from ..dsl.problem import Problem
from .families import pattern_tag

# Longest readable part of a name (the fingerprint keeps names unique anyway).
MAX_TAG = 80


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
