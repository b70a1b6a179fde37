"""Stage 2 — lower: a Pattern on a Problem to a TileSchedule (tiles, folds, closed-form
bounds, the index tables), and the routed and segment paths' schedules."""
from .defaults import default_tile, default_tile_tokens
from .schedule import TileSchedule, build_schedule
from .tiling import TileGeometry

__all__ = ["TileGeometry", "TileSchedule", "build_schedule", "default_tile", "default_tile_tokens"]
