"""backend/engine/meshio.py writers: OBJ and glTF binary read back to the same mesh; the format follows the
extension."""

import json
import struct

import numpy as np
import pytest

from backend.engine.meshio import read_mesh, read_obj, read_ply, write_glb, write_mesh, write_obj
from backend.errors import InvalidInput

COMPONENTS = {5126: np.float32, 5125: np.uint32}
WIDTH = {"SCALAR": 1, "VEC2": 2, "VEC3": 3}


def read_glb(path) -> tuple[dict, dict[str, np.ndarray], np.ndarray]:
    """A minimal GLB reader after the glTF 2.0 spec: 12-byte header, JSON chunk, BIN chunk; accessors of
    tightly packed bufferViews. Returns the JSON, the first primitive's attributes and its indices."""
    data = path.read_bytes()
    magic, version, length = struct.unpack_from("<III", data, 0)
    assert (magic, version, length) == (0x46546C67, 2, len(data))
    json_len, json_type = struct.unpack_from("<II", data, 12)
    assert json_type == 0x4E4F534A and json_len % 4 == 0
    gltf = json.loads(data[20 : 20 + json_len])
    bin_len, bin_type = struct.unpack_from("<II", data, 20 + json_len)
    assert bin_type == 0x004E4942 and bin_len % 4 == 0 and bin_len == gltf["buffers"][0]["byteLength"]
    body = data[28 + json_len : 28 + json_len + bin_len]
    assert 28 + json_len + bin_len == len(data)

    def accessor(i: int) -> np.ndarray:
        acc = gltf["accessors"][i]
        view = gltf["bufferViews"][acc["bufferView"]]
        assert view["byteOffset"] % 4 == 0
        dtype, width = COMPONENTS[acc["componentType"]], WIDTH[acc["type"]]
        arr = np.frombuffer(body, dtype, acc["count"] * width, view["byteOffset"] + acc.get("byteOffset", 0))
        assert arr.nbytes <= view["byteLength"]
        return arr.reshape(acc["count"], width) if width > 1 else arr

    assert gltf["asset"]["version"] == "2.0"
    prim = gltf["meshes"][gltf["nodes"][gltf["scenes"][gltf["scene"]]["nodes"][0]]["mesh"]]["primitives"][0]
    assert prim.get("mode", 4) == 4
    return gltf, {k: accessor(i) for k, i in prim["attributes"].items()}, accessor(prim["indices"])


def tetrahedron():
    v = np.array([[0, 0, 0], [0.1, 0, 0], [0, 0.1, 0], [0, 0, 0.1]], np.float32)
    f = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]], np.int32)
    n = v - v.mean(0)
    uv = np.array([[0, 0], [1, 0], [0, 1], [0.5, 0.25]], np.float32)
    return v, f, n, uv


def test_glb_reads_back(tmp_path):
    v, f, n, uv = tetrahedron()
    path = tmp_path / "t.glb"
    write_glb(path, v, f, n, uv)
    gltf, attrs, indices = read_glb(path)
    np.testing.assert_array_equal(attrs["POSITION"], v)
    np.testing.assert_allclose(attrs["NORMAL"], n / np.linalg.norm(n, axis=1, keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(attrs["TEXCOORD_0"], np.column_stack([uv[:, 0], 1 - uv[:, 1]]))
    np.testing.assert_array_equal(indices.reshape(-1, 3), f)
    pos = gltf["accessors"][gltf["meshes"][0]["primitives"][0]["attributes"]["POSITION"]]
    assert pos["min"] == [0, 0, 0] and np.allclose(pos["max"], 0.1)


def test_glb_without_normals_or_uv(tmp_path):
    v, f, _, _ = tetrahedron()
    write_glb(tmp_path / "t.glb", v, f)
    _, attrs, indices = read_glb(tmp_path / "t.glb")
    assert set(attrs) == {"POSITION"} and len(indices) == 12


@pytest.mark.parametrize("with_normals,with_uv", [(True, True), (True, False), (False, True), (False, False)])
def test_obj_reads_back(tmp_path, with_normals, with_uv):
    v, f, n, uv = tetrahedron()
    path = tmp_path / "t.obj"
    write_obj(path, v, f, n if with_normals else None, uv if with_uv else None)
    mesh = read_obj(path)
    np.testing.assert_allclose(mesh.vertices, v, rtol=1e-6)
    np.testing.assert_array_equal(mesh.faces, f)
    lines = path.read_text().splitlines()
    assert sum(line.startswith("vn ") for line in lines) == (4 if with_normals else 0)
    assert sum(line.startswith("vt ") for line in lines) == (4 if with_uv else 0)
    face = next(line for line in lines if line.startswith("f ")).split()[1]
    assert face.count("/") == (2 if with_normals else 1 if with_uv else 0)


def test_write_mesh_picks_the_format_by_extension(tmp_path):
    v, f, n, uv = tetrahedron()
    attributes = {"normals": n, "uv": uv, "region": np.arange(4, dtype=np.int32)}
    for suffix in (".ply", ".PLY", ".obj", ".glb"):
        write_mesh(tmp_path / f"t{suffix}", v, f, attributes)
    assert read_ply(tmp_path / "t.ply").attributes["region"].tolist() == [0, 1, 2, 3]
    assert len(read_mesh(tmp_path / "t.obj").faces) == 4
    assert (tmp_path / "t.glb").read_bytes()[:4] == b"glTF"
    with pytest.raises(InvalidInput, match="unsupported mesh format '.xyz'"):
        write_mesh(tmp_path / "t.xyz", v, f, attributes)
    assert not (tmp_path / "t.xyz").exists()
