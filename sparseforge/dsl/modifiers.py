"""Score modifiers: bias terms, logit softcapping and learned sinks, with their exact meaning.

A modifier is a small frozen value that holds its tensors (``tensors()``) and says what a
compile keys on (``spec()``: kind, shapes, dtypes and hyperparameters, never tensor data).
Their meaning, in this order, is the contract every kernel is tested against
(``reference_attention(..., modifiers=...)``):

1. ``s = scale * q.k``: ``scale`` a float or a [H] tensor (per-head scale, Swin V2's logit scale);
2. ``s += bias`` for every bias term, summed in any order:

   - ``RelativePositionBias(table)``: a table per head indexed by the offset between key and
     query in the pattern's own window coordinates (``relative_position_index``);
   - ``T5Bias(table, ...)``: T5's bucketed relative position (1-D);
   - ``ALiBi(slopes)``: ``-slope_h * |k - q|`` (1-D);

3. ``s = cap * tanh(s / cap)`` with ``Softcap(cap)`` (Gemma2);
4. ``s = -inf`` where the pattern (or padding) hides the key;
5. ``p_j = exp(s_j) / (sum_j exp(s_j) + exp(sink_h))`` with ``Sinks(logits)`` (gpt-oss): the
   sink joins the denominator and contributes no value; ``out = sum_j p_j v_j``; the LSE is
   the log of that denominator, sink included (an empty but real row then has LSE = sink
   and outputs zeros).

Positions are those of the sample's own grid (per-sample ``sizes``/``lengths``: the
sample's grid, not the padded tensor's). Gradients reach every modifier tensor.

Relative position tables (``relative_position_bias_shape``): shape ``[H, e_1, ..., e_n]``, one
extent per grid dimension; along dimension ``d`` (``q``, ``k`` the query and key coordinates,
``w`` the window extent, index = key's window coordinate - query's + ``w - 1``):

- Blocks(size, offset): ``w = size``, index ``k - q + size - 1``, extent ``2 size - 1`` (with or
  without offset: the pair shares one window, so ``k - q`` is the offset inside it);
- Grid(size): ``w = size``, index ``k // P - q // P + size - 1`` with ``P = S // size`` (the
  folded position in the partition), extent ``2 size - 1``;
- Neighborhood(kernel_size, dilation, ...): ``w = kernel_size``, index
  ``k // dilation - q // dilation + kernel_size - 1`` (dilated positions; NATTEN's rpb as is),
  extent ``2 kernel_size - 1``;
- Halo(block, halo): ``w = block + 2 halo``, index ``k - q + halo + w - 1`` (the key's position
  in the halo window minus the query's in its block: timm HaloAttn's layout), extent ``2 w - 1``;
- SlidingWindow(left, right): index ``k - q + left``, extent ``left + right + 1`` (the window
  never shifts at borders, so only these offsets occur and the table holds just them).

The offset is **key minus query** (NATTEN, T5, HaloNet). Swin and timm's MaxViT build their
index from query minus key: ``RelativePositionBias.from_swin`` converts their table. A pattern
qualifies when it has one window per query: a windowed family alone, intersected with
window-free patterns (``Blocks(8) & Causal()``: Blocks' coordinates), or a ``PerHead`` whose
heads all qualify with equal table extents (MaxViT's ``PerHead([Blocks(8), Grid(8)])``: each
head measures in its own pattern's coordinates). Unions and window-free patterns (Full,
Causal, Documents, Routed, ...) are refused: a key reached through another part of a union
has no offset in the window's coordinates. For 1-D sequences use ``T5Bias`` or ``ALiBi``.
"""
from __future__ import annotations

import dataclasses
import math
import numbers

import torch

from . import local
from .pattern import Intersection, Pattern, PerHead, Union
from .problem import DTYPE_NAMES, Problem

_WINDOWED = (local.Neighborhood, local.SlidingWindow, local.Halo, local.Blocks, local.Grid)


# ------------------------------------------------------------------------------------
# Argument checks (errors name the argument, the value and what was expected)
# ------------------------------------------------------------------------------------
def _describe(t: torch.Tensor) -> str:
    return f"{DTYPE_NAMES.get(t.dtype, str(t.dtype))} {list(t.shape)} on {t.device}"


