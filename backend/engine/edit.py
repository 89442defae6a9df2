"""Region editing on HeadSpecs. A head's effective code for region j is its override if it has one, else
DecNet(identity)[j]; every edit writes full 32-d overrides, so the identity code itself never changes.

Ops (a list, applied in order; "regions" is a list of region names or the string "all"):
  {"op": "set", "codes": {name: [32 floats]}}
  {"op": "swap", "regions": [...], "other": HeadSpec}           take the other head's effective codes
  {"op": "blend", "regions": [...], "other": HeadSpec, "t": w}  (1 - w) * own + w * other's, w in [0, 1]
  {"op": "randomise", "regions": [...], "seed": n, "scale": s}  mean + s * sum_i std_i * eps_i * dir_i
  {"op": "pca", "region": name, "values": [v_0, ...]}          sliders: set the first len(values)
      coordinates along the region's principal directions, in standard deviations; the others are kept
  {"op": "reset", "regions": [...]}                             drop overrides (back to the identity's codes)
Principal directions (region_dirs, rows) and std (region_std) come from the weights' extras.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from .. import constants, errors
from . import validate
from .head import HeadSpec, check_names, vector

MAX_OPS = 256
MAX_SIGMAS = 5.0  # slider and randomise range, in standard deviations

RegionDecoder = Callable[[np.ndarray], np.ndarray]  # identity (256,) -> region codes (39, 32)


class RegionStats:
    """Per-region code statistics from the weights: mean (39,32), dirs (39,32,32) rows, std (39,32)."""

    def __init__(self, mean: np.ndarray, dirs: np.ndarray, std: np.ndarray):
        self.mean = np.asarray(mean, np.float64)
        self.dirs = np.asarray(dirs, np.float64)
        self.std = np.maximum(np.asarray(std, np.float64), 1e-12)

    def coords(self, region: int, code: np.ndarray) -> np.ndarray:
        """Slider positions (32,) of a code, in standard deviations along the principal directions."""
        return self.dirs[region] @ (np.asarray(code, np.float64) - self.mean[region]) / self.std[region]

    def code(self, region: int, coords: np.ndarray) -> np.ndarray:
        return self.mean[region] + (np.asarray(coords, np.float64) * self.std[region]) @ self.dirs[region]


def effective_codes(head: HeadSpec, decode: RegionDecoder, names: Sequence[str]) -> np.ndarray:
    codes = np.array(decode(head.identity), np.float32, copy=True)
    for name, code in head.region_overrides.items():
        codes[list(names).index(name)] = code
    return codes


def _regions(op: dict, names: Sequence[str]) -> list[str]:
    regions = op.get("regions")
    if regions == "all":
        return list(names)
    if not isinstance(regions, list) or not regions or not all(isinstance(r, str) for r in regions):
        raise errors.InvalidInput(f"{op['op']}: 'regions' must be a non-empty list of region names or \"all\"")
    check_names(regions, names, "region names")
    return regions


def _other(op: dict, parse: Callable[[object], HeadSpec]) -> HeadSpec:
    if "other" not in op:
        raise errors.InvalidInput(f"{op['op']}: 'other' (a head) is required")
    return validate.within(f"{op['op']} 'other'", parse, op["other"])


_ALLOWED = {
    "set": {"codes"},
    "swap": {"regions", "other"},
    "blend": {"regions", "other", "t"},
    "randomise": {"regions", "seed", "scale"},
    "pca": {"region", "values"},
    "reset": {"regions"},
}


def apply_ops(head: HeadSpec, ops: object, decode: RegionDecoder, names: Sequence[str], stats: RegionStats,
              parse: Callable[[object], HeadSpec]) -> HeadSpec:
    """Return a new HeadSpec with `ops` applied (see module doc); `parse` reads 'other' heads."""
    if not isinstance(ops, list) or not ops:
        raise errors.InvalidInput("ops must be a non-empty list")
    if len(ops) > MAX_OPS:
        raise errors.InvalidInput(f"at most {MAX_OPS} ops per edit")
    out = HeadSpec(head.identity.copy(), dict(head.region_overrides), dict(head.expression))
    for i, op in enumerate(ops):
        if not isinstance(op, dict) or not validate.one_of(op.get("op"), _ALLOWED):
            raise errors.InvalidInput(f"ops[{i}] must be an object with 'op' one of {sorted(_ALLOWED)}")
        validate.keys(op, _ALLOWED[op["op"]] | {"op"}, f"ops[{i}] ({op['op']})")
        kind = op["op"]
        own = effective_codes(out, decode, names)
        if kind == "set":
            codes = op.get("codes")
            if not isinstance(codes, dict) or not codes:
                raise errors.InvalidInput("set: 'codes' must map region names to 32-number lists")
            check_names(list(codes), names, "region names")
            for name, value in codes.items():
                out.region_overrides[name] = vector(value, constants.REGION_DIM, f"code for {name!r}")
        elif kind in ("swap", "blend"):
            regions = _regions(op, names)
            other = effective_codes(_other(op, parse), decode, names)
            t = 1.0 if kind == "swap" else validate.number(op.get("t"), "blend t", 0.0, 1.0)
            for name in regions:
                j = list(names).index(name)
                out.region_overrides[name] = ((1 - t) * own[j] + t * other[j]).astype(np.float32)
        elif kind == "randomise":
            regions = _regions(op, names)
            rng = np.random.default_rng(validate.seed(op.get("seed", 0)))
            scale = validate.number(op.get("scale", 1.0), "randomise scale", 0.0, MAX_SIGMAS)
            for name in regions:
                j = list(names).index(name)
                coords = scale * rng.standard_normal(constants.REGION_DIM)
                out.region_overrides[name] = stats.code(j, coords).astype(np.float32)
        elif kind == "pca":
            name = op.get("region")
            if not isinstance(name, str):
                raise errors.InvalidInput("pca: 'region' must be a region name")
            check_names([name], names, "region names")
            values = op.get("values")
            if not isinstance(values, list) or not 1 <= len(values) <= constants.REGION_DIM:
                raise errors.InvalidInput(f"pca: 'values' must be a list of 1..{constants.REGION_DIM} numbers")
            vals = [validate.number(v, f"pca value {n}", -MAX_SIGMAS, MAX_SIGMAS) for n, v in enumerate(values)]
            j = list(names).index(name)
            coords = stats.coords(j, own[j])
            coords[: len(vals)] = vals
            out.region_overrides[name] = stats.code(j, coords).astype(np.float32)
        else:  # reset
            for name in _regions(op, names):
                out.region_overrides.pop(name, None)
    return out
