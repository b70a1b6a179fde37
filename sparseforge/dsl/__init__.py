"""Stage 1 — declare: the pattern DSL and its exact semantics."""
from .content import Grouped, Routed, Scattered
from .local import Blocks, Grid, Halo, Neighborhood, SlidingWindow
from .paged import PagedKV, reference_paged_attention
from .modifiers import ALiBi, RelativePositionBias, Sinks, Softcap, T5Bias, relative_position_bias_shape, \
    t5_relative_position_bucket
from .parse import PatternSyntaxError, load_pattern, parse_pattern
from .pattern import Intersection, MaskContext, Pattern, PerHead, Union
from .problem import Problem
from .semantics import PatternStats, dense_mask, describe, reference_attention, reference_linear_attention
from .sequence import Causal, Documents, Full, GlobalTokens, Sink, StridedShards

__all__ = [
    "ALiBi", "Blocks", "Causal", "Documents", "Full", "GlobalTokens", "Grid", "Grouped", "Halo", "Intersection",
    "MaskContext", "Neighborhood", "PagedKV", "Pattern", "PatternStats", "PatternSyntaxError", "PerHead",
    "Problem", "RelativePositionBias", "Routed", "Scattered", "SlidingWindow", "Sink", "Sinks", "Softcap",
    "StridedShards", "T5Bias", "Union", "dense_mask", "describe", "load_pattern", "parse_pattern",
    "reference_attention", "reference_linear_attention", "reference_paged_attention", "relative_position_bias_shape",
    "t5_relative_position_bucket",
]