def check_float_tensor(name: str, value, *, ndim: int | None = None) -> torch.Tensor:
    """``value`` as a floating tensor (fp16, bf16, fp32 or fp64), optionally of rank ``ndim``."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {value!r} ({type(value).__name__})")
    if value.dtype not in DTYPE_NAMES:
        raise TypeError(f"{name} must have a floating dtype (fp16, bf16, fp32 or fp64), got {value.dtype}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension{'s' if ndim != 1 else ''}, got shape "
                         f"{list(value.shape)}")
    return value


def check_device(name: str, t: torch.Tensor, device) -> None:
    """ValueError unless ``t`` lives on ``device`` (None: no constraint)."""
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name} is on {t.device}, but q is on {device}; expected every tensor on one device")


def check_shape(name: str, t: torch.Tensor, want: tuple[int, ...], what: str) -> None:
    if tuple(t.shape) != tuple(want):
        raise ValueError(f"{name} has shape {list(t.shape)}, expected {list(want)} ({what})")


# ------------------------------------------------------------------------------------
# The modifiers
# ------------------------------------------------------------------------------------
class Modifier:
    """Base of every score modifier (a frozen dataclass; equal only to itself, since it
    holds tensors: compare ``spec()`` for what a compile keys on)."""

    def spec(self) -> tuple:
        """Hashable description: kind, tensor shapes and dtypes, hyperparameters; no data."""
        raise NotImplementedError

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors it holds, in a fixed order (what ``with_tensors`` takes back)."""
        return ()

    def with_tensors(self, *tensors: torch.Tensor) -> "Modifier":
        """The same modifier holding ``tensors`` instead (e.g. cast for a kernel), re-checked."""
        names = [f.name for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), torch.Tensor)]
        if len(tensors) != len(names):
            raise ValueError(f"{type(self).__name__}.with_tensors takes {len(names)} tensor(s) {names}, "
                             f"got {len(tensors)}")
        return dataclasses.replace(self, **dict(zip(names, tensors)))

    def check(self, pattern: Pattern, problem: Problem, *, device=None) -> None:
        """Raise ValueError/TypeError unless this modifier applies to ``pattern`` on ``problem``
        (tensors on ``device`` when given)."""

    @property
    def kind(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            parts.append(f"{f.name}=<{_describe(value)}>" if isinstance(value, torch.Tensor) else f"{f.name}={value!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


def _tensor_spec(name: str, t: torch.Tensor) -> tuple:
    return (name, tuple(t.shape), DTYPE_NAMES[t.dtype])


class BiasModifier(Modifier):
    """A modifier that adds a bias to the scores of allowed pairs (before softcap)."""

    def bias(self, pattern: Pattern, problem: Problem, qi: torch.Tensor, ki: torch.Tensor) -> torch.Tensor:
        """float64 [H, len(qi), len(ki)]: the bias of query ``qi[a]`` and key ``ki[b]`` (flat
        indices into ``problem.grid``). Meaningful at the pairs ``pattern`` allows; finite
        indexing elsewhere (the caller masks those pairs out). Differentiable."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class RelativePositionBias(BiasModifier):
    """A learnable table per head indexed by the per-dimension offset between key and query in
    the pattern's own window coordinates (module docstring: the index and table shape of
    every family; ``relative_position_bias_shape(pattern, problem)`` gives the shape).

    table: float [H, e_1, ..., e_n] (e_d = 2 w_d - 1 for a window of w_d, e.g. [H, 13, 13]
    for a 7x7 window), one extent per grid dimension.
    """

    table: torch.Tensor

    def __post_init__(self):
        t = check_float_tensor("table", self.table)
        if not 2 <= t.dim() <= 4:
            raise ValueError(f"table must have shape [H, e_1, ..., e_n] for a grid of n = 1..3 dimensions, got "
                             f"shape {list(t.shape)}")

    def spec(self):
        return (self.kind, _tensor_spec("table", self.table))

    def tensors(self):
        return (self.table,)

    def check(self, pattern, problem, *, device=None):
        want = relative_position_bias_shape(pattern, problem)
        if tuple(self.table.shape) != want:
            raise ValueError(f"table has shape {list(self.table.shape)}, expected {list(want)} for {pattern!r} "
                             f"on {problem!r} ([heads, 2 w_d - 1 per dimension] for windows of w = "
                             f"{[ (e + 1) // 2 for e in want[1:]]}; see relative_position_bias_shape)")
        check_device("table", self.table, device)

    def bias(self, pattern, problem, qi, ki):
        table = self.table.double()
        idx = relative_position_index(pattern, problem, qi.to(table.device), ki.to(table.device))
        extents = torch.tensor(table.shape[1:], device=idx.device)
        idx = torch.minimum(idx.clamp_min(0), extents - 1)       # hidden pairs: any in-range entry
        heads = problem.heads
        if idx.shape[0] == 1:
            return table[(slice(None),) + tuple(idx[0, ..., d] for d in range(idx.shape[-1]))]
        h = torch.arange(heads, device=idx.device)[:, None, None]
        return table[(h,) + tuple(idx[..., d] for d in range(idx.shape[-1]))]

    @classmethod
    def from_swin(cls, table: torch.Tensor, window_size) -> "RelativePositionBias":
        """From Swin's / Swin V2's / timm MaxViT's layout: ``table`` [prod(2 w_d - 1), H] (their
        ``relative_position_bias_table``; for Swin V2 the MLP's output before ``16 * sigmoid``
        if you apply that yourself), indexed by ``sum_d (q_d - k_d + w_d - 1) * prod(2 w_e - 1
        for e > d)``: query minus key. Ours is key minus query, so the table is reshaped and
        flipped along every window dimension (differentiably: gradients reach ``table``)."""
        check_float_tensor("table", table, ndim=2)
        if isinstance(window_size, int) and not isinstance(window_size, bool):
            # a square window (Swin's int window_size): as many dimensions as the rows say
            e = 2 * window_size - 1
            ndim = next((n for n in (2, 1, 3) if e ** n == table.shape[0]), 2)
            window = (window_size,) * ndim
        else:
            window = tuple(window_size)
        extents = tuple(2 * w - 1 for w in window)
        if not extents or table.shape[0] != math.prod(extents):
            raise ValueError(f"table has {table.shape[0]} rows, expected prod(2 w - 1) = {math.prod(extents)} "
                             f"for window_size={window_size!r}")
        t = table.reshape(*extents, table.shape[1]).permute(len(extents), *range(len(extents)))
        return cls(t.flip(tuple(range(1, len(extents) + 1))))


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class T5Bias(BiasModifier):
    """T5's bucketed relative position bias (1-D): ``table[h, bucket(k - q)]`` with the bucket
    of transformers' ``T5Attention._relative_position_bucket`` (``t5_relative_position_bucket``).

    table: float [H, num_buckets]; num_buckets: default ``table.shape[1]``; max_distance:
    offsets at least this far share the last bucket; bidirectional: T5's encoder (True, half
    the buckets for keys after the query) or decoder (False: keys after the query share bucket 0).
    """

    table: torch.Tensor
    num_buckets: int | None = None
    max_distance: int = 128
    bidirectional: bool = True

    def __post_init__(self):
        check_float_tensor("table", self.table, ndim=2)
        nb = self.table.shape[1] if self.num_buckets is None else self.num_buckets
        if isinstance(nb, bool) or not isinstance(nb, int):
            raise TypeError(f"num_buckets must be an int, got {nb!r} ({type(nb).__name__})")
        if nb != self.table.shape[1]:
            raise ValueError(f"table has shape {list(self.table.shape)}, expected [H, num_buckets={nb}]")
        object.__setattr__(self, "num_buckets", nb)
        if not isinstance(self.bidirectional, bool):
            raise TypeError(f"bidirectional must be a bool, got {self.bidirectional!r}")
        md = self.max_distance
        if isinstance(md, bool) or not isinstance(md, int):
            raise TypeError(f"max_distance must be an int, got {md!r} ({type(md).__name__})")
        exact = (nb // 2 if self.bidirectional else nb) // 2
        if exact < 1:
            raise ValueError(f"num_buckets must be >= {4 if self.bidirectional else 2} "
                             f"(bidirectional={self.bidirectional}), got {nb}")
        if md <= exact:
            raise ValueError(f"max_distance must be > {exact} (the exact buckets, num_buckets={nb}, "
                             f"bidirectional={self.bidirectional}), got {md}")

    def spec(self):
        return (self.kind, _tensor_spec("table", self.table), ("num_buckets", self.num_buckets),
                ("max_distance", self.max_distance), ("bidirectional", self.bidirectional))

    def tensors(self):
        return (self.table,)

    def check(self, pattern, problem, *, device=None):
        _check_1d("T5Bias", problem)
        check_shape("table", self.table, (problem.heads, self.num_buckets), "[heads, num_buckets]")
        check_device("table", self.table, device)

    def bias(self, pattern, problem, qi, ki):
        table = self.table.double()
        rel = ki.to(table.device)[None, :] - qi.to(table.device)[:, None]
        return table[:, t5_relative_position_bucket(rel, self.bidirectional, self.num_buckets, self.max_distance)]


def t5_relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool = True,
                                num_buckets: int = 32, max_distance: int = 128) -> torch.Tensor:
    """T5's bucket of ``relative_position = key - query`` (int tensor), as transformers'
    ``T5Attention._relative_position_bucket`` computes it (float32 logarithm included, so
    the bucket boundaries are the same):

    - bidirectional: half the buckets (``nb // 2``) for keys after the query (offset > 0, bucket
      base ``nb // 2``), half for the rest, by ``|offset|``; else only ``max(-offset, 0)``;
    - in each half of ``n`` buckets, ``n // 2`` exact buckets for distances ``0 .. n//2 - 1``,
      then ``n//2 + int(log(dist / (n//2)) / log(max_distance / (n//2)) * (n - n//2))``,
      at most ``n - 1``.
    """
    rel = relative_position.long()
    base = torch.zeros_like(rel)
    n = num_buckets
    if bidirectional:
        n //= 2
        base = (rel > 0).long() * n
        dist = rel.abs()
    else:
        dist = (-rel).clamp_min(0)
    exact = n // 2
    # float32 like the original (its boundaries); only read where dist >= exact (no log(0))
    ratio = dist.clamp_min(exact).float() / exact
    large = exact + (torch.log(ratio) / math.log(max_distance / exact) * (n - exact)).long()
    large = large.clamp_max(n - 1)
    return base + torch.where(dist < exact, dist, large)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class ALiBi(BiasModifier):
    """ALiBi (Press et al.): ``bias = -slope_h * |k - q|`` on a 1-D sequence.

    slopes: float [H] (the paper's are ``geometric_slopes(H)``). Causal implementations often
    add ``slope_h * (k - q)`` or ``slope_h * k`` (BLOOM) instead: on the pairs a causal mask
    allows (``k <= q``) the first equals ours, and the second differs by ``slope_h * q`` per
    row, which the softmax cancels (the outputs are equal; only that form's LSE is shifted).
    """

    slopes: torch.Tensor

    def __post_init__(self):
        check_float_tensor("slopes", self.slopes, ndim=1)

    def spec(self):
        return (self.kind, _tensor_spec("slopes", self.slopes))

    def tensors(self):
        return (self.slopes,)

    def check(self, pattern, problem, *, device=None):
        _check_1d("ALiBi", problem)
        check_shape("slopes", self.slopes, (problem.heads,), "[heads]")
        check_device("slopes", self.slopes, device)

    def bias(self, pattern, problem, qi, ki):
        s = self.slopes.double()
        dist = (ki.to(s.device)[None, :] - qi.to(s.device)[:, None]).abs().double()
        return -s[:, None, None] * dist[None]

    @staticmethod
    def geometric_slopes(heads: int) -> torch.Tensor:
        """The paper's slopes: ``2^(-8 i / n)`` for i = 1..n when n is a power of 2; else those
        of the largest power of 2 below ``heads`` followed by every other slope of twice it."""
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
            raise ValueError(f"heads must be an int >= 1, got {heads!r}")

        def power_of_2(n):
            return [2.0 ** (-8.0 * i / n) for i in range(1, n + 1)]
        p = 2 ** int(math.floor(math.log2(heads)))
        out = power_of_2(p) + power_of_2(2 * p)[0::2][:heads - p]
        return torch.tensor(out, dtype=torch.float32)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Softcap(Modifier):
    """Logit softcapping (Gemma2): ``s -> cap * tanh(s / cap)``, after the bias terms and
    before the mask. cap: a finite number > 0."""

    cap: float

    def __post_init__(self):
        cap = self.cap
        if isinstance(cap, bool) or not isinstance(cap, numbers.Real):
            raise TypeError(f"cap must be a float > 0, got {cap!r} ({type(cap).__name__})")
        cap = float(cap)
        if not (math.isfinite(cap) and cap > 0):
            raise ValueError(f"cap must be a finite float > 0, got {cap!r}")
        object.__setattr__(self, "cap", cap)

    def spec(self):
        return (self.kind, ("cap", self.cap))


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Sinks(Modifier):
    """Learned attention sinks (gpt-oss): one logit per head that joins the softmax's
    denominator and contributes no value — softmax over ``[scores, sink]``, sink column
    dropped. logits: float [H]."""

    logits: torch.Tensor

    def __post_init__(self):
        check_float_tensor("logits", self.logits, ndim=1)

    def spec(self):
        return (self.kind, _tensor_spec("logits", self.logits))

    def tensors(self):
        return (self.logits,)

    def check(self, pattern, problem, *, device=None):
        check_shape("logits", self.logits, (problem.heads,), "[heads]")
        check_device("logits", self.logits, device)


def _check_1d(name: str, problem: Problem) -> None:
    if problem.ndim != 1:
        raise ValueError(f"{name} is a 1-D relative position bias, but the problem grid is {problem.grid}; "
                         "expected Problem(grid=N) (a token grid of one dimension)")


# ------------------------------------------------------------------------------------
# All modifiers of one call
# ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class Modifiers:
    """The checked modifiers of one call: the bias terms, the softcap and the sinks."""

    biases: tuple[BiasModifier, ...] = ()
    softcap: Softcap | None = None
    sinks: Sinks | None = None

    def __bool__(self):
        return bool(self.biases) or self.softcap is not None or self.sinks is not None

    def spec(self) -> tuple:
        """Hashable: the specs of every modifier in the order given."""
        return tuple(m.spec() for m in (*self.biases, self.softcap, self.sinks) if m is not None)


def check_modifiers(modifiers, pattern: Pattern, problem: Problem, *, device=None) -> Modifiers:
    """``modifiers`` (a tuple or list of modifiers) checked against ``pattern`` on ``problem``
    (tensors on ``device`` when given); at most one Softcap and one Sinks."""
    if isinstance(modifiers, Modifier):
        modifiers = (modifiers,)
    if not isinstance(modifiers, (tuple, list)):
        raise TypeError(f"modifiers must be a tuple of sparseforge modifiers (RelativePositionBias, T5Bias, ALiBi, "
                        f"Softcap, Sinks), got {modifiers!r} ({type(modifiers).__name__})")
    biases, softcap, sinks = [], None, None
    if problem.kv_grid is not None:
        problem = problem.on_key_grid()   # bias terms measure on the key grid (queries placed there)
    for i, m in enumerate(modifiers):
        if not isinstance(m, Modifier):
            raise TypeError(f"modifiers[{i}] must be a sparseforge modifier (RelativePositionBias, T5Bias, ALiBi, "
                            f"Softcap, Sinks), got {m!r} ({type(m).__name__})")
        try:
            m.check(pattern, problem, device=device)
        except (TypeError, ValueError) as e:
            raise type(e)(f"modifiers[{i}] ({m.kind}): {e}") from None
        if isinstance(m, BiasModifier):
            biases.append(m)
        elif isinstance(m, Softcap):
            if softcap is not None:
                raise ValueError(f"modifiers[{i}]: a second Softcap ({m!r} after {softcap!r}); expected at most one")
            softcap = m
        elif isinstance(m, Sinks):
            if sinks is not None:
                raise ValueError(f"modifiers[{i}]: a second Sinks ({m!r}); expected at most one (one logit per head)")
            sinks = m
        else:
            raise TypeError(f"modifiers[{i}]: {type(m).__name__} is not a known kind of modifier")
    return Modifiers(tuple(biases), softcap, sinks)


def check_scale(scale, problem: Problem, *, device=None):
    """``scale``: None, a real number, or a floating [H] tensor (one scale per head)."""
    if scale is None:
        return None
    if isinstance(scale, torch.Tensor):
        check_float_tensor("scale", scale, ndim=1)
        check_shape("scale", scale, (problem.heads,), "[heads]: one scale per query head")
        check_device("scale", scale, device)
        return scale
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float or a [heads] tensor, got {scale!r} ({type(scale).__name__})")
    return float(scale)


# ------------------------------------------------------------------------------------
# Relative positions in the pattern's own window coordinates
# ------------------------------------------------------------------------------------
def _window_leaf(pattern: Pattern, top: Pattern) -> Pattern | None:
    """The windowed leaf that gives ``pattern``'s window coordinates; None when it has none."""
    if isinstance(pattern, _WINDOWED):
        return pattern
    if isinstance(pattern, PerHead):
        raise ValueError(f"RelativePositionBias: {top!r} nests a PerHead inside a combinator; give one "
                         "PerHead at the top with one pattern per head")
    if isinstance(pattern, Union):
        if any(_window_leaf(p, top) is not None for p in pattern.parts):
            raise ValueError(f"RelativePositionBias: {pattern!r} is a union with a windowed part; a key reached "
                             "through another part has no offset in that window's coordinates, so a relative "
                             "position table is undefined (refused). Use one windowed pattern, possibly "
                             "intersected with window-free ones")
        return None
    if isinstance(pattern, Intersection):
        found = {w for w in (_window_leaf(p, top) for p in pattern.parts) if w is not None}
        if len(found) > 1:
            raise ValueError(f"RelativePositionBias: {pattern!r} intersects {len(found)} windowed patterns "
                             f"({', '.join(map(repr, found))}); which window's coordinates to use is ambiguous "
                             "(refused); expected one windowed pattern")
        return found.pop() if found else None
    return None


def _head_leaves(pattern: Pattern, problem: Problem) -> list[Pattern]:
    """One windowed leaf per head (a single entry when every head shares it)."""
    tops = list(pattern.patterns) if isinstance(pattern, PerHead) else [pattern]
    out = []
    for p in tops:
        leaf = _window_leaf(p, pattern)
        if leaf is None:
            raise ValueError(
                f"RelativePositionBias: {p!r} has no window to measure relative positions in; relative position "
                "tables need Neighborhood, Blocks, Grid, Halo or SlidingWindow (alone, intersected with "
                "window-free patterns such as Causal, or one per head in a PerHead); for 1-D sequences use "
                "T5Bias or ALiBi")
        out.append(leaf)
    return out


def _extent_index_1d(leaf: Pattern, length: int, p: dict, q, k):
    """(table extent, index [.., ..]) along one dimension of length ``length``."""
    if isinstance(leaf, local.Blocks):
        return 2 * p["size"] - 1, k - q + p["size"] - 1
    if isinstance(leaf, local.Grid):
        period = length // p["size"]
        return 2 * p["size"] - 1, k // period - q // period + p["size"] - 1
    if isinstance(leaf, local.Neighborhood):
        d = p["dilation"]
        return 2 * p["kernel"] - 1, k // d - q // d + p["kernel"] - 1
    if isinstance(leaf, local.Halo):
        w = p["block"] + 2 * p["halo"]
        return 2 * w - 1, k - q + p["halo"] + w - 1
    if isinstance(leaf, local.SlidingWindow):
        return p["left"] + p["right"] + 1, k - q + p["left"]
    raise TypeError(f"{type(leaf).__name__} has no window coordinates")


def _extents(leaf: Pattern, problem: Problem) -> tuple[int, ...]:
    return tuple(_extent_index_1d(leaf, length, p, 0, 0)[0] for length, p in zip(problem.grid, leaf.params(problem)))


def relative_position_bias_shape(pattern: Pattern, problem: Problem) -> tuple[int, ...]:
    """The shape ``(heads, e_1, ..., e_n)`` of ``RelativePositionBias``'s table for ``pattern``
    on ``problem`` (module docstring: ``e_d = 2 w_d - 1`` for a window of ``w_d``; SlidingWindow
    ``left + right + 1``). ValueError for patterns with no single window per query."""
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a sparseforge Pattern, got {pattern!r} ({type(pattern).__name__})")
    if not isinstance(problem, Problem):
        raise TypeError(f"problem must be a sparseforge Problem, got {problem!r} ({type(problem).__name__})")
    if problem.grid is None:
        raise ValueError("RelativePositionBias needs a token grid: give Problem(grid=...)")
    leaves = _head_leaves(pattern, problem)
    shapes = {_extents(leaf, problem) for leaf in leaves}
    if len(shapes) > 1:
        raise ValueError(f"RelativePositionBias: the heads of {pattern!r} use windows with different table extents "
                         f"{sorted(shapes)}; one table [heads, ...] needs equal extents on every head (refused)")
    return (problem.heads,) + shapes.pop()


def grid_coords(problem: Problem, idx: torch.Tensor) -> list[torch.Tensor]:
    """Grid coordinates of flat row-major token indices ``idx``, one tensor per dimension."""
    out = []
    for d, s in enumerate(problem.grid):
        out.append((idx // math.prod(problem.grid[d + 1:])) % s)
    return out


def relative_position_index(pattern: Pattern, problem: Problem, qi: torch.Tensor, ki: torch.Tensor) -> torch.Tensor:
    """int64 [H or 1, len(qi), len(ki), ndim]: the table index of every (query, key) pair of
    flat indices, per grid dimension (1 leading entry when every head shares the window).
    Exact at the pairs ``pattern`` allows (always inside the table there); unspecified at
    the others."""
    relative_position_bias_shape(pattern, problem)  # refuses patterns without one window
    leaves = _head_leaves(pattern, problem)
    qc, kc = grid_coords(problem, qi), grid_coords(problem, ki)
    per_leaf: dict[Pattern, torch.Tensor] = {}
    for leaf in dict.fromkeys(leaves):
        dims = [_extent_index_1d(leaf, length, p, qd[:, None], kd[None, :])[1]
                for length, p, qd, kd in zip(problem.grid, leaf.params(problem), qc, kc)]
        per_leaf[leaf] = torch.stack(dims, dim=-1)
    if len(per_leaf) == 1:
        out = next(iter(per_leaf.values()))[None]
        return out if len(leaves) == 1 else out.expand(len(leaves), *out.shape[1:])
    return torch.stack([per_leaf[leaf] for leaf in leaves])


def relative_position_flat_index(pattern: Pattern, problem: Problem, q, k) -> list[tuple[tuple[int, ...], object]]:
    """The table index of the pair (query at grid coordinates ``q``, key at ``k``: one entry per
    dimension, ints, tensors or sympy symbols) flattened row-major within one head's table
    ``[e_1, ..., e_n]``, per distinct window: ``[(heads, index), ...]`` with ``heads`` the query
    heads that measure in that window (one entry covering every head unless a PerHead mixes
    windows). What the generated kernels print (``codegen.render``); exact at allowed pairs."""
    extents = relative_position_bias_shape(pattern, problem)[1:]
    leaves = _head_leaves(pattern, problem)
    out = []
    for leaf in dict.fromkeys(leaves):
        flat = 0
        for d, (length, p) in enumerate(zip(problem.grid, leaf.params(problem))):
            flat = flat * extents[d] + _extent_index_1d(leaf, length, p, q[d], k[d])[1]
        per_head = leaves if len(leaves) == problem.heads else leaves * problem.heads
        out.append((tuple(h for h, x in enumerate(per_head) if x == leaf), flat))
    return out


def t5_bucket_steps(bidirectional: bool, num_buckets: int, max_distance: int) -> tuple[int, int, tuple]:
    """T5's bucket as integer steps (no logarithm in a kernel, the float32 boundaries kept):
    ``(half, exact, steps)`` with ``bucket(dist) = min(dist, exact) + sum(jump for t, jump in
    steps if dist >= t)``, ``dist = |k - q|`` (bidirectional, plus ``half`` when k > q) or
    ``max(q - k, 0)``; equal to ``t5_relative_position_bucket`` at every offset."""
    n = num_buckets // 2 if bidirectional else num_buckets
    exact = n // 2
    dist = torch.arange(max_distance + 1)
    bucket = t5_relative_position_bucket(-dist, False, n, max_distance).tolist()  # one half, by distance
    steps = tuple((t, bucket[t] - bucket[t - 1]) for t in range(exact + 1, max_distance + 1)
                  if bucket[t] != bucket[t - 1])
    if any(j < 0 for _, j in steps) or bucket[-1] != n - 1:
        raise AssertionError(f"T5 buckets not monotone up to max_distance={max_distance}: {bucket}")
    return (n if bidirectional else 0), exact, steps


# ------------------------------------------------------------------------------------
# Per-pair lookups (the executors' form of ``bias``) and the flat tensor order of the ops
# ------------------------------------------------------------------------------------
def relative_position_pair_index(pattern: Pattern, problem: Problem, head: torch.Tensor, qi: torch.Tensor,
                                 ki: torch.Tensor) -> torch.Tensor:
    """int64 [..., ndim]: the table index per grid dimension of each (query head, query, key)
    triple, elementwise (``head``, ``qi``, ``ki`` broadcast together; ``qi``/``ki`` flat indices
    into ``problem.grid``) — ``relative_position_index`` pair by pair instead of all pairs of two
    lists. Exact at the pairs ``pattern`` allows; unspecified (possibly outside the table) at
    the others."""
    relative_position_bias_shape(pattern, problem)  # refuses patterns without one window
    leaves = _head_leaves(pattern, problem)
    qc, kc = grid_coords(problem, qi), grid_coords(problem, ki)
    distinct = list(dict.fromkeys(leaves))
    per_leaf = []
    for leaf in distinct:
        dims = [_extent_index_1d(leaf, length, p, qd, kd)[1]
                for length, p, qd, kd in zip(problem.grid, leaf.params(problem), qc, kc)]
        per_leaf.append(torch.stack(torch.broadcast_tensors(head, *dims)[1:], dim=-1))
    out = per_leaf[0]
    if len(distinct) > 1:
        which = torch.tensor([distinct.index(leaf) for leaf in leaves], device=head.device)[head]
        for j in range(1, len(distinct)):
            out = torch.where((which == j)[..., None], per_leaf[j], out)
    return out


def bias_lookup(modifier: BiasModifier, pattern: Pattern, problem: Problem, head: torch.Tensor, qi: torch.Tensor,
                ki: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(index, coef)``: the bias of each (query head, query, key) triple (elementwise, as
    ``relative_position_pair_index``) is ``coef * flat[index]`` with ``flat`` the modifier's
    tensor (``tensors()[0]``) flattened row-major, ``coef`` float64 (None: 1). Its gradient is
    therefore ``coef * dscore`` added at ``index``. Indices are always inside the tensor (a pair
    the pattern hides gets some in-range entry, as ``bias`` does); equal to ``bias`` at the
    pairs the pattern allows (``qi``/``ki`` in ``problem.grid``'s coordinates)."""
    head, qi, ki = torch.broadcast_tensors(head.long(), qi.long(), ki.long())
    if isinstance(modifier, RelativePositionBias):
        extents = modifier.table.shape[1:]
        idx = relative_position_pair_index(pattern, problem, head, qi, ki)
        flat = head.clone()
        for d, e in enumerate(extents):
            flat = flat * e + idx[..., d].clamp(0, e - 1)
        return flat, None
    if isinstance(modifier, T5Bias):
        bucket = t5_relative_position_bucket(ki - qi, modifier.bidirectional, modifier.num_buckets,
                                             modifier.max_distance)
        return head * modifier.num_buckets + bucket, None
    if isinstance(modifier, ALiBi):
        return head, -(ki - qi).abs().double()
    raise TypeError(f"{type(modifier).__name__} has no per-pair lookup")


#: The spec entry of a per-head scale tensor (``modifier_spec``).
HEAD_SCALE_SPEC = ("HeadScale",)


def _as_modifiers(modifiers) -> "Modifiers | None":
    if modifiers is None or isinstance(modifiers, Modifiers):
        return modifiers
    raise TypeError(f"modifiers must be a checked Modifiers (check_modifiers) or None, got {modifiers!r}")


def modifier_spec(modifiers: "Modifiers | None", head_scale: bool) -> tuple:
    """What compiled kernels key on, hashable and free of tensor data: ``()`` when there is
    nothing beyond ``scale * q.k``; else ``Modifiers.spec()`` (one entry per modifier: the bias
    terms in the order given, then Softcap, then Sinks; each ``(kind, *(name, value))`` with
    tensors as ``(name, shape, dtype name)``) followed by ``("HeadScale",)`` when a [H] scale
    tensor replaces the float scale. E.g. ``(("RelativePositionBias", ("table", (8, 13, 13),
    "fp32")), ("Softcap", ("cap", 50.0)), ("Sinks", ("logits", (8,), "fp32")), ("HeadScale",))``."""
    modifiers = _as_modifiers(modifiers)
    if not isinstance(head_scale, bool):
        raise TypeError(f"head_scale must be a bool, got {head_scale!r}")
    spec = () if modifiers is None else modifiers.spec()
    return spec + ((HEAD_SCALE_SPEC,) if head_scale else ())


def modifier_tensors(modifiers: "Modifiers | None", head_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """The tensors of one call in the ops' fixed order (``params``): each bias term's tensors in
    order (RelativePositionBias/T5Bias: the table; ALiBi: the slopes), then the sinks' logits,
    then the per-head scale ``head_scale`` if given. Softcap holds none."""
    modifiers = _as_modifiers(modifiers)
    out: list[torch.Tensor] = []
    if modifiers is not None:
        for m in modifiers.biases:
            out.extend(m.tensors())
        if modifiers.sinks is not None:
            out.extend(modifiers.sinks.tensors())
    if head_scale is not None:
        out.append(head_scale)
    return tuple(out)


def modifier_template(modifiers: "Modifiers | None") -> "Modifiers | None":
    """``modifiers`` holding meta tensors of the same shapes and dtypes (what a kernel registry
    keeps: the structure, no data); None when there are none."""
    modifiers = _as_modifiers(modifiers)
    if not modifiers:
        return None

    def meta(m):
        return m.with_tensors(*(torch.empty(t.shape, dtype=t.dtype, device="meta") for t in m.tensors()))
    return Modifiers(tuple(meta(m) for m in modifiers.biases), modifiers.softcap,
                     None if modifiers.sinks is None else meta(modifiers.sinks))


def modifiers_from_tensors(template: "Modifiers | None", tensors, head_scale: bool
                           ) -> tuple["Modifiers | None", torch.Tensor | None]:
    """The inverse of ``modifier_tensors``: ``(modifiers, head_scale)`` with ``template``'s
    structure (``modifier_template``) holding ``tensors`` (the ops' ``params``)."""
    template = _as_modifiers(template)
    tensors = list(tensors)
    want = len(modifier_tensors(template)) + int(head_scale)
    if len(tensors) != want:
        raise ValueError(f"params holds {len(tensors)} tensor(s), expected {want} for the modifier spec "
                         f"{modifier_spec(template, head_scale)} (dsl.modifiers.modifier_tensors order)")
    scale = tensors.pop() if head_scale else None
    if not template:
        return None, scale
    pos = 0

    def take(m):
        nonlocal pos
        n = len(m.tensors())
        pos += n
        return m.with_tensors(*tensors[pos - n:pos])
    biases = tuple(take(m) for m in template.biases)
    sinks = None if template.sinks is None else take(template.sinks)
    return Modifiers(biases, template.softcap, sinks), scale
