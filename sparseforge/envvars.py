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
MEMORY_BUDGET = EnvVar("SPARSEFORGE_MEMORY_BUDGET",
                       "most memory a mask, statistic or tile schedule may take, e.g. 32GiB or 'unlimited' "
                       "(default: 75% of this machine's RAM); larger requests are refused up front")

ALL: tuple[EnvVar, ...] = (CACHE_DIR, DEBUG, MEMORY_BUDGET)


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


def cache_dir_problem() -> str | None:
    """Why sparseforge could not write its cache directory (one phrase naming the variable
    and the place), or None when it can. Creates nothing that stays."""
    path = cache_dir()
    why = unwritable_reason(path)
    if why is None:
        return None
    value = os.environ.get(CACHE_DIR.name, "").strip()
    where = f"environment variable {CACHE_DIR.name}={value!r}" if value else \
        f"the default cache directory '{path}' (set {CACHE_DIR.name} to use another)"
    return f"{where}: {why}; expected a writable directory"


def unwritable_reason(path: Path) -> str | None:
    """Why the directory ``path`` could not be created (if missing) and written: a file or a
    symbolic link in the way, or a place where a file cannot be created; None if it can.
    Probes with a temporary file that is removed at once."""
    import tempfile

    path = Path(path)
    probe = path
    while not os.path.lexists(probe):  # the nearest existing ancestor
        if probe.parent == probe:
            return f"'{path}' has no existing ancestor"
        probe = probe.parent
    if probe != path and not probe.is_dir():
        return f"'{probe}' is not a directory, so '{path}' cannot be created"
    if probe == path and not path.is_dir():
        return f"'{path}' is a {'broken symbolic link' if path.is_symlink() else 'file'}, not a directory"
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        return f"cannot create files in '{probe}' ({e.strerror or e})"
    return None


_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 10 ** 6,
               "mib": 1 << 20, "g": 1 << 30, "gb": 10 ** 9, "gib": 1 << 30, "t": 1 << 40, "tb": 10 ** 12,
               "tib": 1 << 40}
_UNLIMITED = {"unlimited", "none", "off", "inf"}


def memory_budget() -> int | None:
    """``SPARSEFORGE_MEMORY_BUDGET`` in bytes: None when unset or empty (the caller's default),
    -1 for 'unlimited'. Accepts plain bytes or a number with a unit: 512MiB, 16GiB, 1.5TB."""
    raw = os.environ.get(MEMORY_BUDGET.name, "").strip()
    if not raw:
        return None
    if raw.lower() in _UNLIMITED:
        return -1
    import re

    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)", raw)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _SIZE_UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"environment variable {MEMORY_BUDGET.name}={raw!r} must be a positive size such as "
                         f"'16GiB', '512MiB' or '2000000000' (bytes), or 'unlimited'")
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


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
