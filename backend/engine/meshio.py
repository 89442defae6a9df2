"""Mesh files: OBJ and PLY readers (ASCII and binary PLY); writers for binary little-endian PLY with named
per-vertex attribute columns, Wavefront OBJ and binary glTF 2.0 (.glb). `write_mesh` picks the writer from the
file's extension (MESH_FORMATS).

OBJ and glTF carry what those formats define: positions, normals, UVs (`uv`) and triangles; the other
attribute columns (canonical, template, region, ...) exist only in the PLY.

The writer stores each attribute array as scalar vertex properties: an (N,) array `region` becomes
`property int region`; an (N,k) array `canonical` becomes `canonical_x canonical_y canonical_z` (k = 3) or
`uv_u uv_v` (k = 2), other k as `<name>_0 ... <name>_{k-1}`. `vertices` are `x y z`, `normals` `nx ny nz`.
Faces are `property list uchar int vertex_indices`. `read_ply` returns those columns regrouped by prefix.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import constants, errors

_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "<i2", "int16": "<i2", "ushort": "<u2",
    "uint16": "<u2", "int": "<i4", "int32": "<i4", "uint": "<u4", "uint32": "<u4", "float": "<f4",
    "float32": "<f4", "double": "<f8", "float64": "<f8",
}
_NP_TO_PLY = {"f4": "float", "f8": "double", "i4": "int", "u4": "uint", "u1": "uchar", "i1": "char", "i2": "short",
              "u2": "ushort"}
_SUFFIXES = {2: ["u", "v"], 3: ["x", "y", "z"]}
MESH_FORMATS = (".ply", ".obj", ".glb")


@dataclass
class MeshData:
    vertices: np.ndarray  # (N,3) float64
    faces: np.ndarray | None = None  # (F,3) int64, polygons fan-triangulated
    normals: np.ndarray | None = None  # (N,3)
    attributes: dict[str, np.ndarray] = field(default_factory=dict)


def read_mesh(path: str | Path) -> MeshData:
    path = Path(path)
    if not path.is_file():
        raise errors.InvalidInput(f"no such file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".obj":
        mesh = read_obj(path)
    elif suffix == ".ply":
        mesh = read_ply(path)
    else:
        raise errors.InvalidInput(f"unsupported mesh format {suffix!r} (use .obj or .ply)")
    return check_mesh(mesh, str(path))


def check_mesh(mesh: MeshData, what: str) -> MeshData:
    v = mesh.vertices
    if v.ndim != 2 or v.shape[1] != 3 or len(v) == 0:
        raise errors.InvalidInput(f"{what}: no vertices")
    if len(v) > constants.MAX_POINTS:
        raise errors.InvalidInput(f"{what}: {len(v)} vertices, more than the limit {constants.MAX_POINTS}")
    if not np.isfinite(v).all():
        raise errors.InvalidInput(f"{what}: vertices contain NaN or Inf")
    if mesh.faces is not None and len(mesh.faces):
        if mesh.faces.min() < 0 or mesh.faces.max() >= len(v):
            raise errors.InvalidInput(f"{what}: face indices out of range")
    return mesh


def _triangulate(polys: list[list[int]]) -> np.ndarray:
    tris = [(p[0], p[i], p[i + 1]) for p in polys for i in range(1, len(p) - 1)]
    return np.array(tris, np.int64).reshape(-1, 3)


def read_obj(path: Path) -> MeshData:
    verts, normals, polys = [], [], []
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise errors.InvalidInput(f"cannot read {path}: {exc}") from exc
    for lineno, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            if parts[0] == "v":
                verts.append([float(x) for x in parts[1:4]])
            elif parts[0] == "vn":
                normals.append([float(x) for x in parts[1:4]])
            elif parts[0] == "f":
                idx = [int(p.split("/")[0]) for p in parts[1:]]
                n = len(verts)
                polys.append([i - 1 if i > 0 else n + i for i in idx])
        except ValueError as exc:
            raise errors.InvalidInput(f"{path}:{lineno}: malformed line {line.strip()[:60]!r}") from exc
    if any(len(v) != 3 for v in verts):
        raise errors.InvalidInput(f"{path}: a vertex line has fewer than 3 coordinates")
    faces = _triangulate([p for p in polys if len(p) >= 3]) if polys else None
    return MeshData(np.array(verts, np.float64).reshape(-1, 3), faces)


def read_ply(path: Path) -> MeshData:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise errors.InvalidInput(f"cannot read {path}: {exc}") from exc
    end = data.find(b"end_header")
    if not data.startswith(b"ply") or end < 0:
        raise errors.InvalidInput(f"{path}: not a PLY file")
    body_start = data.index(b"\n", end) + 1
    header = data[:end].decode("ascii", errors="replace").splitlines()
    fmt: str | None = None
    elements: list[tuple[str, int, list]] = []  # (name, count, [(property name, type), ...])
    for line in header:
        p = line.split()
        if not p:
            continue
        if p[0] == "format":
            fmt = p[1]
        elif p[0] == "element":
            elements.append((p[1], int(p[2]), []))
        elif p[0] == "property" and elements:
            if p[1] == "list":
                elements[-1][2].append((p[4], ("list", p[2], p[3])))
            else:
                elements[-1][2].append((p[2], p[1]))
    if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
        raise errors.InvalidInput(f"{path}: unsupported PLY format {fmt!r}")
    try:
        cols, faces = _ply_body(data[body_start:], fmt, elements)
    except (ValueError, KeyError, IndexError) as exc:
        raise errors.InvalidInput(f"{path}: malformed PLY body ({exc})") from exc
    if not all(k in cols for k in "xyz"):
        raise errors.InvalidInput(f"{path}: PLY has no x, y, z vertex properties")
    verts = np.column_stack([cols.pop(k) for k in "xyz"]).astype(np.float64)
    normals = np.column_stack([cols.pop(k) for k in ("nx", "ny", "nz")]) if all(
        k in cols for k in ("nx", "ny", "nz")) else None
    return MeshData(verts, faces, normals, _group_columns(cols))


def _ply_body(body: bytes, fmt: str, elements: list) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    cols: dict[str, np.ndarray] = {}
    faces = None
    if fmt == "ascii":
        tokens = body.split()
        pos = 0
        for name, count, props in elements:
            if all(not isinstance(t, tuple) for _, t in props):
                n = len(props)
                arr = np.array(tokens[pos : pos + n * count], dtype=np.float64).reshape(count, n)
                pos += n * count
                if name == "vertex":
                    cols = {p: arr[:, i] for i, (p, _) in enumerate(props)}
                continue
            polys = []
            for _ in range(count):
                row = []
                for _, t in props:
                    if isinstance(t, tuple):
                        k = int(tokens[pos])
                        row = [int(x) for x in tokens[pos + 1 : pos + 1 + k]]
                        pos += 1 + k
                    else:
                        pos += 1
                polys.append(row)
            if name == "face":
                faces = _triangulate(polys)
        return cols, faces
    order = "<" if fmt == "binary_little_endian" else ">"
    pos = 0
    for name, count, props in elements:
        if all(not isinstance(t, tuple) for _, t in props):
            dt = np.dtype([(p, order + _PLY_TYPES[t].lstrip("<")) for p, t in props])
            arr = np.frombuffer(body, dt, count, pos)
            pos += dt.itemsize * count
            if name == "vertex":
                cols = {p: arr[p].astype(np.float64) for p, _ in props}
            continue
        # Element with a list: fast path for the common "uchar count + 3 (or 4) indices" faces.
        if len(props) == 1:
            _, (_, ct, it) = props[0]
            cdt, idt = np.dtype(order + _PLY_TYPES[ct].lstrip("<")), np.dtype(order + _PLY_TYPES[it].lstrip("<"))
            tri = np.dtype([("k", cdt), ("i", idt, (3,))])
            if len(body) - pos >= tri.itemsize * count:  # all triangles? read them in one go
                rows = np.frombuffer(body, tri, count, pos)
                if (rows["k"] == 3).all():
                    pos += tri.itemsize * count
                    if name == "face":
                        faces = rows["i"].astype(np.int64)
                    continue
            polys = []
            for _ in range(count):
                k = int(np.frombuffer(body, cdt, 1, pos)[0])
                pos += cdt.itemsize
                polys.append(np.frombuffer(body, idt, k, pos).astype(np.int64).tolist())
                pos += idt.itemsize * k
            if name == "face":
                faces = _triangulate(polys)
            continue
        raise ValueError(f"element {name!r} mixes list and scalar properties")
    return cols, faces


def _group_columns(cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    groups: dict[str, list[tuple[str, np.ndarray]]] = {}
    for key, value in cols.items():
        m = re.fullmatch(r"(.+)_(x|y|z|u|v|\d+)", key)
        if m:
            groups.setdefault(m.group(1), []).append((m.group(2), value))
        else:
            out[key] = value
    for prefix, items in groups.items():
        out[prefix] = np.column_stack([v for _, v in items])
    return out


def write_ply(path: str | Path, vertices: np.ndarray, faces: np.ndarray, attributes: dict[str, np.ndarray]) -> None:
    """Binary little-endian PLY: x y z, then each attribute's columns (see module doc), then faces."""
    n = len(vertices)
    columns: list[tuple[str, np.ndarray]] = [(a, vertices[:, i]) for i, a in enumerate("xyz")]
    for name, arr in attributes.items():
        arr = np.asarray(arr)
        if arr.shape[0] != n:
            raise ValueError(f"attribute {name!r} has {arr.shape[0]} rows, expected {n}")
        if name == "normals":
            columns += [(f"n{a}", arr[:, i]) for i, a in enumerate("xyz")]
        elif arr.ndim == 1:
            columns.append((name, arr))
        else:
            suffixes = _SUFFIXES.get(arr.shape[1], [str(i) for i in range(arr.shape[1])])
            columns += [(f"{name}_{s}", arr[:, i]) for i, s in enumerate(suffixes)]
    dtype = np.dtype([(c, "<" + np.asarray(v).dtype.str[1:]) for c, v in columns])
    rows = np.empty(n, dtype)
    for c, v in columns:
        rows[c] = v
    face_rows = np.empty(len(faces), np.dtype([("k", "u1"), ("i", "<i4", (3,))]))
    face_rows["k"] = 3
    face_rows["i"] = faces
    props = "".join(f"property {_NP_TO_PLY[dtype[c].str[1:]]} {c}\n" for c, _ in columns)
    header = (f"ply\nformat binary_little_endian 1.0\ncomment imhead\nelement vertex {n}\n{props}"
              f"element face {len(faces)}\nproperty list uchar int vertex_indices\nend_header\n")
    with open(path, "wb") as f:
        f.write(header.encode("ascii"))
        f.write(rows.tobytes())
        f.write(face_rows.tobytes())


