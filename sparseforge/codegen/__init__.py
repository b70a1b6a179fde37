"""Stage 3 — generate: kernel configs, the sympy printer and the Jinja templates that render
a TileSchedule into readable Triton source."""
from .config import KernelConfig, Launch, default_config
from .render import render

__all__ = ["KernelConfig", "Launch", "default_config", "render"]
