"""The engine operations' requests, validated: each `*Request.parse` checks an op's params and arrays (every
failure an errors.InvalidInput naming what is wrong) and returns what the operation needs, typed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .. import constants, errors
from . import validate
from .extract import check_resolution
from .head import HeadSpec, check_names
from .tuning import (DEFAULT_RESOLUTION, EXPRESSION_RANGE, FIT_BUDGET, FIT_RESOLUTION, FIT_SAMPLES,
                     MAX_DEFORM_POINTS, for_device)

HeadParser = Callable[[object], HeadSpec]  # Session.parse_head: a head dict, checked against the model's names
MAX_FIT_STEPS = 5000
FIT_BATCH_POINTS = (64, 65536)
FIT_SAMPLES_RANGE = (100, 200_000)
MIN_LANDMARKS = 3


@dataclass(frozen=True)
class GenerateRequest:
    head: HeadSpec | None  # None: a random identity from `seed`
    seed: int | None
    resolution: int

    @classmethod
    def parse(cls, params: object, parse_head: HeadParser) -> GenerateRequest:
        params = validate.keys(params, {"head", "seed", "resolution"}, "generate")
        resolution = check_resolution(params.get("resolution", DEFAULT_RESOLUTION))
        if params.get("head") is not None:
            return cls(parse_head(params["head"]), None, resolution)
        return cls(None, validate.seed(params.get("seed", 0)), resolution)


@dataclass(frozen=True)
class EditRequest:
    head: HeadSpec
    ops: object  # checked op by op as edit.apply_ops applies them
    resolution: int

    @classmethod
    def parse(cls, params: object, parse_head: HeadParser) -> EditRequest:
        params = validate.keys(params, {"head", "ops", "resolution"}, "edit")
        resolution = check_resolution(params.get("resolution", DEFAULT_RESOLUTION))
        return cls(parse_head(params.get("head")), params.get("ops"), resolution)


@dataclass(frozen=True)
class DeformRequest:
    head: HeadSpec
    exact_residual: bool
    canonical: np.ndarray  # (N,3) float32
    expressions: np.ndarray  # (T,53) float32

    @classmethod
    def parse(cls, params: object, arrays: dict, parse_head: HeadParser) -> DeformRequest:
        params = validate.keys(params, {"head", "exact_residual"}, "deform")
        head = parse_head(params.get("head"))
        exact = params.get("exact_residual", False)
        if not isinstance(exact, bool):
            raise errors.InvalidInput("exact_residual must be true or false")
        canonical = validate.float_array(arrays, "canonical", (None, 3))
        expr = validate.float_array(arrays, "expressions", (None, constants.N_EXPRESSIONS))
        if expr.min() < EXPRESSION_RANGE[0] or expr.max() > EXPRESSION_RANGE[1]:
            raise errors.InvalidInput(f"expression weights must lie in {list(EXPRESSION_RANGE)}")
        if len(canonical) * len(expr) > MAX_DEFORM_POINTS:
            raise errors.InvalidInput(f"{len(expr)} frames x {len(canonical)} vertices is more than "
                                      f"{MAX_DEFORM_POINTS} points per request; send fewer frames at a time")
        return cls(head, exact, canonical, expr)


@dataclass(frozen=True)
class FitRequest:
    resolution: int
    steps: int
    batch_points: int
    use_normals: bool
    samples: int
    seed: int
    fit_expression: bool
    fixed_scale: float | None  # input units in metres; None: found by the alignment
    points: np.ndarray  # (N,3) float32
    faces: np.ndarray | None  # (F,3) int64
    normals: np.ndarray | None  # (N,3) float32
    landmarks: tuple[np.ndarray, np.ndarray] | None  # (input points, model points), float64

    @classmethod
    def parse(cls, params: object, arrays: dict, device_type: str, region_names: Sequence[str],
              region_anchors: np.ndarray, template_vertices: np.ndarray) -> FitRequest:
        from .fit import units_scale  # fit loads scipy: imported where fitting needs it, not by the handshake

        params = validate.keys(params, {"units", "resolution", "steps", "batch_points", "use_normals",
                                        "fit_expression", "landmark_vertices", "landmark_regions", "seed",
                                        "samples"}, "fit")
        resolution = check_resolution(params.get("resolution", FIT_RESOLUTION))
        default_steps, default_batch, default_normals = for_device(FIT_BUDGET, device_type)
        steps = validate.integer(params.get("steps", default_steps), "steps", 0, MAX_FIT_STEPS)
        batch_points = validate.integer(params.get("batch_points", default_batch), "batch_points", *FIT_BATCH_POINTS)
        use_normals = params.get("use_normals", default_normals)
        samples = validate.integer(params.get("samples", FIT_SAMPLES), "samples", *FIT_SAMPLES_RANGE)
        seed = validate.seed(params.get("seed", 0))
        fit_expression = params.get("fit_expression", True)
        if not isinstance(fit_expression, bool) or not isinstance(use_normals, bool):
            raise errors.InvalidInput("fit_expression and use_normals must be true or false")
        fixed_scale = units_scale(params.get("units", "auto"))
        points = validate.float_array(arrays, "points", (None, 3))
        faces = validate.index_array(arrays, "faces", len(points))
        normals = validate.float_array(arrays, "normals", (len(points), 3), required=False)
        landmarks = parse_landmarks(params, arrays, region_names, region_anchors, template_vertices)
        return cls(resolution, steps, batch_points, use_normals, samples, seed, fit_expression, fixed_scale, points,
                   faces, normals, landmarks)


def parse_landmarks(params: dict, arrays: dict, region_names: Sequence[str], region_anchors: np.ndarray,
                    template_vertices: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """A fit's landmark pairs (input points, model points), both (L,3) float64, or None when none are given."""
    ids, names = params.get("landmark_vertices"), params.get("landmark_regions")
    given = validate.float_array(arrays, "landmarks", (None, 3), required=False)
    if ids is None and names is None and given is None:
        return None
    if (ids is None) == (names is None) or given is None:
        raise errors.InvalidInput("landmarks need the 'landmarks' array and exactly one of "
                                  "'landmark_vertices' (template vertex ids) or 'landmark_regions' (names)")
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise errors.InvalidInput("landmark_regions must be a list of region names")
        check_names(names, region_names, "region names")
        target = region_anchors[[list(region_names).index(n) for n in names]]
    else:
        if not isinstance(ids, list):
            raise errors.InvalidInput("landmark_vertices must be a list of template vertex ids")
        ids = [validate.integer(i, "landmark vertex id", 0, len(template_vertices) - 1) for i in ids]
        target = template_vertices[ids]
    if len(target) != len(given) or len(given) < MIN_LANDMARKS:
        raise errors.InvalidInput(f"need at least {MIN_LANDMARKS} landmarks and as many ids as points "
                                  f"({len(target)} ids, {len(given)} points)")
    if np.linalg.matrix_rank(given - given.mean(0), tol=1e-9 * np.abs(given).max()) < 2:
        raise errors.InvalidInput("the landmarks are collinear")
    return given.astype(np.float64), target.astype(np.float64)
