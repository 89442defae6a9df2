"""The ops' reply payloads, typed (docs/protocol.md): the counterpart of backend/payloads.py's requests, shared
the same way (stdlib + numpy). `from_dict(params, arrays)` checks each field's JSON type and raises
errors.InvalidInput naming it; `to_dict()` is the params object the server sends. `markdown_table()` is
docs/protocol.md's table of every op's params and reply (tests/test_payloads.py keeps the two in step)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from . import errors
from .payloads import REQUESTS, Payload, doc, is_required, required

CANCEL_STATES = ("queued", "running", "unknown")
R = TypeVar("R", bound="Reply")
# the Python types a reply field's annotation accepts from JSON (a float may arrive as an int)
JSON_TYPES: dict[str, type | tuple[type, ...]] = {"int": int, "str": str, "bool": bool, "float": (int, float),
                                                  "dict[str, Any]": dict, "list[str]": list,
                                                  "list[dict[str, Any]]": list, "np.ndarray": np.ndarray}
MESH_DOC = "the head's mesh (docs/architecture.md)"


class Reply(Payload):
    """A reply's params (and arrays): `from_dict` checks each field's JSON type; contents are the server's."""

    @classmethod
    def from_dict(cls: type[R], params: object, arrays: dict | None = None) -> R:
        p, arrays = cls.params_of(params), arrays or {}
        values: dict[str, Any] = {}
        for f in cls.fields():
            if f.metadata.get("extra"):  # every key sent, the listed ones included
                values[f.name] = dict(p)
                continue
            value = arrays.get(f.name) if f.metadata.get("array") else p.get(f.name)
            if value is None and not is_required(f):
                values[f.name] = None
                continue
            name = str(f.type).replace(" | None", "")
            want = JSON_TYPES[name]
            if not isinstance(value, want) or (name == "int" and isinstance(value, bool)):
                raise errors.InvalidInput(f"{cls.OP} reply field {f.name!r} must be {name}, got "
                                          f"{type(value).__name__}")
            values[f.name] = value
        return cls(**values)


@dataclass(frozen=True)
class HandshakeReply(Reply):
    OP = "handshake"
    OPEN = True
    protocol: int = required("the server's protocol version")
    backend_version: str = required("the backend's release")
    torch_device: str = required("cpu or cuda…")
    model_name: str = required("the weights' name")
    trained: bool = required("false: the untrained sphere (developer flag)")
    regions: list[dict[str, Any]] = required("[{id, name, mirror}] for the 39 regions")
    expressions: list[str] = required("the 53 ICT expression names, the order of (T,53) arrays")
    info: dict[str, Any] = field(default_factory=dict, compare=False, metadata={"doc": "", "extra": True})

    def to_dict(self) -> dict[str, Any]:
        return {**self.info, **{k: v for k, v in super().to_dict().items() if k != "info"}}


@dataclass(frozen=True)
class HeadReply(Reply):
    """generate's and edit's reply; fit's and fit_capture's extend it."""

    OP = "generate"
    OPEN = True  # the subclasses' keys
    head: dict[str, Any] = required("the HeadSpec made")
    stats: dict[str, Any] = required("extraction, attribute and opening measurements")
    vertices: np.ndarray = required("posed by the head's expression", array="(N,3) f32")
    faces: np.ndarray = required(MESH_DOC, array="(F,3) i32")
    canonical: np.ndarray = required("neutral positions", array="(N,3) f32")
    template: np.ndarray = required("template-space positions", array="(N,3) f32")
    region: np.ndarray = required("region per vertex", array="(N,) i32")
    normals: np.ndarray = required(MESH_DOC, array="(N,3) f32")
    uv: np.ndarray = required("ICT layout", array="(N,2) f32")
    sliders: dict[str, Any] | None = doc("the region sliders' positions (generate, edit)")


@dataclass(frozen=True)
class FitReply(HeadReply):
    OP = "fit"
    error: dict[str, Any] | None = doc("fit error: trimmed one-sided Chamfer distance, mm and input units")
    transform: dict[str, Any] | None = doc("{scale, rotation, translation}: x_model = s R x_input + t")
    alignment: dict[str, Any] | None = doc("the alignment's score, coverage and inliers (near the mean head, then "
                                           "near the fitted head), and the pose_refinement {rotation_deg, "
                                           "centroid_shift_m} the latent fit made")
    fit: dict[str, Any] | None = doc("{steps (per round), rounds, batch_points, normals, final_loss}")


@dataclass(frozen=True)
class FitCaptureReply(HeadReply):
    """The neutral head's mesh, and per frame the expression weights, head pose and landmarks."""

    OP = "fit_capture"
    capture: dict[str, Any] | None = doc("{frames, fps, width, height, focal_px, faces_found, landmark_error_px, "
                                         "silhouette, silhouette_iou, outline_error_px, fit_seconds}")
    expressions: np.ndarray | None = doc("weights per frame", array="(T,53) f32")
    rotations: np.ndarray | None = doc("x_cam = R x + t", array="(T,3,3) f32")
    translations: np.ndarray | None = doc("metres", array="(T,3) f32")
    landmarks: np.ndarray | None = doc("found landmarks, pixels", array="(T,52,2) f32")
    fitted_landmarks: np.ndarray | None = doc("the fit's landmarks, pixels", array="(T,52,2) f32")
    found: np.ndarray | None = doc("1 where a face was found", array="(T,) u1")


@dataclass(frozen=True)
class DeformReply(Reply):
    OP = "deform"
    OPEN = True  # solver measurements
    non_converged: int = required("vertex-frames the root finder left unsolved")
    residual_p99_m: float = required("p99 of the residual (posed-space SDF magnitude)")
    vertices: np.ndarray = required("posed vertices per frame", array="(T,N,3) f32")
    residual: np.ndarray = required("posed-space SDF magnitude per vertex-frame", array="(T,N) f32")
    converged: np.ndarray = required("1 where solved", array="(T,N) u1")


@dataclass(frozen=True)
class CancelReply(Reply):
    OP = "cancel"
    target: int = required("the cancelled request's id")
    state: str = required(" / ".join(CANCEL_STATES) + " (unknown: already answered)")


REPLIES: dict[str, type[Reply]] = {"handshake": HandshakeReply, "generate": HeadReply, "edit": HeadReply,
                                   "deform": DeformReply, "fit": FitReply, "fit_capture": FitCaptureReply,
                                   "cancel": CancelReply}




def markdown_table() -> str:
    """docs/protocol.md's table: each typed request's params and arrays, and its reply's."""
    rows = ["| op | params (default) | arrays in | reply params | reply arrays |", "|---|---|---|---|---|"]
    for cls in REQUESTS:
        reply = REPLIES.get(cls.OP)
        rows.append(f"| `{cls.OP}` | {_params(cls)} | {_arrays(cls)} | {_params(reply) if reply else '—'} | "
                    f"{_arrays(reply) if reply else '—'} |")
    return "\n".join(rows) + "\n"


def _params(cls: type[Payload]) -> str:
    return "; ".join(f"`{f.name}`{'' if is_required(f) else '?'}: {f.metadata['doc']}"
                     for f in cls.fields() if not f.metadata.get("array") and f.metadata.get("doc")) or "—"


def _arrays(cls: type[Payload]) -> str:
    return "; ".join(f"`{f.name}`{'' if is_required(f) else '?'} {f.metadata['array']}: {f.metadata['doc']}"
                     for f in cls.fields() if f.metadata.get("array")) or "—"
