"""Backend mesh arrays -> Blender mesh data, with foreach_set on float32/int32 arrays (no per-vertex Python).

Point attributes written (all in Blender axes where they are positions):
  imhead_canonical  FLOAT_VECTOR  position on this identity's neutral canonical head (what `deform` moves)
  imhead_template   FLOAT_VECTOR  position on the mean neutral template (cross-identity correspondence)
  imhead_region     INT           atlas region id in [0, 39)
plus the UV map "UVMap" (ICT layout). The backend's SDF-gradient normals are not set as custom normals:
they would go stale as soon as live deform moves the vertices, and Blender's own smooth normals of the
extracted surface shade more cleanly than the network's gradient.
"""

from typing import cast

import bpy
import numpy as np

from . import axes

CANONICAL = "imhead_canonical"
TEMPLATE = "imhead_template"
REGION = "imhead_region"
UV_NAME = "UVMap"


def mesh_of(obj: bpy.types.Object) -> bpy.types.Mesh:
    """A head (or face part) object's mesh: the stubs type Object.data as the union of every data type."""
    return cast(bpy.types.Mesh, obj.data)


def validate_arrays(arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Check the reply's mesh arrays before touching Blender data; returns (vertices, faces)."""
    for key in ("vertices", "faces"):
        if key not in arrays:
            raise ValueError(f"backend reply has no '{key}' array")
    verts = np.asarray(arrays["vertices"], dtype=np.float32)
    faces = np.asarray(arrays["faces"], dtype=np.int32)
    if verts.ndim != 2 or verts.shape[1] != 3 or len(verts) == 0:
        raise ValueError(f"vertices must be (N,3) with N>0, got {verts.shape}")
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"faces must be (F,3), got {faces.shape}")
    if faces.size and (faces.min() < 0 or faces.max() >= len(verts)):
        raise ValueError("face indices out of range")
    n = len(verts)
    for key, width in (("canonical", 3), ("template", 3), ("normals", 3), ("uv", 2)):
        if key in arrays and np.shape(arrays[key]) != (n, width):
            raise ValueError(f"'{key}' must be ({n},{width}), got {np.shape(arrays[key])}")
    if "region" in arrays and np.shape(arrays["region"]) != (n,):
        raise ValueError(f"'region' must be ({n},), got {np.shape(arrays['region'])}")
    return verts, faces


def build_mesh(name: str, arrays: dict[str, np.ndarray], *, vertices_in_backend_axes: bool = True) -> bpy.types.Mesh:
    """A new mesh datablock from backend arrays. `vertices_in_backend_axes=False` for fit results that are
    already in the input object's own frame (only canonical/template are converted then)."""
    verts, faces = validate_arrays(arrays)
    mesh = bpy.data.meshes.new(name)
    fill_mesh(mesh, verts, faces, arrays, vertices_in_backend_axes)
    return mesh


def fill_mesh(mesh: bpy.types.Mesh, verts: np.ndarray, faces: np.ndarray, arrays: dict[str, np.ndarray],
              vertices_in_backend_axes: bool = True) -> None:
    mesh.clear_geometry()
    co = axes.backend_to_blender(verts) if vertices_in_backend_axes else verts.astype(np.float32)
    mesh.vertices.add(len(co))
    mesh.vertices.foreach_set("co", co.ravel())
    n_faces = len(faces)
    mesh.loops.add(n_faces * 3)
    mesh.loops.foreach_set("vertex_index", faces.astype(np.int32).ravel())
    mesh.polygons.add(n_faces)
    mesh.polygons.foreach_set("loop_start", np.arange(0, 3 * n_faces, 3, dtype=np.int32))
    mesh.polygons.foreach_set("use_smooth", np.ones(n_faces, dtype=bool))

    if "canonical" in arrays:
        _point_vector(mesh, CANONICAL, axes.backend_to_blender(arrays["canonical"]))
    if "template" in arrays:
        _point_vector(mesh, TEMPLATE, axes.backend_to_blender(arrays["template"]))
    if "region" in arrays:
        attr = cast(bpy.types.IntAttribute, mesh.attributes.new(REGION, "INT", "POINT"))
        attr.data.foreach_set("value", np.asarray(arrays["region"], dtype=np.int32))
    if "uv" in arrays:
        uv_layer = mesh.uv_layers.new(name=UV_NAME)
        per_corner = np.asarray(arrays["uv"], dtype=np.float32)[faces.ravel()]
        uv_layer.data.foreach_set("uv", per_corner.ravel())
    mesh.update()


def _point_vector(mesh: bpy.types.Mesh, name: str, values: np.ndarray) -> None:
    attr = cast(bpy.types.FloatVectorAttribute, mesh.attributes.new(name, "FLOAT_VECTOR", "POINT"))
    attr.data.foreach_set("vector", np.ascontiguousarray(values, dtype=np.float32).ravel())


def read_point_vector(mesh: bpy.types.Mesh, name: str) -> np.ndarray:
    """(N,3) float32 copy of a FLOAT_VECTOR point attribute."""
    attr = mesh.attributes.get(name)
    if attr is None or attr.data_type != "FLOAT_VECTOR" or attr.domain != "POINT":
        raise ValueError(f"mesh '{mesh.name}' has no point attribute '{name}' (FLOAT_VECTOR)")
    out = np.empty(len(mesh.vertices) * 3, dtype=np.float32)
    attr.data.foreach_get("vector", out)
    return out.reshape(-1, 3)


def set_positions(mesh: bpy.types.Mesh, positions_blender: np.ndarray) -> None:
    """Move vertices in place (same topology), e.g. after `deform`."""
    co = np.ascontiguousarray(positions_blender, dtype=np.float32)
    if co.shape != (len(mesh.vertices), 3):
        raise ValueError(f"expected ({len(mesh.vertices)},3) positions, got {co.shape}")
    mesh.vertices.foreach_set("co", co.ravel())
    mesh.update()


def evaluated_points(obj: bpy.types.Object, depsgraph) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(points (N,3), normals (N,3), triangles (F,3)) of an object's evaluated mesh in its local frame."""
    evaluated = obj.evaluated_get(depsgraph)
    mesh = evaluated.to_mesh()
    try:
        mesh.calc_loop_triangles()
        n = len(mesh.vertices)
        points = np.empty(n * 3, dtype=np.float32)
        mesh.vertices.foreach_get("co", points)
        normals = np.empty(n * 3, dtype=np.float32)
        mesh.vertices.foreach_get("normal", normals)
        tris = np.empty(len(mesh.loop_triangles) * 3, dtype=np.int32)
        mesh.loop_triangles.foreach_get("vertices", tris)
    finally:
        evaluated.to_mesh_clear()
    return points.reshape(-1, 3), normals.reshape(-1, 3), tris.reshape(-1, 3)
