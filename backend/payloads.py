"""The ops' request payloads (docs/protocol.md, "Ops"), typed: one module for both ends of the wire (the
replies are in replies.py).

Blender-free and torch-free (stdlib + numpy, like wire.py), so the add-on imports it from the copy of backend/
inside the extension and the server from its own package. A request's `to_dict()` is the `params` object sent
(fields left at None are left out: the server's default), `to_arrays()` its arrays; `from_dict(params, arrays)`
checks everything that needs no model (keys, types, ranges, array shapes) and raises errors.InvalidInput naming
the field. What does need the model (head and region names, template vertex ids) is checked by
engine/requests.py. tests/test_payloads.py keeps docs/protocol.md's table in step with these classes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from . import constants, errors, wire
from .capture.media import MAX_FRAMES as MAX_FOOTAGE_FRAMES
from .engine import validate
from .engine.tuning import DEFAULT_RESOLUTION, EXPRESSION_RANGE, FIT_RESOLUTION, FIT_SAMPLES, MAX_DEFORM_POINTS

MIN_RESOLUTION = 16
MAX_STEPS = 5000
CAPTURE_RESOLUTION = 128
UNITS = {"m": 1.0, "cm": 0.01, "mm": 0.001, "in": 0.0254}  # metres per input unit, by name


def doc(text: str, default: Any = None, *, array: str = "") -> Any:
    """A payload field: `text` for docs/protocol.md; `array` (its shape and dtype) marks an array, not a param."""
    return field(default=default, metadata={"doc": text, "array": array})


def required(text: str, *, array: str = "") -> Any:
    return field(metadata={"doc": text, "array": array})


class Payload:
    """Base of every payload dataclass: the wire form of its params and arrays."""

    OP: ClassVar[str] = ""
    # True: keys with no field here pass (a handshake, whose version decides; replies that add statistics)
    OPEN: ClassVar[bool] = False

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in self.fields():
            value = getattr(self, f.name)
            if value is not None and not f.metadata.get("array"):
                out[f.name] = value.tolist() if isinstance(value, np.ndarray) else value
        return out

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in self.fields()
                if f.metadata.get("array") and getattr(self, f.name) is not None}

    @classmethod
    def fields(cls) -> tuple[dataclasses.Field, ...]:
        return dataclasses.fields(cls)  # type: ignore[arg-type]

    @classmethod
    def param_names(cls) -> list[str]:
        return [f.name for f in cls.fields() if not f.metadata.get("array")]

    @classmethod
    def array_names(cls) -> list[str]:
        return [f.name for f in cls.fields() if f.metadata.get("array")]

    @classmethod
    def params_of(cls, params: object) -> dict[str, Any]:
        """`params` as a dict; unless OPEN, an unknown key is refused (the message names the op and the keys)."""
        if cls.OPEN:
            if not isinstance(params, dict):
                raise errors.InvalidInput(f"{cls.OP}: params must be a JSON object")
            return params
        return validate.keys(params, set(cls.param_names()), cls.OP)


# ------------------------------------------------------------------------------------------------ field checks


def check_resolution(value: object) -> int:
    return validate.integer(value, "resolution", MIN_RESOLUTION, constants.MAX_RESOLUTION)


def units_scale(units: object) -> float | None:
    """Metres per input unit, or None for "auto" (scale estimated by the alignment)."""
    if units is None or units == "auto":
        return None
    if isinstance(units, str) and units in UNITS:
        return UNITS[units]
    if isinstance(units, (int, float)) and not isinstance(units, bool) and 1e-6 <= units <= 1e3:
        return float(units)
    raise errors.InvalidInput(f"units must be 'auto', one of {sorted(UNITS)} or metres per unit, got {units!r}")


def head_object(value: object) -> dict[str, Any]:
    """A head's JSON object; its contents are checked against the model (engine/head.py HeadSpec.from_dict)."""
    if not isinstance(value, dict):
        raise errors.InvalidInput("head must be a JSON object")
    return value


def flag(value: object, message: str) -> bool:
    if not isinstance(value, bool):
        raise errors.InvalidInput(message)
    return value


# ------------------------------------------------------------------------------------------------ requests


@dataclass(frozen=True)
class HandshakeRequest(Payload):
    OP = "handshake"
    OPEN = True
    # any JSON value: one other than the server's version is a protocol_mismatch, not an invalid_input
    protocol: Any = doc("protocol version the client speaks", wire.PROTOCOL_VERSION)

    @classmethod
    def from_dict(cls, params: object, arrays: dict | None = None) -> HandshakeRequest:
        return cls(cls.params_of(params).get("protocol"))


@dataclass(frozen=True)
class CancelRequest(Payload):
    OP = "cancel"
    OPEN = True
    target: int = required("id of the request to cancel")

    @classmethod
    def from_dict(cls, params: object, arrays: dict | None = None) -> CancelRequest:
        target = params.get("target") if isinstance(params, dict) else None
        if not wire.is_int(target):
            raise errors.InvalidInput("cancel needs params {\"target\": <request id>}")
        return cls(target)


