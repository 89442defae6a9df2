"""The engine operations' requests, typed for the engine: each `*Request.parse` reads an op's params and arrays
through backend/payloads.py (types, ranges, shapes) and then checks what needs the model (head, region and
expression names, template vertex ids); every failure is an errors.InvalidInput naming what is wrong."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .. import errors, payloads
from . import validate
from .head import HeadSpec, check_names
from .tuning import FIT_BUDGET, for_device

HeadParser = Callable[[object], HeadSpec]  # Session.parse_head: a head dict, checked against the model's names


@dataclass(frozen=True)
class GenerateRequest:
    head: HeadSpec | None  # None: a random identity from `seed`
    seed: int | None
    resolution: int

    @classmethod
    def parse(cls, params: object, parse_head: HeadParser) -> GenerateRequest:
        p = payloads.GenerateRequest.from_dict(params)
        assert p.resolution is not None  # from_dict fills the default
        return cls(None if p.head is None else parse_head(p.head), p.seed, p.resolution)


@dataclass(frozen=True)
class EditRequest:
    head: HeadSpec
    ops: list[dict]  # checked op by op as edit.apply_ops applies them
    resolution: int

    @classmethod
    def parse(cls, params: object, parse_head: HeadParser) -> EditRequest:
        p = payloads.EditRequest.from_dict(params)
        assert p.resolution is not None  # from_dict fills the default
        return cls(parse_head(p.head), p.ops, p.resolution)


@dataclass(frozen=True)
class DeformRequest:
    head: HeadSpec
    exact_residual: bool
    canonical: np.ndarray  # (N,3) float32
    expressions: np.ndarray  # (T,53) float32

    @classmethod
    def parse(cls, params: object, arrays: dict, parse_head: HeadParser) -> DeformRequest:
        p = payloads.DeformRequest.from_dict(params, arrays)
        return cls(parse_head(p.head), bool(p.exact_residual), p.canonical, p.expressions)


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
        p = payloads.FitRequest.from_dict(params, arrays)
        default_steps, default_batch, default_normals = for_device(FIT_BUDGET, device_type)
        landmarks = None
        if p.landmarks is not None:
            landmarks = model_landmarks(p.landmarks, p.landmark_vertices, p.landmark_regions, region_names,
                                        region_anchors, template_vertices)
        assert p.resolution is not None and p.samples is not None and p.seed is not None  # filled by from_dict
        return cls(p.resolution, default_steps if p.steps is None else p.steps,
                   default_batch if p.batch_points is None else p.batch_points,
                   default_normals if p.use_normals is None else p.use_normals, p.samples, p.seed,
                   bool(p.fit_expression), p.fixed_scale, p.points, p.faces, p.normals, landmarks)


def model_landmarks(given: np.ndarray, ids: list[int] | None, names: list[str] | None, region_names: Sequence[str],
                    region_anchors: np.ndarray, template_vertices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A fit's landmark pairs (input points, model points), both (L,3) float64; payloads.FitRequest has checked
    that exactly one of `ids` and `names` is a list."""
    if names is not None:
        check_names(names, region_names, "region names")
        target = region_anchors[[list(region_names).index(n) for n in names]]
    else:
        assert ids is not None
        ids = [validate.integer(i, "landmark vertex id", 0, len(template_vertices) - 1) for i in ids]
        target = template_vertices[ids]
    if len(target) != len(given) or len(given) < payloads.FitRequest.MIN_LANDMARKS:
        raise errors.InvalidInput(f"need at least {payloads.FitRequest.MIN_LANDMARKS} landmarks and as many ids as "
                                  f"points ({len(target)} ids, {len(given)} points)")
    if np.linalg.matrix_rank(given - given.mean(0), tol=1e-9 * np.abs(given).max()) < 2:
        raise errors.InvalidInput("the landmarks are collinear")
    return given.astype(np.float64), target.astype(np.float64)
