"""Kernel configurations: what the autotuner chooses and a build directory records.

A ``KernelConfig`` fixes the tiling (query/key tile shapes per grid dimension), whether the
forward and dQ kernels use closed-form loop bounds where they exist, and, per generated
kernel, the launch parameters ``num_warps`` and ``num_stages``.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from ..dsl.args import positive_int
from ..dsl.content import Grouped, Routed, Scattered
from ..lower.defaults import default_tile, default_tile_tokens
from ..lower.routed import routed_default_tiles

#: The generated kernels of one schedule, in launch order.
KERNELS = ("fwd", "bwd_dq", "bwd_dkdv")
NUM_WARPS = (1, 2, 4, 8, 16)


@dataclasses.dataclass(frozen=True)
class Launch:
    """Launch parameters of one kernel."""

    num_warps: int = 8
    num_stages: int = 2

    def __post_init__(self):
        if self.num_warps not in NUM_WARPS:
            raise ValueError(f"num_warps must be one of {list(NUM_WARPS)}, got {self.num_warps!r}")
        positive_int("num_stages", self.num_stages)

    def tag(self) -> str:
        return f"w{self.num_warps}s{self.num_stages}"


def _tile(name: str, value) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, (tuple, list)) or not value:
        raise ValueError(f"{name} must be None or a tuple of positive ints (one per grid dimension), got {value!r}")
    return tuple(positive_int(name, v) for v in value)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tiles, loop-bound choice and per-kernel launch parameters.

    q_tile, k_tile: tile extents per grid dimension.
    closed_form:    use closed-form key-tile bounds where the pattern has them (else tables).
    fwd, bwd_dq, bwd_dkdv: ``Launch`` of each generated kernel.
    Fields left None take ``default_config(problem)``'s value (``resolved``).
    """

    q_tile: tuple[int, ...] | None = None
    k_tile: tuple[int, ...] | None = None
    closed_form: bool = True
    fwd: Launch | None = None
    bwd_dq: Launch | None = None
    bwd_dkdv: Launch | None = None

    def __post_init__(self):
        object.__setattr__(self, "q_tile", _tile("q_tile", self.q_tile))
        object.__setattr__(self, "k_tile", _tile("k_tile", self.k_tile))
        if not isinstance(self.closed_form, bool):
            raise TypeError(f"closed_form must be a bool, got {self.closed_form!r}")
        for kernel in KERNELS:
            if getattr(self, kernel) is not None and not isinstance(getattr(self, kernel), Launch):
                raise TypeError(f"{kernel} must be a Launch or None, got {getattr(self, kernel)!r}")

    def launch(self, kernel: str) -> Launch | None:
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {list(KERNELS)}, got {kernel!r}")
        return getattr(self, kernel)

    def kernel_tag(self, problem, pattern=None) -> str:
        """What the config changes in the generated kernels beyond the schedule, as a name
        suffix: "" for ``default_config(problem, pattern)``'s choices, else e.g. ``tab_w4s1_w8s2_w4s1``."""
        default, mine = default_config(problem, pattern), self.resolved(problem, pattern)
        if self.closed_form and all(mine.launch(k) == default.launch(k) for k in KERNELS):
            return ""
        return "_".join((["tab"] if not self.closed_form else []) + [mine.launch(k).tag() for k in KERNELS])

    def resolved(self, problem, pattern=None) -> "KernelConfig":
        """This config with its unset fields taken from ``default_config(problem, pattern)``."""
        default = default_config(problem, pattern)
        if self.q_tile is not None and self.k_tile is None:
            k_tile = self.q_tile  # a query tile alone sets both
        else:
            k_tile = self.k_tile or default.k_tile
        return dataclasses.replace(self, q_tile=self.q_tile or default.q_tile, k_tile=k_tile,
                                   **{k: self.launch(k) or default.launch(k) for k in KERNELS})

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (tiles as lists); ``from_dict`` inverts it."""
        launches = {k: dataclasses.asdict(self.launch(k)) if self.launch(k) else None for k in KERNELS}
        return dict(q_tile=list(self.q_tile) if self.q_tile else None,
                    k_tile=list(self.k_tile) if self.k_tile else None, closed_form=self.closed_form, **launches)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "KernelConfig":
        if not isinstance(data, dict):
            raise TypeError(f"config must be a dict, got {data!r}")
        unknown = set(data) - {"q_tile", "k_tile", "closed_form", *KERNELS}
        if unknown:
            raise ValueError(f"config has unknown keys {sorted(unknown)}")
        launches = {}
        for k in KERNELS:
            if data.get(k) is not None:
                value = data[k]
                if not isinstance(value, dict) or set(value) - {"num_warps", "num_stages"}:
                    raise ValueError(f"config[{k!r}] must be a dict with num_warps and num_stages, got {value!r}")
                launches[k] = Launch(**value)
        return cls(q_tile=data.get("q_tile"), k_tile=data.get("k_tile"), closed_form=data.get("closed_form", True),
                   **launches)

    def describe(self) -> str:
        tiles = f"q {self.q_tile or 'default'} x k {self.k_tile or 'default'}"
        launches = ", ".join(f"{k} {self.launch(k).tag() if self.launch(k) else 'default'}" for k in KERNELS)
        bounds = "closed-form bounds where derivable" if self.closed_form else "index tables"
        return f"{tiles}, {bounds}, {launches}"


def default_config(problem, pattern=None) -> KernelConfig:
    """The config used without autotuning: spill-free tiles (``default_tile_tokens``) and
    8 warps; the backward kernels of 16-bit 32 < head_dim <= 128 problems run one stage
    (prefetching the next query tile is what spills them).

    ``pattern``: scattered voxel windows (``dsl.content.Scattered``) and run-time groups
    (``Grouped``, on the same kernels) take the same tiles as 1-D rows of the packed sequence; routed attention
    (``dsl.content.Routed``) changes the defaults: tiles
    cut from the padded region (``lower.routed``) and one stage for every kernel (its
    region-padding arithmetic pushes the two-stage kernels of some regions over ptxas's
    128-register budget for 8 warps; measured by tests/codegen/test_routed_kernels.py)."""
    import torch

    if isinstance(pattern, Routed):
        q_tile, k_tile = routed_default_tiles(pattern, problem)
        one = Launch(8, 1)
        return KernelConfig(q_tile=q_tile, k_tile=k_tile, fwd=one, bwd_dq=one, bwd_dkdv=one)

    q, k = default_tile_tokens(problem)
    one_stage = problem.dtype != torch.float32 and 32 < problem.head_dim <= 128
    bwd = Launch(8, 1 if one_stage else 2)
    if isinstance(pattern, (Scattered, Grouped)):  # 1-D tiles of the packed sequence (lower.segments)
        return KernelConfig(q_tile=(q,), k_tile=(k,), fwd=Launch(8, 2), bwd_dq=bwd, bwd_dkdv=bwd)
    return KernelConfig(q_tile=default_tile(problem, q), k_tile=default_tile(problem, k), fwd=Launch(8, 2),
                        bwd_dq=bwd, bwd_dkdv=bwd)
