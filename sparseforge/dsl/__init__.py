"""Stage 1 — declare: the pattern DSL and its exact semantics."""
from .content import Grouped, Routed, Scattered
from .local import Blocks, Grid, Halo, Neighborhood, SlidingWindow
from .parse import PatternSyntaxError, load_pattern, parse_pattern
from .pattern import Intersection, MaskContext, Pattern, PerHead, Union
from .problem import Problem
from .semantics import PatternStats, dense_mask, describe, reference_attention, reference_linear_attention
from .sequence import Causal, Documents, Full, GlobalTokens, Sink, StridedShards

__all__ = [
    "Blocks", "Causal", "Documents", "Full", "GlobalTokens", "Grid", "Grouped", "Halo", "Intersection",
    "MaskContext", "Neighborhood", "Pattern", "PatternStats", "PatternSyntaxError", "PerHead",
    "Problem", "Routed", "Scattered", "SlidingWindow", "Sink", "StridedShards", "Union",
    "dense_mask", "describe", "load_pattern", "parse_pattern", "reference_attention",
    "reference_linear_attention",
]