@dataclass(frozen=True)
class ShutdownRequest(Payload):
    OP = "shutdown"
    OPEN = True

    @classmethod
    def from_dict(cls, params: object, arrays: dict | None = None) -> ShutdownRequest:
        return cls()


@dataclass(frozen=True)
class GenerateRequest(Payload):
    OP = "generate"
    head: dict[str, Any] | None = doc("HeadSpec; absent: a random identity from `seed`")
    seed: int | None = doc("random identity's seed, 0…2⁶³−1 (0)")
    resolution: int | None = doc(f"marching-cubes lattice, {MIN_RESOLUTION}…{constants.MAX_RESOLUTION} "
                                 f"({DEFAULT_RESOLUTION})")

    @classmethod
    def from_dict(cls, params: object, arrays: dict | None = None) -> GenerateRequest:
        p = cls.params_of(params)
        resolution = check_resolution(p.get("resolution", DEFAULT_RESOLUTION))
        head = p.get("head")
        if head is not None:
            return cls(head_object(head), None, resolution)
        return cls(None, validate.seed(p.get("seed", 0)), resolution)


@dataclass(frozen=True)
class EditRequest(Payload):
    OP = "edit"
    head: dict[str, Any] = required("HeadSpec to edit")
    ops: list[dict[str, Any]] = required("edits applied in order: {op: set, blend, swap, randomise, reset or "
                                         "pca, …} (docs/architecture.md)")
    resolution: int | None = doc(f"as generate ({DEFAULT_RESOLUTION})")

    @classmethod
    def from_dict(cls, params: object, arrays: dict | None = None) -> EditRequest:
        p = cls.params_of(params)
        resolution = check_resolution(p.get("resolution", DEFAULT_RESOLUTION))
        head = head_object(p.get("head"))
        ops = p.get("ops")
        if not isinstance(ops, list) or not ops:
            raise errors.InvalidInput("ops must be a non-empty list")
        return cls(head, ops, resolution)


@dataclass(frozen=True)
class DeformRequest(Payload):
    OP = "deform"
    head: dict[str, Any] = required("HeadSpec whose expression space is used (its own expression is ignored)")
    canonical: np.ndarray = required("canonical vertices", array="(N,3) f32")
    expressions: np.ndarray = required("one expression vector per frame, in the handshake's order",
                                       array="(T,53) f32")
    exact_residual: bool | None = doc("evaluate the residual instead of bounding it (false)")

    @classmethod
    def from_dict(cls, params: object, arrays: dict | None = None) -> DeformRequest:
        p, arrays = cls.params_of(params), arrays or {}
        head = head_object(p.get("head"))
        exact = flag(p.get("exact_residual", False), "exact_residual must be true or false")
        canonical = validate.float_array(arrays, "canonical", (None, 3))
        expr = validate.float_array(arrays, "expressions", (None, constants.N_EXPRESSIONS))
        assert canonical is not None and expr is not None  # required arrays
        if expr.min() < EXPRESSION_RANGE[0] or expr.max() > EXPRESSION_RANGE[1]:
            raise errors.InvalidInput(f"expression weights must lie in {list(EXPRESSION_RANGE)}")
        if len(canonical) * len(expr) > MAX_DEFORM_POINTS:
            raise errors.InvalidInput(f"{len(expr)} frames x {len(canonical)} vertices is more than "
                                      f"{MAX_DEFORM_POINTS} points per request; send fewer frames at a time")
        return cls(head, canonical, expr, exact)


