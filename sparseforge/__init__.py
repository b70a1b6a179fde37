"""sparseforge — a compiler for sparse attention.

Declare which query may attend to which key (``sparseforge.dsl``); sparseforge lowers it
to a tile schedule, generates fused Triton kernels and wraps them as torch ops.
"""
from .dsl import *  # noqa: F401,F403
from .dsl import __all__ as _dsl_all

__version__ = "0.1.0"
__all__ = list(_dsl_all) + ["__version__"]
