"""HeadSpec: a head as plain data (identity code, region overrides, expression weights), JSON on disk and on
the wire: {"format": "imhead-head/1", "identity": [256], "region_overrides": {name: [32]},
"expression": {ICT name: weight}}. Every field is validated; names are checked against the model's lists."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import constants, errors

FORMAT = "imhead-head/1"


def vector(value: object, size: int, what: str) -> np.ndarray:
    if not isinstance(value, (list, tuple, np.ndarray)):
        raise errors.InvalidInput(f"{what} must be a list of {size} numbers")
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise errors.InvalidInput(f"{what} must be a list of {size} numbers") from exc
    if arr.shape != (size,):
        raise errors.InvalidInput(f"{what} must have {size} numbers, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise errors.InvalidInput(f"{what} contains NaN or Inf")
    return arr.astype(np.float32)


def _weight(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise errors.InvalidInput(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _expression_weight(value: object, what: str) -> float:
    """A finite weight within tuning.EXPRESSION_RANGE, the range deform requests accept."""
    from .tuning import EXPRESSION_RANGE

    w = _weight(value, what)
    if not EXPRESSION_RANGE[0] <= w <= EXPRESSION_RANGE[1]:
        raise errors.InvalidInput(f"{what} must lie in {list(EXPRESSION_RANGE)}, got {value!r}")
    return w


def check_names(names: Sequence[str], known: Sequence[str], what: str) -> None:
    unknown = [n for n in names if n not in known]
    if unknown:
        raise errors.InvalidInput(f"unknown {what} {unknown}; known: {', '.join(known)}")


@dataclass
class HeadSpec:
    identity: np.ndarray  # (256,) float32
    region_overrides: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (32,) float32
    expression: dict[str, float] = field(default_factory=dict)  # ICT expression name -> weight

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "identity": [float(v) for v in self.identity],
            "region_overrides": {k: [float(v) for v in c] for k, c in self.region_overrides.items()},
            "expression": {k: float(v) for k, v in self.expression.items()},
        }

    @classmethod
    def from_dict(cls, data: object, region_names: Sequence[str], expression_names: Sequence[str]) -> "HeadSpec":
        if not isinstance(data, dict):
            raise errors.InvalidInput("head must be a JSON object")
        if data.get("format") != FORMAT:
            raise errors.InvalidInput(f"head format must be {FORMAT!r}, got {data.get('format')!r}")
        extra = set(data) - {"format", "identity", "region_overrides", "expression"}
        if extra:
            raise errors.InvalidInput(f"unknown head fields {sorted(extra)}")
        identity = vector(data.get("identity"), constants.ID_DIM, "head identity")
        overrides = data.get("region_overrides", {})
        expression = data.get("expression", {})
        if not isinstance(overrides, dict) or not isinstance(expression, dict):
            raise errors.InvalidInput("head region_overrides and expression must be JSON objects")
        check_names(list(overrides), region_names, "region names")
        check_names(list(expression), expression_names, "expression names")
        return cls(
            identity=identity,
            region_overrides={k: vector(v, constants.REGION_DIM, f"region code {k!r}") for k, v in overrides.items()},
            expression={k: _expression_weight(v, f"expression weight {k!r}") for k, v in expression.items()},
        )

    def expression_vector(self, expression_names: Sequence[str]) -> np.ndarray:
        out = np.zeros(len(expression_names), np.float32)
        for name, w in self.expression.items():
            out[list(expression_names).index(name)] = w
        return out


def save_head(head: HeadSpec, path: str | Path) -> None:
    Path(path).write_text(json.dumps(head.to_dict(), indent=1) + "\n")


def load_head(path: str | Path, region_names: Sequence[str], expression_names: Sequence[str]) -> HeadSpec:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise errors.InvalidInput(f"cannot read head file {path}: {exc}") from exc
    return HeadSpec.from_dict(data, region_names, expression_names)
