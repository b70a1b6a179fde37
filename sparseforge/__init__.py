"""sparseforge — a compiler for sparse attention.

Declare which query may attend to which key (``dsl``); sparseforge lowers it to a tile
schedule (``lower``), renders fused Triton kernels (``codegen``), runs them or the CPU
executor (``backends``), tunes them (``autotune``) and calls them through one fixed set of
torch ops (``runtime``): ``sf.compile(pattern, problem)``; ``sf.load(build_dir)`` loads what
``sparseforge compile --out`` wrote; ``sf.nn.SparseAttention`` is the drop-in module;
``sf.distributed`` shards one attention over the ranks of a process group.
"""
from . import compat  # noqa: F401  (first: torch/triton versions, a clear ImportError if too old)
from . import distributed, nn
from .api import compile, load  # noqa: A004
from .dsl import *  # noqa: F401,F403
from .dsl import __all__ as _dsl_all
from .runtime import CompiledAttention, UnsupportedPatternError
from .version import __version__

__all__ = list(_dsl_all) + ["CompiledAttention", "UnsupportedPatternError", "compile", "distributed", "load", "nn",
                            "__version__"]

