"""The memory budget: estimate what a step would allocate, and refuse up front, with one
clear error, what would not fit, instead of allocating it (or being killed half-way).

The budget is ``$SPARSEFORGE_MEMORY_BUDGET`` (a size such as ``32GiB``, or ``unlimited``),
by default ``DEFAULT_FRACTION`` of this machine's RAM (``FALLBACK_BYTES`` where the RAM
cannot be read). Estimates are upper bounds of the CPU implementations' peak, built from
the per-element figures below (measured with ``ru_maxrss``); ``lower.budget`` estimates
the tile schedule the same way.
"""
from __future__ import annotations

import math
import os

from .. import envvars

#: Share of the machine's RAM one step may take when ``SPARSEFORGE_MEMORY_BUDGET`` is unset.
DEFAULT_FRACTION = 0.75
#: The budget where the RAM cannot be read.
FALLBACK_BYTES = 16 << 30
#: Peak bytes per mask entry evaluated at once: the bool mask plus the int64 coordinate
#: temporaries a family's ``mask`` computes (measured 1.2 for Full, 4.6 Neighborhood,
#: 12 SlidingWindow on a 2-D grid, 18 StridedShards).
MASK_ELEMENT_BYTES = 24
#: Bytes per (query region, key region) pair of a ``Routed`` layout: the float64 affinity,
#: its top-k and the bool layout.
ROUTING_PAIR_BYTES = 24
#: Bytes per head of the Python objects a mask or a statistic keeps per head.
PER_HEAD_BYTES = 2048


class MemoryBudgetError(ValueError):
    """A step would need more memory than the budget; the message says how much and why."""


def physical_memory() -> int | None:
    """This machine's RAM in bytes, or None where it cannot be read."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def budget() -> tuple[int | None, str]:
    """(the budget in bytes, None for unlimited; where it comes from, for messages)."""
    set_to = envvars.memory_budget()
    if set_to is not None:
        name = envvars.MEMORY_BUDGET.name
        return (None if set_to < 0 else set_to), f"{name}={os.environ[name].strip()}"
    ram = physical_memory()
    hint = f"set {envvars.MEMORY_BUDGET.name} to change it"
    if ram is None:
        return FALLBACK_BYTES, f"the default; {hint}"
    return int(ram * DEFAULT_FRACTION), f"{DEFAULT_FRACTION:.0%} of this machine's {format_bytes(ram)} of RAM; {hint}"


def format_bytes(n: float) -> str:
    """``80.0 GiB``, ``512 B``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def check(what: str, need: int, why: str, advice: str) -> None:
    """Raise ``MemoryBudgetError`` if ``need`` bytes exceed the budget: '<what> would need
    about <need> (<why>), more than the memory budget of <budget> (<source>); <advice>'."""
    limit, source = budget()
    if limit is not None and need > limit:
        raise MemoryBudgetError(f"{what} would need about {format_bytes(need)} ({why}), more than the memory "
                                f"budget of {format_bytes(limit)} ({source}); {advice}")


# -- estimates of the exact semantics (dsl.semantics) -----------------------------------
def routing_bytes(pattern, problem, batch: int = 1) -> int:
    """Bytes of the region layouts of every ``Routed`` in ``pattern`` (R x R regions, per head
    with ``per_head``, else shared by the heads)."""
    from .args import expand
    from .content import Routed

    total = 0
    for leaf in pattern.walk():
        if isinstance(leaf, Routed) and problem.grid is not None:
            try:
                region = expand("region_size", leaf.region_size, problem.ndim)
            except (TypeError, ValueError):
                continue  # the pattern's own check reports it
            regions = math.prod(-(-s // r) for s, r in zip(problem.grid, region))
            heads = problem.heads if leaf.per_head else 1
            total += batch * heads * regions * regions * ROUTING_PAIR_BYTES
    return total


def mask_rows_bytes(heads: int, tokens: int, batch: int, chunk_elements: int, queries: int | None = None) -> int:
    """Peak bytes of evaluating the mask a chunk of query rows at a time: at least one row of
    every head and batch element, else ``chunk_elements`` entries (at most the whole mask).
    ``tokens``: the keys (a row's length); ``queries``: the rows (default ``tokens``)."""
    row = batch * heads * tokens
    rows = tokens if queries is None else queries
    return min(max(chunk_elements, row), row * rows) * MASK_ELEMENT_BYTES + 8 * tokens + heads * PER_HEAD_BYTES


def _keys(ctx) -> int:
    """Nk of a mask context (``MaskContext.keys``)."""
    return getattr(ctx, "keys", ctx.tokens)


def mask_batch(pattern, ctx) -> int:
    """Batch elements a mask has: those of the routing (q or routes) or of the group ids, else 1."""
    needs = pattern.inputs_needed()
    source = None
    if "qk" in needs:
        source = ctx.routes if ctx.routes is not None else ctx.q
    elif "groups" in needs:
        source = ctx.groups
    shape = getattr(source, "shape", None)  # routes are checked when the mask reads them
    return int(shape[0]) if shape is not None and len(shape) >= 3 else 1


def _shape(pattern, ctx, batch: int) -> str:
    heads = ctx.problem.heads
    return (f"{heads} head{'s' if heads != 1 else ''} x {ctx.tokens} queries x {_keys(ctx)} keys"
            + (f" x batch {batch}" if batch > 1 else ""))


def check_mask_rows(what: str, pattern, ctx, chunk_elements: int) -> None:
    """The check of a computation that evaluates the mask a chunk of query rows at a time
    (``describe``, the reference): at least one row of every head at once."""
    batch = mask_batch(pattern, ctx)
    rows = mask_rows_bytes(ctx.problem.heads, _keys(ctx), batch, chunk_elements, ctx.tokens)
    routing = routing_bytes(pattern, ctx.problem, batch)
    row = batch * ctx.problem.heads * _keys(ctx)
    entries = min(max(chunk_elements, row), row * ctx.tokens)
    why = f"{_shape(pattern, ctx, batch)}, evaluated {entries} mask entries at a time (at least one query row " \
          f"of every head) at {MASK_ELEMENT_BYTES} bytes each" + \
          (f", plus {format_bytes(routing)} of routing" if routing else "")
    check(what, rows + routing, why, "use a smaller grid")


def check_dense_mask(pattern, ctx, chunk_elements: int) -> None:
    """The check of ``dense_mask``: the whole bool mask [B, H, N, N] plus the rows being
    evaluated. A mask that is the same for every head (or batch element) is stored once."""
    from .pattern import as_4d

    batch, heads = mask_batch(pattern, ctx), ctx.problem.heads
    if pattern.is_static:  # probe one entry for the heads the mask really has
        heads = as_4d(pattern.mask(ctx, _first(ctx), _first(ctx))).shape[1]
    rows = mask_rows_bytes(ctx.problem.heads, _keys(ctx), batch, chunk_elements, ctx.tokens)
    routing = routing_bytes(pattern, ctx.problem, batch)
    kept = batch * heads * ctx.tokens * _keys(ctx)
    why = f"a bool mask of {_shape(pattern, ctx, batch)} ({format_bytes(kept)}), plus {format_bytes(rows)} " \
          f"to evaluate it" + (f" and {format_bytes(routing)} of routing" if routing else "")
    check("dense_mask", kept + rows + routing, why, "use a smaller grid, or describe() for statistics")


def _first(ctx):
    import torch

    return torch.arange(min(1, ctx.tokens))
