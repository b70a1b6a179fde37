"""sparseforge — a compiler for sparse attention.

Declare which query may attend to which key (``sparseforge.dsl``); sparseforge lowers it
to a tile schedule (``codegen``), generates fused Triton kernels (``templates``) and wraps
them as torch ops (``runtime``): ``sf.compile(pattern, problem)``; ``sf.load(build_dir)``
loads what ``sparseforge compile --out`` wrote.
"""
from . import nn
from .dsl import *  # noqa: F401,F403
from .dsl import __all__ as _dsl_all
from .runtime import CompiledAttention, UnsupportedPatternError, compile, load  # noqa: A004

__version__ = "0.1.0"
__all__ = list(_dsl_all) + ["CompiledAttention", "UnsupportedPatternError", "compile", "load", "nn", "__version__"]
