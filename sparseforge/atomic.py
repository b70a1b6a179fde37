"""Writing files so that a reader never sees half of one: write a temporary file in the
same directory, then rename it over the target."""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def write_atomic(path: str | os.PathLike, write: Callable[[IO], None] | str | bytes) -> Path:
    """Create or replace ``path`` atomically. ``write`` is the content (str or bytes) or a
    function that writes into the binary file it is given. The file gets the permissions a
    plain ``open`` would give (``mkstemp``'s 0600 is widened by the umask's rule)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(write):
                write(f)
            else:
                f.write(write.encode() if isinstance(write, str) else write)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path
