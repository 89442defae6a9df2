"""ICT-FaceKit converter: original OBJ files -> one safetensors arrays file used by training.

    python -m backend.data.ict --source ../shared/data/ict-facekit/FaceXModel.tar.xz --out .data/ict.safetensors

`--source` is the FaceXModel tarball, a FaceXModel directory, or a checkout that contains FaceXModel/.

The head surface (all in metres, +Y up, face toward +Z; ICT is cm with the same axes, so only /100):
  * ICT vertices [0, 14062): face, head and neck, mouth socket, both eye sockets. One oriented manifold whose
    only opening is a 54-vertex loop at the bottom of the neck; we ear-clip that loop (no new vertices), which
    makes it watertight (checked here, raises otherwise).
  * the two scleras, ICT [21451, 22221) and [23021, 23791): each a closed mesh (checked). The irises are
    closed meshes that lie entirely inside their sclera (every iris triangle centroid has winding number 1
    with respect to the sclera), so they add no boundary to the solid and are left out.
  * left out: gums/tongue, teeth, lacrimal fluid, eye blend, eye occlusion, eyelashes (render-only or
    interior shells; the mouth socket already makes an open mouth a real cavity).
Stored vertex order: head [0, 14062) (same indices as ICT), then sclera left, then sclera right.
"Left" is the subject's left = +x (ICT naming; expression suffixes _L/_R follow it).

File contents (load with `load_ict`):
  neutral (V,3) f32, id_basis (100,V,3) f32, exp_basis (53,V,3) f32   deltas: v = neutral + c@id + w@exp
  faces (F,3) i32 (outward, head triangles then cap then scleras), uv (F,3,2) f32 per-corner ICT UVs,
  face_part (F,) u8 index into metadata parts, ict_index (V,) i32 original ICT vertex of each stored vertex,
  landmarks (68,) i32 Multi-PIE 68 (stored indices), neck_loop (54,) i32,
  face_buried (F,) u8: 1 for triangles that lie inside another closed part on the mean neutral head (the back
  of each sclera inside the head, eye-socket triangles inside a sclera): the union's boundary excludes them,
  so the sampler neither samples surface points on them nor measures distances to them (static mask; lid
  motion under expressions is not re-evaluated).
  metadata["ict"]: JSON {expressions, parts: {name: [v_lo, v_hi]}, face_parts: [names], units, source_sha256}.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import topology

N_IDENTITY = 100
HEAD_END = 14062          # [0, HEAD_END): face, head/neck, mouth socket, eye sockets
HEAD_POLY_END = 14034     # polygons of those parts
SCLERA = {"eyeball_left": (21451, 22221, 21496, 22296), "eyeball_right": (23021, 23791, 23094, 23894)}
IRIS_POLYS = {"eyeball_left": (22296, 23094), "eyeball_right": (23894, 24692)}
VERTEX_PARTS = {  # ICT README "Face Model Topology" (half-open ranges, same indices after conversion)
    "face": (0, 9409), "head_neck": (9409, 11248), "mouth_socket": (11248, 13294),
    "eye_socket_left": (13294, 13678), "eye_socket_right": (13678, 14062),
}
HEAD_PART_POLY_ENDS = (9230, 11144, 13226, 13630, 14034)   # polygon ranges of the five parts above
FACE_PARTS = ["face", "head_neck", "mouth_socket", "eye_socket_left", "eye_socket_right", "neck_cap",
              "eyeball_left", "eyeball_right"]
# Multi-PIE 68 landmarks, ICT README "Facial Landmarks" (all inside the face part, so indices are unchanged)
MULTIPIE68 = [1225, 1888, 1052, 367, 1719, 1722, 2199, 1447, 966, 3661, 4390, 3927, 3924, 2608, 3272, 4088,
              3443, 268, 493, 1914, 2044, 1401, 3615, 4240, 4114, 2734, 2509, 978, 4527, 4942, 4857, 1140, 2075,
              1147, 4269, 3360, 1507, 1542, 1537, 1528, 1518, 1511, 3742, 3751, 3756, 3721, 3725, 3732, 5708,
              5695, 2081, 0, 4275, 6200, 6213, 6346, 6461, 5518, 5957, 5841, 5702, 5711, 5533, 6216, 6207,
              6470, 5517, 5966]
N_ICT_VERTICES = 26719
N_ICT_POLYGONS = 26384
CM_TO_M = 0.01
FORMAT = "imhead-ict/2"    # bump when the stored arrays change; load_ict refuses other versions


@dataclass
class IctModel:
    """The converted model as numpy arrays (see module docstring for meanings)."""

    neutral: np.ndarray
    id_basis: np.ndarray
    exp_basis: np.ndarray
    faces: np.ndarray
    uv: np.ndarray
    face_part: np.ndarray
    ict_index: np.ndarray
    landmarks: np.ndarray
    neck_loop: np.ndarray
    face_buried: np.ndarray
    expressions: list[str]
    parts: dict[str, tuple[int, int]]
    face_parts: list[str]

    def vertices(self, id_coeffs: np.ndarray | None = None, exp_weights: np.ndarray | None = None) -> np.ndarray:
        """Mesh vertices (V,3) for identity coefficients (100,) and expression weights (53,), float64."""
        v = self.neutral.astype(np.float64)
        if id_coeffs is not None:
            v = v + np.tensordot(np.asarray(id_coeffs, np.float64), self.id_basis, 1)
        if exp_weights is not None:
            v = v + np.tensordot(np.asarray(exp_weights, np.float64), self.exp_basis, 1)
        return v


class _Source:
    """Reads FaceXModel files by name from a tarball or a directory. A compressed tarball is read in one
    forward pass into memory (~400 MB): random access into an .xz stream would decompress it again for
    every backward seek."""

    def __init__(self, path: Path):
        self.path = path
        self._files: dict[str, bytes] | None = None
        if path.is_file():
            self._files = {}
            with tarfile.open(path, mode="r|*") as tar:
                for member in tar:
                    name = Path(member.name).name
                    if member.isfile() and name.endswith((".obj", ".json")):
                        f = tar.extractfile(member)
                        assert f is not None
                        self._files[name] = f.read()
        elif (path / "FaceXModel").is_dir():
            self.path = path / "FaceXModel"
        elif not path.is_dir():
            raise FileNotFoundError(f"ICT-FaceKit source not found: {path}")

    def read(self, name: str) -> bytes:
        if self._files is not None:
            if name not in self._files:
                raise FileNotFoundError(f"{name} is not in {self.path}")
            return self._files[name]
        return (self.path / name).read_bytes()


def _parse_obj(data: bytes, with_faces: bool) -> tuple[np.ndarray, np.ndarray | None, list[list[int]] | None,
                                                       list[list[int]] | None, bytes]:
    """Vertices (cm), and if asked UVs and polygons (vertex and UV indices, 0-based). Also returns the
    face lines' bytes so callers can check that every OBJ shares the neutral topology."""
    verts, uvs, fv, ft, flines = [], [], [], [], []
    for line in io.BytesIO(data):
        if line.startswith(b"v "):
            verts.append(line.split()[1:4])
        elif line.startswith(b"f "):
            flines.append(line.strip())
            if with_faces:
                toks = line.split()[1:]
                fv.append([int(t.split(b"/")[0]) - 1 for t in toks])
                ft.append([int(t.split(b"/")[1]) - 1 for t in toks])
        elif with_faces and line.startswith(b"vt "):
            uvs.append(line.split()[1:3])
    v = np.asarray(verts, dtype=np.float64)
    if v.shape != (N_ICT_VERTICES, 3) or len(flines) != N_ICT_POLYGONS:
        raise ValueError(f"unexpected OBJ: {v.shape[0]} vertices, {len(flines)} polygons")
    fbytes = b"\n".join(flines)
    if not with_faces:
        return v, None, None, None, fbytes
    return v, np.asarray(uvs, dtype=np.float64), fv, ft, fbytes


