"""Every environment variable sparseforge reads, in one place.

Read them through the functions here (never ``os.environ`` elsewhere), so that
``sparseforge env`` can list them and a test can see every switch the project has.
Values are read when a function is called, not at import, so tests may set them.
"""
from __future__ import annotations

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
