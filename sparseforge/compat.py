"""The torch and Triton versions sparseforge runs with, checked when ``sparseforge`` is imported.

Supported: the Triton releases that the last torch releases require, so that sparseforge
installs next to a CUDA torch wheel without replacing its Triton (torch pins one exactly):

=========  ======================
torch      Triton it requires
=========  ======================
2.10       3.6.0
2.11       3.6.0
2.12       3.7.0 (2.12.1: 3.7.1)
2.13       3.7.1
2.14       3.8.x
=========  ======================

and Triton 3.9 (what the spill-free default configs were measured with). CI runs the whole
suite on Triton 3.9 and the interpreter and ahead-of-time tests (tests/codegen) on the
oldest, 3.6; ``tests/codegen/_spills.py`` lists the few kernels that spill registers there.
Too old a torch or Triton raises ``ImportError`` naming both versions; a Triton newer than
the last one tested warns once.
"""
from __future__ import annotations

import re
import warnings

#: Oldest torch supported: the first whose Triton (3.6) is supported.
MIN_TORCH = (2, 10)
#: Oldest Triton supported (what torch 2.10 and 2.11 require).
MIN_TRITON = (3, 6)
#: Newest Triton minor release tested (pyproject pins ``triton<3.10``).
MAX_TRITON = (3, 9)


def version_tuple(text: str) -> tuple[int, ...]:
    """``"2.13.0+cpu"`` -> ``(2, 13, 0)``; ``"3.6.0.dev20251101"`` -> ``(3, 6, 0)``: the
    leading dot-separated integers of a version string."""
    parts = []
    for piece in str(text).split("."):
        m = re.match(r"\d+", piece)
        if m is None:
            break
        parts.append(int(m.group()))
        if m.end() != len(piece):
            break
    if not parts:
        raise ValueError(f"cannot read a version number from {text!r}")
    return tuple(parts)


def _fmt(v: tuple[int, ...]) -> str:
    return ".".join(str(x) for x in v)


def check_versions(torch_version: str, triton_version: str | None) -> None:
    """ImportError unless ``torch_version`` >= ``MIN_TORCH`` and ``triton_version`` (None:
    not installed) >= ``MIN_TRITON``; a RuntimeWarning for a Triton newer than ``MAX_TRITON``."""
    need = (f"sparseforge needs torch >= {_fmt(MIN_TORCH)} and triton >= {_fmt(MIN_TRITON)}, "
            f"< {MAX_TRITON[0]}.{MAX_TRITON[1] + 1}")
    if version_tuple(torch_version)[:2] < MIN_TORCH:
        raise ImportError(f"{need}; installed: torch {torch_version}. Upgrade torch "
                          f"(pip install 'torch>={_fmt(MIN_TORCH)}'): each torch release pins the Triton it needs.")
    if triton_version is None:
        raise ImportError(f"{need}; installed: torch {torch_version}, no triton. "
                          f"Install one: pip install 'triton>={_fmt(MIN_TRITON)},<{MAX_TRITON[0]}.{MAX_TRITON[1] + 1}'.")
    tv = version_tuple(triton_version)[:2]
    if tv < MIN_TRITON:
        raise ImportError(f"{need}; installed: triton {triton_version} (with torch {torch_version}). "
                          f"Upgrade torch to >= {_fmt(MIN_TORCH)}, which brings a supported Triton, or install "
                          f"'triton>={_fmt(MIN_TRITON)},<{MAX_TRITON[0]}.{MAX_TRITON[1] + 1}'.")
    if tv > MAX_TRITON:
        warnings.warn(f"triton {triton_version} is newer than the last release sparseforge was tested with "
                      f"({_fmt(MAX_TRITON)}); kernels may spill or compile differently.", RuntimeWarning, stacklevel=3)


def installed_versions() -> tuple[str, str | None]:
    """(torch.__version__, triton.__version__ or None when triton cannot be imported)."""
    import torch

    try:
        import triton
    except ImportError:
        return torch.__version__, None
    return torch.__version__, triton.__version__


check_versions(*installed_versions())


_TORCHVISION_OPS = None  # the stand-in schemas, kept alive (``import_torchvision``)


def import_torchvision():
    """Import torchvision (timm needs it; transformers imports it when present), also where its
    wheel does not match the installed torch: a CUDA torchvision beside a CPU torch fails to load
    its C++ ops and then to register fake kernels for them ("operator torchvision::nms does not
    exist"). There, the two op schemas it registers fake kernels for are declared (no kernels:
    only detection's NMS calls them, no attention model does) and the import is retried. For
    tests and examples; ImportError if torchvision is not installed."""
    global _TORCHVISION_OPS
    import sys

    import torch

    try:
        import torchvision
        return torchvision
    except RuntimeError as e:
        if "torchvision::nms" not in str(e):
            raise
    for name in [n for n in sys.modules if n.split(".")[0] in ("torchvision", "timm", "transformers")]:
        del sys.modules[name]
    _TORCHVISION_OPS = torch.library.Library("torchvision", "DEF")
    _TORCHVISION_OPS.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_OPS.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision
    return torchvision