def convert(source: Path, log=print) -> IctModel:
    src = _Source(Path(source))
    expressions = json.loads(src.read("vertex_indices.json"))["expressions"]
    if len(expressions) != 53:
        raise ValueError(f"expected 53 expressions, found {len(expressions)}")
    neutral_cm, uv_all, fv, ft, neutral_faces = _parse_obj(src.read("generic_neutral_mesh.obj"), True)
    assert uv_all is not None and fv is not None and ft is not None

    keep = np.concatenate([np.arange(HEAD_END)] + [np.arange(lo, hi) for lo, hi, _, _ in SCLERA.values()])
    remap = np.full(N_ICT_VERTICES, -1, np.int64)
    remap[keep] = np.arange(len(keep))

    head_tris, head_corners = topology.triangulate(fv[:HEAD_POLY_END])
    loops = topology.boundary_loops(head_tris)
    if len(loops) != 1 or len(loops[0]) != 54:
        raise ValueError(f"expected one 54-vertex opening in the head, found {[len(loop) for loop in loops]}")
    neck_loop = loops[0]
    cap = topology.cap_loop(neutral_cm, neck_loop)
    closed = np.concatenate([head_tris, cap])
    if not topology.is_watertight(closed) or topology.signed_volume(neutral_cm, closed) <= 0:
        raise ValueError(f"capped head is not a closed outward surface: {topology.edge_counts(closed)}")

    # per-corner UVs: polygon corner -> vt index; cap corners take the UV of a neck polygon corner at that vertex
    corner_vt = np.concatenate([np.asarray(c, np.int64) for c in ft])
    corner_v = np.concatenate([np.asarray(c, np.int64) for c in fv])
    poly_start = np.concatenate([[0], np.cumsum([len(p) for p in fv])])
    vertex_uv = np.zeros((N_ICT_VERTICES, 2))
    vertex_uv[corner_v[::-1]] = uv_all[corner_vt[::-1]]   # reversed so the first corner wins
    tri_blocks, uv_blocks, part_blocks = [head_tris], [uv_all[corner_vt[head_corners]]], []
    # head triangles' part from their polygon's index (ICT README polygon ranges)
    tri_poly = np.searchsorted(poly_start, head_corners[:, 0], side="right") - 1
    part_blocks.append(np.searchsorted(np.asarray(HEAD_PART_POLY_ENDS), tri_poly, side="right"))
    tri_blocks.append(cap)
    uv_blocks.append(vertex_uv[cap])
    part_blocks.append(np.full(len(cap), FACE_PARTS.index("neck_cap")))
    for name, (vlo, vhi, plo, phi) in SCLERA.items():
        tris, corners = topology.triangulate(fv[plo:phi])
        if tris.min() < vlo or tris.max() >= vhi or not topology.is_watertight(tris):
            raise ValueError(f"{name} sclera is not a closed mesh on its own vertex range")
        corners = corners + poly_start[plo]
        tri_blocks.append(tris)
        uv_blocks.append(uv_all[corner_vt[corners]])
        part_blocks.append(np.full(len(tris), FACE_PARTS.index(name)))
        iris, _ = topology.triangulate(fv[IRIS_POLYS[name][0]:IRIS_POLYS[name][1]])
        w = _winding(neutral_cm[iris].mean(1), neutral_cm, tris)
        if not np.all(w > 0.5):
            raise ValueError(f"{name} iris is not inside its sclera; it cannot be left out")
    faces = remap[np.concatenate(tri_blocks)]
    if faces.min() < 0 or not topology.is_watertight(faces):
        raise ValueError("the kept surface is not closed or uses a dropped vertex")

    neutral = neutral_cm[keep] * CM_TO_M
    names = [f"identity{i:03d}.obj" for i in range(N_IDENTITY)] + [f"{e}.obj" for e in expressions]
    deltas = np.empty((len(names), len(keep), 3), np.float32)
    for i, name in enumerate(names):
        v, _, _, _, fbytes = _parse_obj(src.read(name), False)
        if fbytes != neutral_faces:
            raise ValueError(f"{name} does not share the neutral mesh's topology")
        deltas[i] = (v[keep] - neutral_cm[keep]) * CM_TO_M
        if (i + 1) % 20 == 0:
            log(f"  read {i + 1}/{len(names)} shapes")

    face_part = np.concatenate(part_blocks).astype(np.uint8)
    face_buried = buried_faces(neutral_cm[keep] * CM_TO_M, faces, face_part, FACE_PARTS)
    parts = {k: (lo, hi) for k, (lo, hi) in VERTEX_PARTS.items()}
    start = HEAD_END
    for name, (vlo, vhi, _, _) in SCLERA.items():
        parts[name] = (start, start + vhi - vlo)
        start += vhi - vlo
    return IctModel(
        neutral=neutral.astype(np.float32), id_basis=deltas[:N_IDENTITY], exp_basis=deltas[N_IDENTITY:],
        faces=faces.astype(np.int32), uv=np.concatenate(uv_blocks).astype(np.float32),
        face_part=face_part, face_buried=face_buried, ict_index=keep.astype(np.int32),
        landmarks=remap[MULTIPIE68].astype(np.int32), neck_loop=remap[neck_loop].astype(np.int32),
        expressions=list(expressions), parts=parts, face_parts=list(FACE_PARTS))


