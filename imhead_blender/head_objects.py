"""imHead objects in the scene: create one from a backend reply, replace its mesh, read its stored head.

The generation parameters live on the object itself (Object.imhead: HeadSpec JSON, seed, resolution,
model), so a .blend file alone says how every head was made.
"""

import json

import bpy
import numpy as np

from . import backend_service, face_parts, materials, live_deform, mesh_build
from .properties import head_props

HEAD_FORMAT = "imhead-head/1"


def head_spec(obj: bpy.types.Object) -> dict:
    """The object's stored HeadSpec; raises ValueError when it is not an imHead object."""
    props = head_props(obj)
    if not props.is_head or not props.head_json:
        raise ValueError(f"'{obj.name}' is not an imHead head (no stored head)")
    spec = json.loads(props.head_json)
    if spec.get("format") != HEAD_FORMAT:
        raise ValueError(f"'{obj.name}' stores an unknown head format {spec.get('format')!r}")
    return spec


def create_head_object(scene: bpy.types.Scene, name: str, head: dict, arrays: dict[str, np.ndarray], *,
                       seed: int, resolution: int, location=(0.0, 0.0, 0.0),
                       vertices_in_backend_axes: bool = True) -> bpy.types.Object:
    mesh = mesh_build.build_mesh(name, arrays, vertices_in_backend_axes=vertices_in_backend_axes)
    obj = bpy.data.objects.new(name, mesh)
    obj.location = location
    scene.collection.objects.link(obj)
    store_head(obj, head, seed=seed, resolution=resolution)
    add_parts(obj)
    _make_active(scene, obj)
    return obj


def replace_head_mesh(obj: bpy.types.Object, head: dict, arrays: dict[str, np.ndarray]) -> None:
    """New geometry for an existing head (region edit, regenerate): the object, its transform, material
    slots and animation stay; the old mesh datablock is dropped when nothing else uses it."""
    old = mesh_build.mesh_of(obj)
    name = old.name
    mesh = mesh_build.build_mesh(name, arrays)
    for material in old.materials:
        mesh.materials.append(material)
    obj.data = mesh
    if old.users == 0:
        bpy.data.meshes.remove(old)
        mesh.name = name
    store_head(obj, head, seed=head_props(obj).seed, resolution=head_props(obj).resolution)
    add_parts(obj)
    live_deform.forget(obj.name)
    live_deform.request_for_object(obj)


def store_head(obj: bpy.types.Object, head: dict, *, seed: int, resolution: int) -> None:
    """Keep the head on the object. Its expression weights move into the keyframeable properties (the one
    place the add-on reads them from); the stored JSON keeps identity and region codes, so edits and
    rebuilds return the neutral canonical mesh that live deform then poses."""
    if head.get("format") != HEAD_FORMAT:
        raise ValueError(f"backend returned an unknown head format {head.get('format')!r}")
    props = head_props(obj)
    weights = head.get("expression") or {}
    if weights:
        with live_deform.suspended():
            for name, value in weights.items():
                setattr(props.expressions, name, float(value))
    props.is_head = True
    props.head_json = json.dumps(dict(head, expression={}), separators=(",", ":"))
    props.seed = seed
    props.resolution = resolution
    hs = backend_service.handshake()
    if hs is not None:
        props.model_name = hs.model_name
        props.trained = hs.trained
    if not props.regions:
        for region in backend_service.regions():
            item = props.regions.add()
            item.name = str(region["name"])
            item.region_id = int(region["id"])
            item.mirror = int(region.get("mirror", -1) if region.get("mirror") is not None else -1)


def add_parts(obj: bpy.types.Object) -> None:
    """Eyes, teeth, gums and tongue fitted to the head's current mesh, and its skin material."""
    from . import identity  # it imports this module

    regions = {r["name"]: int(r["id"]) for r in backend_service.regions()}
    materials.assign(obj, materials.skin())
    try:
        face_parts.attach(obj, [regions[n] for n in face_parts.EYEBALL_REGIONS if n in regions])
    except ValueError as exc:  # a head without parts is still a head: say why, keep going
        face_parts.remove(obj)
        backend_service.report_problem(f"{obj.name}: no eyes or teeth ({exc})")
    identity.store(obj)


HEAD_GAP_M = 0.05


def move_beside_others(scene: bpy.types.Scene, obj: bpy.types.Object) -> None:
    """Step a new head along +X until its bounds clear every other head's (with a gap), so heads added at the
    same cursor stand side by side instead of inside each other."""
    bpy.context.view_layer.update()
    others = [_world_bounds(o) for o in scene.objects if o is not obj and o.type == "MESH" and head_props(o).is_head]
    lo, hi = _world_bounds(obj)
    step = float(hi[0] - lo[0]) + HEAD_GAP_M
    shift = 0.0
    while any((lo + [shift, 0, 0] < o_hi).all() and (hi + [shift, 0, 0] > o_lo).all() for o_lo, o_hi in others):
        shift += step
    if shift:
        obj.location.x += shift


def _world_bounds(obj: bpy.types.Object) -> tuple[np.ndarray, np.ndarray]:
    m = np.array(obj.matrix_world)
    corners = np.array([list(c) for c in obj.bound_box]) @ m[:3, :3].T + m[:3, 3]
    return corners.min(0), corners.max(0)


def _make_active(scene: bpy.types.Scene, obj: bpy.types.Object) -> None:
    for view_layer in scene.view_layers:
        for other in view_layer.objects:
            other.select_set(False, view_layer=view_layer)
        obj.select_set(True, view_layer=view_layer)
        view_layer.objects.active = obj
