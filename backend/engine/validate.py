"""Input checks for the engine's boundary: every failure is an errors.InvalidInput naming what is wrong."""

from __future__ import annotations

from typing import Callable, Iterable, Literal, TypeVar, overload

import numpy as np

from .. import constants, errors


T = TypeVar("T")


def one_of(value: object, allowed: Iterable[str]) -> bool:
    """`value in allowed` for any JSON value (a list or object is not hashable, and is never allowed)."""
    return isinstance(value, str) and value in allowed


def within(field: str, parse: Callable[[object], T], value: object) -> T:
    """parse(value), with an InvalidInput's message prefixed by the field it came from."""
    try:
        return parse(value)
    except errors.InvalidInput as exc:
        raise errors.InvalidInput(f"{field}: {exc}") from None


def keys(params: object, allowed: Iterable[str], op: str) -> dict:
    if not isinstance(params, dict):
        raise errors.InvalidInput(f"{op}: params must be a JSON object")
    unknown = set(params) - set(allowed)
    if unknown:
        raise errors.InvalidInput(f"{op}: unknown parameters {sorted(unknown)}; allowed: {sorted(allowed)}")
    return params


def integer(value: object, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise errors.InvalidInput(f"{what} must be an integer, got {value!r}")
    if not lo <= int(value) <= hi:
        raise errors.InvalidInput(f"{what} must be between {lo} and {hi}, got {int(value)}")
    return int(value)


def seed(value: object) -> int:
    return integer(value, "seed", 0, 2**63 - 1)


def number(value: object, what: str, lo: float = -np.inf, hi: float = np.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise errors.InvalidInput(f"{what} must be a number, got {value!r}")
    v = float(value)
    if not np.isfinite(v) or not lo <= v <= hi:
        raise errors.InvalidInput(f"{what} must be a finite number in [{lo}, {hi}], got {value!r}")
    return v


@overload
def float_array(arrays: dict, name: str, shape: tuple, max_rows: int = ...,
                required: Literal[True] = ...) -> np.ndarray: ...


@overload
def float_array(arrays: dict, name: str, shape: tuple, max_rows: int = ...,
                required: bool = ...) -> np.ndarray | None: ...


def float_array(arrays: dict, name: str, shape: tuple, max_rows: int = constants.MAX_POINTS,
                required: bool = True) -> np.ndarray | None:
    """A finite float array of `shape` (None = any length, the first axis at most max_rows, at least 1)."""
    if name not in arrays or arrays[name] is None:
        if required:
            raise errors.InvalidInput(f"missing array {name!r}")
        return None
    a = arrays[name]
    if not isinstance(a, np.ndarray) or a.dtype.kind != "f":
        raise errors.InvalidInput(f"array {name!r} must be a float array, got "
                                  f"{getattr(a, 'dtype', type(a).__name__)}")
    if a.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, a.shape)):
        want = "(" + ", ".join("N" if s is None else str(s) for s in shape) + ")"
        raise errors.InvalidInput(f"array {name!r} must have shape {want}, got {a.shape}")
    if a.shape[0] == 0:
        raise errors.InvalidInput(f"array {name!r} is empty")
    if a.shape[0] > max_rows:
        raise errors.InvalidInput(f"array {name!r} has {a.shape[0]} rows, more than the limit {max_rows}")
    if not np.isfinite(a).all():
        raise errors.InvalidInput(f"array {name!r} contains NaN or Inf")
    return np.ascontiguousarray(a, dtype=np.float32)


def index_array(arrays: dict, name: str, n_vertices: int, width: int = 3, required: bool = False) -> np.ndarray | None:
    if name not in arrays or arrays[name] is None:
        if required:
            raise errors.InvalidInput(f"missing array {name!r}")
        return None
    a = arrays[name]
    if not isinstance(a, np.ndarray) or a.dtype.kind not in "iu":
        raise errors.InvalidInput(f"array {name!r} must be an integer array")
    if a.ndim != 2 or a.shape[1] != width or a.shape[0] == 0:
        raise errors.InvalidInput(f"array {name!r} must have shape (F, {width}) with F >= 1, got {a.shape}")
    if a.min() < 0 or a.max() >= n_vertices:
        raise errors.InvalidInput(f"array {name!r} indexes outside the {n_vertices} vertices")
    return a.astype(np.int64)