@dataclass(frozen=True)
class FitRequest(Payload):
    OP = "fit"
    points: np.ndarray = required("the input's vertices or points, any frame and units", array="(N,3) f32")
    faces: np.ndarray | None = doc("triangles (surface samples instead of points)", array="(F,3) int")
    normals: np.ndarray | None = doc("per-point normals", array="(N,3) f32")
    landmarks: np.ndarray | None = doc("pinned input points, with landmark_vertices or landmark_regions",
                                       array="(L,3) f32")
    units: str | float | None = doc(f"'auto', one of {', '.join(UNITS)}, or metres per unit ('auto')")
    resolution: int | None = doc(f"fitted mesh's lattice ({FIT_RESOLUTION})")
    steps: int | None = doc(f"latent-fit steps, 0…{MAX_STEPS} (per device)")
    batch_points: int | None = doc("points per latent-fit step, 64…65536 (per device)")
    use_normals: bool | None = doc("normal term in the latent fit (per device)")
    fit_expression: bool | None = doc("fit expression weights too (true)")
    landmark_vertices: list[int] | None = doc("template vertex id per landmark")
    landmark_regions: list[str] | None = doc("region name per landmark (its anchor)")
    seed: int | None = doc("sampling and fitting seed (0)")
    samples: int | None = doc(f"input surface samples, 100…200000 ({FIT_SAMPLES})")

    BATCH_POINTS: ClassVar[tuple[int, int]] = (64, 65536)
    SAMPLES: ClassVar[tuple[int, int]] = (100, 200_000)
    MIN_LANDMARKS: ClassVar[int] = 3

    @classmethod
    def from_dict(cls, params: object, arrays: dict | None = None) -> FitRequest:
        """Server defaults that depend on the device (steps, batch_points, use_normals) stay None."""
        p, arrays = cls.params_of(params), arrays or {}
        resolution = check_resolution(p.get("resolution", FIT_RESOLUTION))
        steps = validate.integer(p["steps"], "steps", 0, MAX_STEPS) if "steps" in p else None
        batch = validate.integer(p["batch_points"], "batch_points", *cls.BATCH_POINTS) if "batch_points" in p else None
        samples = validate.integer(p.get("samples", FIT_SAMPLES), "samples", *cls.SAMPLES)
        seed = validate.seed(p.get("seed", 0))
        fit_expression, use_normals = p.get("fit_expression", True), p.get("use_normals", False)
        if not isinstance(fit_expression, bool) or not isinstance(use_normals, bool):
            raise errors.InvalidInput("fit_expression and use_normals must be true or false")
        units = p.get("units", "auto")
        units_scale(units)
        points = validate.float_array(arrays, "points", (None, 3))
        assert points is not None  # a required array
        faces = validate.index_array(arrays, "faces", len(points))
        normals = validate.float_array(arrays, "normals", (len(points), 3), required=False)
        ids, names = p.get("landmark_vertices"), p.get("landmark_regions")
        given = validate.float_array(arrays, "landmarks", (None, 3), required=False)
        if ids is not None or names is not None or given is not None:
            cls.check_landmarks(ids, names, given)
        return cls(points, faces, normals, given, units, resolution, steps, batch, p.get("use_normals"),
                   fit_expression, ids, names, seed, samples)

    @classmethod
    def check_landmarks(cls, ids: object, names: object, given: np.ndarray | None) -> None:
        """The landmark fields' shape; the names and ids are checked against the model by the engine."""
        if (ids is None) == (names is None) or given is None:
            raise errors.InvalidInput("landmarks need the 'landmarks' array and exactly one of "
                                      "'landmark_vertices' (template vertex ids) or 'landmark_regions' (names)")
        if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
            raise errors.InvalidInput("landmark_regions must be a list of region names")
        if ids is not None and not isinstance(ids, list):
            raise errors.InvalidInput("landmark_vertices must be a list of template vertex ids")

    @property
    def fixed_scale(self) -> float | None:
        """Metres per input unit; None: found by the alignment."""
        return units_scale(self.units)


@dataclass(frozen=True)
class FitCaptureRequest(Payload):
    OP = "fit_capture"
    path: str = required("the photo or video file (read-only)")
    resolution: int | None = doc(f"neutral head's lattice ({CAPTURE_RESOLUTION})")
    steps: int | None = doc(f"fit steps, 0…{MAX_STEPS}")
    silhouette: bool | None = doc("use a plain background's silhouette (true)")
    max_frames: int | None = doc(f"frames read, 1…{MAX_FOOTAGE_FRAMES} ({MAX_FOOTAGE_FRAMES})")
    seed: int | None = doc("seed (0)")
    focal_px: float | None = doc("the camera's focal length in pixels (estimated)")

    @classmethod
    def from_dict(cls, params: object, arrays: dict | None = None) -> FitCaptureRequest:
        p = cls.params_of(params)
        if arrays:
            raise errors.InvalidInput("fit_capture takes no arrays (the footage is read from 'path')")
        path = p.get("path")
        if not isinstance(path, str) or not path:
            raise errors.InvalidInput("fit_capture: 'path' must be the footage's file path")
        resolution = check_resolution(p.get("resolution", CAPTURE_RESOLUTION))
        seed = validate.seed(p.get("seed", 0))
        steps = p.get("steps")
        if "steps" in p and (not isinstance(steps, int) or isinstance(steps, bool) or not 0 <= steps <= MAX_STEPS):
            raise errors.InvalidInput(f"fit_capture: 'steps' must be an integer in 0..{MAX_STEPS}")
        silhouette = p.get("silhouette")
        if "silhouette" in p:
            flag(silhouette, "fit_capture: 'silhouette' must be true or false")
        focal = p.get("focal_px")
        focal = None if focal is None else validate.number(focal, "focal_px", 1.0, 1e6)
        max_frames = p.get("max_frames", MAX_FOOTAGE_FRAMES)
        if not isinstance(max_frames, int) or isinstance(max_frames, bool) or not 1 <= max_frames <= MAX_FOOTAGE_FRAMES:
            raise errors.InvalidInput(f"fit_capture: 'max_frames' must be an integer in 1..{MAX_FOOTAGE_FRAMES}")
        return cls(path, resolution, steps, silhouette, max_frames, seed, focal)


REQUESTS: tuple[type[Payload], ...] = (HandshakeRequest, GenerateRequest, EditRequest, DeformRequest, FitRequest,
                                       FitCaptureRequest, CancelRequest, ShutdownRequest)


def is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