def write_mesh(path: str | Path, vertices: np.ndarray, faces: np.ndarray, attributes: dict[str, np.ndarray]) -> None:
    """Write by extension: .ply (every attribute column), .obj or .glb (normals and uv only)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".ply":
        write_ply(path, vertices, faces, attributes)
    elif suffix == ".obj":
        write_obj(path, vertices, faces, attributes.get("normals"), attributes.get("uv"))
    elif suffix == ".glb":
        write_glb(path, vertices, faces, attributes.get("normals"), attributes.get("uv"))
    else:
        raise errors.InvalidInput(f"{path}: unsupported mesh format {suffix or '(none)'!r}; use "
                                  f"{', '.join(MESH_FORMATS)}")


def write_obj(path: str | Path, vertices: np.ndarray, faces: np.ndarray, normals: np.ndarray | None = None,
              uv: np.ndarray | None = None) -> None:
    """Wavefront OBJ: `v`, then `vt` and `vn` when given (one per vertex), then 1-based triangles `f`."""
    vertices = np.asarray(vertices, np.float64).reshape(-1, 3)
    tris = np.asarray(faces, np.int64).reshape(-1, 3) + 1
    with open(path, "w") as f:
        f.write(f"# imhead: {len(vertices)} vertices, {len(tris)} triangles\n")
        np.savetxt(f, vertices, fmt="v %.7g %.7g %.7g")
        if uv is not None:
            np.savetxt(f, np.asarray(uv, np.float64).reshape(-1, 2), fmt="vt %.7g %.7g")
        if normals is not None:
            np.savetxt(f, np.asarray(normals, np.float64).reshape(-1, 3), fmt="vn %.6g %.6g %.6g")
        if uv is not None and normals is not None:
            np.savetxt(f, np.repeat(tris, 3, axis=1), fmt="f %d/%d/%d %d/%d/%d %d/%d/%d")
        elif uv is not None:
            np.savetxt(f, np.repeat(tris, 2, axis=1), fmt="f %d/%d %d/%d %d/%d")
        elif normals is not None:
            np.savetxt(f, np.repeat(tris, 2, axis=1), fmt="f %d//%d %d//%d %d//%d")
        else:
            np.savetxt(f, tris, fmt="f %d %d %d")


_GLB_MAGIC, _GLB_JSON, _GLB_BIN = 0x46546C67, 0x4E4F534A, 0x004E4942  # "glTF", "JSON", "BIN\0"
_ARRAY_BUFFER, _ELEMENT_ARRAY_BUFFER = 34962, 34963
_FLOAT, _UNSIGNED_INT = 5126, 5125


def write_glb(path: str | Path, vertices: np.ndarray, faces: np.ndarray, normals: np.ndarray | None = None,
              uv: np.ndarray | None = None) -> None:
    """Binary glTF 2.0: one mesh of one indexed triangle primitive (POSITION, NORMAL and TEXCOORD_0 when
    given, uint32 indices) in one node. glTF's frame is ours (metres, +Y up, facing +Z); its UV origin is the
    top left, so v is flipped."""
    attributes = {"POSITION": np.asarray(vertices, np.float32).reshape(-1, 3)}
    if normals is not None:
        n = np.asarray(normals, np.float64).reshape(-1, 3)
        length = np.linalg.norm(n, axis=1, keepdims=True)
        attributes["NORMAL"] = np.where(length > 0, n / np.where(length > 0, length, 1), [0.0, 0.0, 1.0]).astype(
            np.float32)
    if uv is not None:
        t = np.asarray(uv, np.float32).reshape(-1, 2).copy()
        t[:, 1] = 1.0 - t[:, 1]
        attributes["TEXCOORD_0"] = t
    indices = np.asarray(faces, np.uint32).reshape(-1)
    blobs: list[bytes] = []
    views: list[dict] = []
    accessors: list[dict] = []
    offset = 0

    def add(arr: np.ndarray, kind: str, component: int, target: int, bounds: bool = False) -> int:
        nonlocal offset
        data = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        views.append({"buffer": 0, "byteOffset": offset, "byteLength": len(data), "target": target})
        accessor = {"bufferView": len(views) - 1, "componentType": component, "count": int(arr.shape[0]),
                    "type": kind}
        if bounds and arr.shape[0]:
            accessor["min"] = [float(v) for v in arr.min(axis=0)]
            accessor["max"] = [float(v) for v in arr.max(axis=0)]
        accessors.append(accessor)
        pad = -len(data) % 4
        blobs.append(data + b"\0" * pad)
        offset += len(data) + pad
        return len(accessors) - 1

    kinds = {"POSITION": "VEC3", "NORMAL": "VEC3", "TEXCOORD_0": "VEC2"}
    primitive_attributes = {name: add(arr, kinds[name], _FLOAT, _ARRAY_BUFFER, bounds=name == "POSITION")
                            for name, arr in attributes.items()}
    index_accessor = add(indices, "SCALAR", _UNSIGNED_INT, _ELEMENT_ARRAY_BUFFER)
    gltf = {
        "asset": {"version": "2.0", "generator": "imhead"},
        "scene": 0,
        "scenes": [{"nodes": [0]}],
        "nodes": [{"mesh": 0, "name": "imhead"}],
        "meshes": [{"name": "imhead", "primitives": [{"attributes": primitive_attributes, "indices": index_accessor,
                                                      "mode": 4}]}],
        "accessors": accessors,
        "bufferViews": views,
        "buffers": [{"byteLength": offset}],
    }
    text = json.dumps(gltf, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 4)  # chunks are 4-byte aligned; JSON pads with spaces
    body = b"".join(blobs)
    total = 12 + 8 + len(text) + 8 + len(body)
    with open(path, "wb") as f:
        f.write(struct.pack("<III", _GLB_MAGIC, 2, total))
        f.write(struct.pack("<II", len(text), _GLB_JSON))
        f.write(text)
        f.write(struct.pack("<II", len(body), _GLB_BIN))
        f.write(body)
