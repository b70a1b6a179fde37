"""The ``sparseforge`` command line: ``main`` (show, describe, env) and the build commands
(compile, check, bench, cache) that ``build`` registers on it. Neither imports this package back."""
from . import build  # noqa: F401  (registers compile, check, bench and cache on main)
from .main import InputError, main

__all__ = ["InputError", "main"]
