"""Build weights/face_parts.safetensors (eyes, teeth, gums, tongue) from the ICT-FaceKit model. Build time only.

    .venv/bin/python tools/build_face_parts.py ../shared/data/ict-facekit/FaceXModel.tar.xz

The add-on places these parts on every generated head through the template correspondence (each vertex's
position on the mean ICT neutral head, which is exactly the frame these arrays are in). Everything is in the
backend's frame: metres, +Y up, face toward +Z. ICT-FaceKit is MIT-licensed; its notice is in
weights/MODEL_CARD.md.

Arrays written:
  <part>_vertices (V,3) f32, <part>_faces (F,3) i32 for part in upper_teeth, lower_teeth, upper_gums,
      lower_gums_tongue (ICT "Teeth" and "Gums and tongue" meshes, the latter split by what jawOpen moves;
      quads split into triangles)
  eye_left_vertices/faces, eye_right_...: the ICT scleras (left = the subject's left, +x); eye_centre (2,3) and
      eye_radius (2,): spheres fitted to them (the gaze pivot; the ICT eyes look along +Z at rest)
  lower_teeth_deltas (K,V,3), lower_gums_tongue_deltas (K,V,3): ICT's displacement of those vertices by each
      of the K expressions that move the jaw (names in the metadata's "jaw_expressions")
  mouth_centre (3,): the middle of the teeth, where the mouth parts' placement window is centred
  lip_contour (12,3): the outer lip contour (Multi-PIE 68 landmarks 49-60 on the ICT mesh)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from typing import Any
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from backend.data.ict import CM_TO_M, MULTIPIE68, _parse_obj, _Source  # noqa: E402

GUMS_TONGUE = (14062, 17039, 14034, 17006)      # vertex range, polygon range (ICT README, half-open)
TEETH = (17039, 21451, 17006, 21496)
LOWER_TEETH_FROM = 19247                         # "3rd Molar lower left": the lower set starts here
SCLERA = ((21451, 22221, 21496, 22296), (23021, 23791, 23094, 23894))   # left (+x), right: vertices, polygons
JAW_MIN_MOTION = 0.5                             # fraction of the lower teeth's own displacement
JAW_MIN_DELTA_M = 0.001


def triangles(polys: list[list[int]], lo: int) -> np.ndarray:
    out = [[p[0] - lo, p[i] - lo, p[i + 1] - lo] for p in polys for i in range(1, len(p) - 1)]
    return np.asarray(out, np.int32)


def compact(vertices: np.ndarray, faces: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The sub-mesh of the vertices where `keep` holds (faces wholly inside it)."""
    return compact_faces(vertices, faces[keep[faces].all(1)])


