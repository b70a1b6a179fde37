"""Stage 2 and 3 — lower a Pattern to a TileSchedule and render Triton kernels from it."""
from .schedule import TileSchedule, build_schedule, default_tile
from .tiling import TileGeometry

__all__ = ["TileGeometry", "TileSchedule", "build_schedule", "default_tile"]
