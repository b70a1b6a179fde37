"""Every environment variable sparseforge reads, in one place.

Read them through the functions here (never ``os.environ`` elsewhere), so that
``sparseforge env`` can list them and a test can see every switch the project has.
Values are read when a function is called, not at import, so tests may set them.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


@dataclass(frozen=True)
class EnvVar:
    name: str
    help: str


CACHE_DIR = EnvVar("SPARSEFORGE_CACHE_DIR",
                   "cache directory (default: the platform's user cache dir for 'sparseforge')")
DEBUG = EnvVar("SPARSEFORGE_DEBUG", "1: the CLI shows tracebacks, as with 'sparseforge --debug'")

ALL: tuple[EnvVar, ...] = (CACHE_DIR, DEBUG)


def _flag(var: EnvVar) -> bool:
    raw = os.environ.get(var.name, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ValueError(f"environment variable {var.name}={os.environ[var.name]!r} must be one of "
                     f"{sorted(_TRUE | (_FALSE - {''}))}")


def cache_dir() -> Path:
    """Where sparseforge caches builds and tuning results: ``$SPARSEFORGE_CACHE_DIR`` if set
    (and not empty), else ``platformdirs.user_cache_dir("sparseforge")``. Not created here."""
    value = os.environ.get(CACHE_DIR.name, "").strip()
    if value:
        return Path(value).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("sparseforge"))


def debug() -> bool:
    """True when ``SPARSEFORGE_DEBUG`` asks for tracebacks instead of one-line errors."""
    return _flag(DEBUG)


def current() -> dict[str, str | None]:
    """Every sparseforge variable and its raw value (None where unset)."""
    return {v.name: os.environ.get(v.name) for v in ALL}


# -- Triton's own switches that sparseforge sets ---------------------------------------
TRITON_FP_FUSION = "TRITON_DEFAULT_FP_FUSION"
TRITON_INTERPRET = "TRITON_INTERPRET"


def pin_triton_fp_fusion() -> str:
    """Make Triton's FP fusion explicit (``1`` unless the user chose): Triton 3.9 warns that
    its default changes in 3.10. The value is part of Triton's cache key and must be part
    of ours wherever compiled artifacts are cached. Returns the value in force."""
    return os.environ.setdefault(TRITON_FP_FUSION, "1")


@contextlib.contextmanager
def triton_interpreter(enabled: bool):
    """Set (or clear) ``TRITON_INTERPRET`` for the duration of the block, then restore it.
    Triton reads it when ``@triton.jit`` decorates and while the interpreter runs."""
    old = os.environ.get(TRITON_INTERPRET)
    if enabled:
        os.environ[TRITON_INTERPRET] = "1"
    else:
        os.environ.pop(TRITON_INTERPRET, None)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(TRITON_INTERPRET, None)
        else:
            os.environ[TRITON_INTERPRET] = old