def compact_faces(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The sub-mesh made of `faces` and the vertices they use."""
    used = np.unique(faces)
    index = np.full(len(vertices), -1, np.int64)
    index[used] = np.arange(len(used))
    return vertices[used].astype(np.float32), index[faces].astype(np.int32)


def fit_sphere(p: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares sphere: |p|^2 = 2 c.p + (r^2 - |c|^2)."""
    a = np.c_[2 * p, np.ones(len(p))]
    sol, *_ = np.linalg.lstsq(a, (p ** 2).sum(1), rcond=None)
    centre = sol[:3]
    return centre, float(np.sqrt(sol[3] + centre @ centre))


def build(source: Path) -> dict[str, np.ndarray]:
    src = _Source(source)
    neutral_cm, _uv, fv, _ft, _ = _parse_obj(src.read("generic_neutral_mesh.obj"), True)
    jaw_cm, *_ = _parse_obj(src.read("jawOpen.obj"), False)
    assert fv is not None
    neutral, jaw = neutral_cm * CM_TO_M, jaw_cm * CM_TO_M
    out: dict[str, Any] = {}  # arrays, and the jaw expressions' names

    vlo, vhi, plo, phi = TEETH
    tf = triangles(fv[plo:phi], vlo)
    lower = np.arange(vlo, vhi) >= LOWER_TEETH_FROM
    for name, keep in (("upper_teeth", ~lower), ("lower_teeth", lower)):
        out[f"{name}_vertices"], out[f"{name}_faces"] = compact(neutral[vlo:vhi], tf, keep)
    teeth_centre = neutral[vlo:vhi].mean(0)
    out["mouth_centre"] = teeth_centre.astype(np.float32)

    # Gums and tongue are one connected ICT mesh: the faces that move with the lower teeth under jawOpen
    # (most of their corners moving at least half as far) are the lower gums and tongue, the rest the upper gums.
    glo, ghi, gplo, gphi = GUMS_TONGUE
    gf = triangles(fv[gplo:gphi], glo)
    gv = neutral[glo:ghi]
    lower_teeth_motion = np.linalg.norm(jaw[LOWER_TEETH_FROM:vhi] - neutral[LOWER_TEETH_FROM:vhi], axis=1).mean()
    moves = np.linalg.norm(jaw[glo:ghi] - gv, axis=1) > JAW_MIN_MOTION * lower_teeth_motion
    lower_face = moves[gf].sum(1) >= 2
    for name, keep in (("upper_gums", ~lower_face), ("lower_gums_tongue", lower_face)):
        out[f"{name}_vertices"], out[f"{name}_faces"] = compact_faces(gv, gf[keep])

    # Eyes: each ICT sclera (the shell the model's surface also learnt, cornea bulge included) and the centre
    # and radius of a sphere fitted to it, the eye's pivot for gaze.
    centres, radii = [], []
    for side, (slo, shi, plo_s, phi_s) in zip(("left", "right"), SCLERA):
        sclera = neutral[slo:shi]
        c, r = fit_sphere(sclera)
        centres.append(c)
        radii.append(r)
        out[f"eye_{side}_vertices"] = sclera.astype(np.float32)
        out[f"eye_{side}_faces"] = triangles(fv[plo_s:phi_s], slo)
    # The outer lip contour (Multi-PIE landmarks 49-60): the add-on tints the skin inside it.
    out["lip_contour"] = neutral[MULTIPIE68[48:60]].astype(np.float32)
    out["eye_centre"] = np.asarray(centres, np.float32)
    out["eye_radius"] = np.asarray(radii, np.float32)

    # ICT moves the lower teeth, gums and tongue only in the jaw expressions (others move them < 0.3 mm): their
    # per-vertex deltas become the lower set's shape keys, driven by the head's expression weights.
    names = json.loads(src.read("vertex_indices.json"))["expressions"]
    lower_parts = {"lower_teeth": vlo + np.unique(tf[lower[tf].all(1)]),
                   "lower_gums_tongue": glo + np.unique(gf[lower_face])}
    jaw_names = []
    for name in names:
        posed = _parse_obj(src.read(f"{name}.obj"), False)[0] * CM_TO_M
        moved = np.linalg.norm(posed[LOWER_TEETH_FROM:vhi] - neutral[LOWER_TEETH_FROM:vhi], axis=1).max()
        if moved > JAW_MIN_DELTA_M:
            jaw_names.append(name)
            for part, used in lower_parts.items():  # the vertices compact_faces kept, in its order
                out.setdefault(f"{part}_deltas", []).append((posed - neutral)[used].astype(np.float32))
    for part in lower_parts:
        out[f"{part}_deltas"] = np.stack(out[f"{part}_deltas"])
    out["jaw_expressions"] = jaw_names
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", type=Path, help="ICT-FaceKit FaceXModel.tar.xz or FaceXModel directory")
    p.add_argument("--out", type=Path, default=REPO / "weights" / "face_parts.safetensors")
    args = p.parse_args(argv)
    from safetensors.numpy import save

    arrays = build(args.source)
    jaw = arrays.pop("jaw_expressions")
    data = save({k: np.ascontiguousarray(v) for k, v in sorted(arrays.items())},
                metadata={"format": "imhead-face-parts/1", "source": "ICT-FaceKit FaceXModel (MIT)",
                          "jaw_expressions": json.dumps(jaw)})
    args.out.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    args.out.with_name(args.out.name + ".sha256").write_text(f"{digest}  {args.out.name}\n")
    for k, v in sorted(arrays.items()):
        print(f"{k:22s} {str(v.shape):14s} {v.reshape(-1)[:3] if v.ndim == 1 else ''}")
    print(f"wrote {args.out} ({len(data) / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
