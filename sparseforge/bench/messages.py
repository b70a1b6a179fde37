"""How the benchmarks talk: progress lines on stderr (stdout stays the result) and the
one-line reason a failed step records in a result."""
from __future__ import annotations

import sys


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def why(exc: BaseException) -> str:
    """``"TypeName: message"`` on one line, the message cut at 300 characters."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__
