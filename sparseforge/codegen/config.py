"""Kernel configurations: what the autotuner chooses and a build directory records.

A ``KernelConfig`` fixes the tiling (query/key tile shapes per grid dimension) of the forward
and dQ kernels, the dK/dV kernel's own tiling (keys stationary, query tiles streamed), whether
the forward and dQ kernels use closed-form loop bounds where they exist, and, per generated
kernel, the launch parameters ``num_warps`` and ``num_stages``.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from ..dsl.args import positive_int
from ..dsl.content import Grouped, Routed, Scattered
from ..lower.defaults import default_dkdv_tile_tokens, default_tile, default_tile_tokens
from ..lower.routed import routed_default_tiles
from ..lower.schedule import group_folds_kept

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

    q_tile, k_tile: tile extents per grid dimension (forward and dQ kernels).
    closed_form:    use closed-form key-tile bounds where the pattern has them (else tables).
    fwd, bwd_dq, bwd_dkdv: ``Launch`` of each generated kernel.
    dkdv_q_tile, dkdv_k_tile: the dK/dV kernel's tiles (its own schedule and inverse tables):
                    a stationary key tile of >= 64 rows is what lets sm_90 run its products on
                    wgmma (M = 64 per warpgroup); unset, they are ``default_config``'s, and a
                    path with one tiling for all kernels (routed, segments) takes q_tile/k_tile.
    Fields left None take ``default_config(problem)``'s value (``resolved``).
    """

    q_tile: tuple[int, ...] | None = None
    k_tile: tuple[int, ...] | None = None
    closed_form: bool = True
    fwd: Launch | None = None
    bwd_dq: Launch | None = None
    bwd_dkdv: Launch | None = None
    dkdv_q_tile: tuple[int, ...] | None = None
    dkdv_k_tile: tuple[int, ...] | None = None

    def __post_init__(self):
        for name in ("q_tile", "k_tile", "dkdv_q_tile", "dkdv_k_tile"):
            object.__setattr__(self, name, _tile(name, getattr(self, name)))
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
        default, mine = default_config(problem, pattern).resolved(problem, pattern), self.resolved(problem, pattern)
        dkdv = (mine.dkdv_q_tile, mine.dkdv_k_tile) != (default.dkdv_q_tile, default.dkdv_k_tile)
        if self.closed_form and not dkdv and all(mine.launch(k) == default.launch(k) for k in KERNELS):
            return ""
        tiles = ["kv" + "x".join(map(str, mine.dkdv_q_tile)) + "_" + "x".join(map(str, mine.dkdv_k_tile))] if dkdv else []
        return "_".join((["tab"] if not self.closed_form else []) + tiles + [mine.launch(k).tag() for k in KERNELS])

    def resolved(self, problem, pattern=None) -> "KernelConfig":
        """This config with its unset fields taken from ``default_config(problem, pattern)``."""
        default = default_config(problem, pattern)
        if self.q_tile is not None and self.k_tile is None:
            k_tile = self.q_tile  # a query tile alone sets both
        else:
            k_tile = self.k_tile or default.k_tile
        q_tile = self.q_tile or default.q_tile
        # dK/dV: its own tiles, else the default's, else (a path with one tiling) the forward's
        dkdv = (self.dkdv_q_tile or default.dkdv_q_tile or q_tile, self.dkdv_k_tile or default.dkdv_k_tile or k_tile)
        return dataclasses.replace(self, q_tile=q_tile, k_tile=k_tile, dkdv_q_tile=dkdv[0], dkdv_k_tile=dkdv[1],
                                   **{k: self.launch(k) or default.launch(k) for k in KERNELS})

    @property
    def shared_tiling(self) -> bool:
        """Whether the dK/dV kernel runs on the forward's tiles (one schedule for all kernels)."""
        return (self.dkdv_q_tile, self.dkdv_k_tile) == (self.q_tile, self.k_tile)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (tiles as lists); ``from_dict`` inverts it."""
        launches = {k: dataclasses.asdict(self.launch(k)) if self.launch(k) else None for k in KERNELS}
        tiles = {name: list(getattr(self, name)) if getattr(self, name) else None
                 for name in ("q_tile", "k_tile", "dkdv_q_tile", "dkdv_k_tile")}
        return dict(**tiles, closed_form=self.closed_form, **launches)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "KernelConfig":
        if not isinstance(data, dict):
            raise TypeError(f"config must be a dict, got {data!r}")
        unknown = set(data) - {"q_tile", "k_tile", "dkdv_q_tile", "dkdv_k_tile", "closed_form", *KERNELS}
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
                   dkdv_q_tile=data.get("dkdv_q_tile"), dkdv_k_tile=data.get("dkdv_k_tile"), **launches)

    def describe(self) -> str:
        tiles = f"q {self.q_tile or 'default'} x k {self.k_tile or 'default'}"
        if self.dkdv_q_tile or self.dkdv_k_tile:
            tiles += f" (dK/dV: q {self.dkdv_q_tile or 'default'} x k {self.dkdv_k_tile or 'default'})"
        launches = ", ".join(f"{k} {self.launch(k).tag() if self.launch(k) else 'default'}" for k in KERNELS)
        bounds = "closed-form bounds where derivable" if self.closed_form else "index tables"
        return f"{tiles}, {bounds}, {launches}"


#: Launch of the dK/dV kernel by (sm_90 or later, its default (query, key) tile tokens):
#: spill-free on the ahead-of-time test problems (tests/codegen/test_aot_kernels.py).
DKDV_LAUNCH = {(True, (64, 128)): Launch(8, 3), (True, (64, 64)): Launch(4, 3), (True, (32, 64)): Launch(4, 1),
               (False, (64, 64)): Launch(8, 2), (False, (32, 64)): Launch(4, 1)}


def current_capability() -> int:
    """Compute capability (e.g. 90) the default configs are for: the current CUDA device's,
    or sm_90 (what the kernels are designed for) on a machine without one."""
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return 10 * major + minor
    return 90


def default_config(problem, pattern=None, capability: int | None = None) -> KernelConfig:
    """The config used without autotuning, for compute capability ``capability`` (default
    ``current_capability()``): spill-free tiles (``default_tile_tokens``) and 8 warps; the
    backward kernels of 16-bit 32 < head_dim <= 128 problems run one stage (prefetching the
    next query tile is what spills them). The dK/dV kernel of static 16-bit patterns gets
    tiles of its own (``default_dkdv_tile_tokens``), launched as ``DKDV_LAUNCH`` says.

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
    fwd = Launch(8, 2)
    if k == 64:  # 128 x 64 tiles: a third stage fits the registers, and dQ prefetches again
        fwd, bwd = Launch(8, 3), Launch(8, 2)
    capability = current_capability() if capability is None else capability
    for dkdv in default_dkdv_tile_tokens(problem, capability):
        tiles = default_tile(problem, dkdv[0]), default_tile(problem, dkdv[1])
        if pattern is None or not pattern.is_static or group_folds_kept(pattern, problem, *tiles):
            return KernelConfig(q_tile=default_tile(problem, q), k_tile=default_tile(problem, k), fwd=fwd,
                                bwd_dq=bwd, bwd_dkdv=DKDV_LAUNCH[capability >= 90, dkdv],
                                dkdv_q_tile=tiles[0], dkdv_k_tile=tiles[1])
    return KernelConfig(q_tile=default_tile(problem, q), k_tile=default_tile(problem, k), fwd=fwd,
                        bwd_dq=bwd, bwd_dkdv=bwd)