def _winding(points: np.ndarray, vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Exact generalised winding numbers in float64 (brute force; small meshes only)."""
    import torch

    from .mesh import winding_number_brute

    t = torch.as_tensor
    return winding_number_brute(t(points)[None], t(vertices)[None], t(faces), chunk=64)[0].numpy()


def closed_groups(face_part: np.ndarray, face_parts: list[str]) -> np.ndarray:
    """Closed component per triangle: 0 head (+ cap), 1 left sclera, 2 right sclera."""
    groups = np.zeros(len(face_part), np.int64)
    groups[face_part == face_parts.index("eyeball_left")] = 1
    groups[face_part == face_parts.index("eyeball_right")] = 2
    return groups


def buried_faces(vertices: np.ndarray, faces: np.ndarray, face_part: np.ndarray, face_parts: list[str]) -> np.ndarray:
    """1 where a triangle's centroid is inside another closed component (winding number > 0.5)."""
    import torch

    from .mesh import ClusteredMesh

    groups = closed_groups(face_part, face_parts)
    cent = vertices[faces].mean(1)
    # only triangles near a sclera can be inside another component (head and scleras touch only there)
    near = np.zeros(len(faces), bool)
    for g in (1, 2):
        pts = vertices[np.unique(faces[groups == g])]
        c, r = pts.mean(0), np.linalg.norm(pts - pts.mean(0), axis=1).max()
        near |= np.linalg.norm(cent - c, axis=1) < 1.5 * r
    cm = ClusteredMesh(vertices, faces, groups, leaf=32)
    q = torch.as_tensor(cent[near], dtype=torch.float64)[None]
    w = cm.query(q, torch.as_tensor(vertices, dtype=torch.float64)[None], k=32, chunk=1024,
                 need_distance=False)["winding"][0].numpy()
    others = w.sum(1) - w[np.arange(len(w)), groups[near]]
    buried = np.zeros(len(faces), np.uint8)
    buried[near] = others > 0.5
    return buried


def save_ict(model: IctModel, path: Path, source_sha256: str) -> None:
    from safetensors.numpy import save_file

    meta = {"format": FORMAT, "expressions": model.expressions, "parts": model.parts, "face_parts": model.face_parts,
            "units": "metres, +Y up, face toward +Z", "source_sha256": source_sha256,
            "licence": "ICT-FaceKit, MIT licence, Copyright (c) 2020 USC Institute for Creative Technologies"}
    arrays = {k: np.ascontiguousarray(getattr(model, k)) for k in
              ("neutral", "id_basis", "exp_basis", "faces", "uv", "face_part", "ict_index", "landmarks",
               "neck_loop", "face_buried")}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(arrays, str(path), metadata={"ict": json.dumps(meta)})


def load_ict(path: str | Path) -> IctModel:
    """Load a file written by `python -m backend.data.ict` (safetensors; nothing is unpickled)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"converted ICT file not found: {path} (run python -m backend.data.ict)")
    with safe_open(str(path), framework="numpy") as f:
        meta = json.loads((f.metadata() or {}).get("ict", "{}"))
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} was written by another converter version ({meta.get('format')!r}, need "
                             f"{FORMAT!r}); re-run python -m backend.data.ict")
        arrays = {k: f.get_tensor(k) for k in f.keys()}
    return IctModel(**arrays, expressions=meta["expressions"],
                    parts={k: tuple(v) for k, v in meta["parts"].items()}, face_parts=meta["face_parts"])


def _sha256(path: Path) -> str:
    if path.is_dir():
        return "directory"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", type=Path, required=True, help="FaceXModel.tar.xz or a FaceXModel directory")
    p.add_argument("--out", type=Path, default=Path(".data/ict.safetensors"))
    args = p.parse_args(argv)
    try:
        model = convert(args.source, log=lambda m: print(m, file=sys.stderr))
    except (OSError, ValueError, KeyError, tarfile.TarError) as exc:
        print(f"error: cannot convert {args.source}: {exc}", file=sys.stderr)
        return 2
    save_ict(model, args.out, _sha256(args.source))
    print(f"wrote {args.out}: {len(model.neutral)} vertices, {len(model.faces)} triangles, "
          f"{args.out.stat().st_size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
