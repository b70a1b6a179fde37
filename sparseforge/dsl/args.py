"""Argument checking shared by every pattern constructor.

Every error names the argument, the value it got and the rule it broke, so a user
reading one line knows what to change.
"""
from __future__ import annotations

from collections.abc import Sequence

PerDim = int | tuple[int, ...]


def positive_int(name: str, value, *, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``; bools and floats are refused."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def per_dim(name: str, value, *, minimum: int = 1) -> PerDim:
    """An int or a non-empty tuple/list of ints (one per grid dimension), each >= minimum.

    Returned as given (int stays int, list becomes tuple) so ``repr`` shows what the user wrote.
    """
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) == 0:
            raise ValueError(f"{name} must be an int or a non-empty tuple of ints, got {value!r}")
        return tuple(positive_int(f"{name}[{i}]", v, minimum=minimum) for i, v in enumerate(value))
    return positive_int(name, value, minimum=minimum)


def per_dim_bool(name: str, value) -> bool | tuple[bool, ...]:
    """A bool or a non-empty tuple of bools (one per grid dimension)."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) == 0 or not all(isinstance(v, bool) for v in value):
            raise TypeError(f"{name} must be a bool or a non-empty tuple of bools, got {value!r}")
        return tuple(value)
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool or a tuple of bools, got {value!r}")
    return value


def expand(name: str, value, ndim: int) -> tuple:
    """Broadcast an int/bool or check a tuple's rank against a grid of ``ndim`` dimensions."""
    if isinstance(value, tuple):
        if len(value) != ndim:
            raise ValueError(
                f"{name}={value!r} has {len(value)} entries but the grid has {ndim} "
                f"dimension{'s' if ndim != 1 else ''}; give one value per dimension or a single value"
            )
        return value
    return (value,) * ndim


def _pairs(small_name: str, small, big_name: str, big):
    """(dimension, small, big) per dimension where both ranks are known at construction (an
    int broadcasts; two tuples must have the same number of entries), and the number of them."""
    if isinstance(small, tuple) and isinstance(big, tuple) and len(small) != len(big):
        raise ValueError(f"{small_name}={small!r} and {big_name}={big!r} must have the same number of entries")
    n = max(len(small) if isinstance(small, tuple) else 1, len(big) if isinstance(big, tuple) else 1)
    s = small if isinstance(small, tuple) else (small,) * n
    b = big if isinstance(big, tuple) else (big,) * n
    return list(enumerate(zip(s, b))), n


def pairwise_le(small_name: str, small, big_name: str, big) -> None:
    """Check ``small <= big`` per dimension where both ranks are known at construction."""
    pairs, n = _pairs(small_name, small, big_name, big)
    for d, (x, y) in pairs:
        if x > y:
            where = f" in dimension {d}" if n > 1 else ""
            raise ValueError(f"{small_name} must be <= {big_name}{where}, got {small_name}={small!r}, {big_name}={big!r}")


def pairwise_lt(small_name: str, small, big_name: str, big) -> None:
    """Check ``small < big`` per dimension where both are known at construction (0 passes)."""
    if small == 0:
        return
    pairs, n = _pairs(small_name, small, big_name, big)
    for d, (x, y) in pairs:
        if x >= y:
            where = f" in dimension {d}" if n > 1 else ""
            raise ValueError(f"{small_name} must be < {big_name}{where} (0 <= {small_name} < {big_name}), got "
                             f"{small_name}={small!r}, {big_name}={big!r}")
