"""Eyes, teeth, gums and tongue for every head, from the ICT-FaceKit meshes shipped in
weights/face_parts.safetensors (MIT; built by tools/build_face_parts.py).

Those meshes are in the frame of the mean ICT neutral head, the model's template, and every generated vertex
carries its position on that template (`imhead_template`) next to its own (`imhead_canonical`). So each part is
placed by the similarity (scale, rotation, translation; Umeyama) that best maps the template positions of the
head's vertices around it onto their canonical positions: the eyes from the vertices within EYE_WINDOW eye radii
of each eye centre, the mouth parts from those within MOUTH_WINDOW_M of the teeth.

Each part is a child object of the head (rebuilt with it, exported with it, moved with it). Eyes pivot at their
fitted sphere's centre: gaze is their rotation, which the user may key, plus drivers from the head's eyeLook*
expression weights (so an imported ARKit/CSV performance moves them). The lower teeth and the lower gums with
the tongue carry ICT's own jaw displacements as shape keys, driven by the head's jaw expression weights: they
follow the jaw live, in keyframed and baked animation alike, with no backend request.
"""

import json
import math
from dataclasses import dataclass
from functools import lru_cache

import bpy
import numpy as np

from . import axes, materials, mesh_build, preferences, safetensors_read

ASSET = "face_parts.safetensors"
PART_KEY = "imhead_part"  # custom property on each part object: its kind
EYE_WINDOW = 1.35  # in eye radii around the eye centre (sclera and lids)
MOUTH_WINDOW_M = 0.035  # around the teeth's centre (lips, chin, cheeks next to the mouth)
EYEBALL_REGIONS = ("left eyeball", "right eyeball")
LIP_EDGE_M = 0.003
LIP_DEPTH_M = 0.012  # vertices this far behind the contour's back are not on the lips (the head behind them)
MIN_VERTICES = 24
WINDOW_GROWTH = (1.0, 1.5, 2.0, 3.0)
EYE_MARGIN = 1.0  # the head's own eyeball faces are hidden (skin_masks): the ICT shell as the model learnt it
# The generated lips are a little fuller than ICT's at the closed mouth, where the teeth tips would show
# through the slit: the mouth parts sit this much farther back (template frame, -Z).
MOUTH_INSET_M = 0.002
GAZE_YAW_DEG, GAZE_PITCH_DEG = 35.0, 25.0  # eyeLookIn/Out and eyeLookUp/Down at weight 1


@dataclass(frozen=True)
class Part:
    kind: str
    asset: str
    material: str  # "eye", "teeth" or "gums"
    jaw: bool = False


PARTS = (
    Part("Eye.L", "eye_left", "eye"),
    Part("Eye.R", "eye_right", "eye"),
    Part("Teeth.Upper", "upper_teeth", "teeth"),
    Part("Teeth.Lower", "lower_teeth", "teeth", jaw=True),
    Part("Gums.Upper", "upper_gums", "gums"),
    Part("Gums.Lower", "lower_gums_tongue", "gums", jaw=True),
)


@lru_cache(maxsize=1)
def asset() -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    """The shipped arrays and the jaw expressions' names; raises ValueError when the file is missing or bad."""
    path = preferences.backend_root() / "weights" / ASSET
    if not path.is_file():
        raise ValueError(f"{path} is missing: reinstall the extension")
    arrays, meta = safetensors_read.read(path)
    return arrays, tuple(json.loads(meta.get("jaw_expressions", "[]")))


def similarity(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(s, R, t) minimising |s R src + t - dst|^2 over rows (Umeyama 1991)."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    ms, md = src.mean(0), dst.mean(0)
    a, b = src - ms, dst - md
    u, sig, vt = np.linalg.svd(b.T @ a / len(src))
    d = np.ones(3)
    d[2] = np.sign(np.linalg.det(u @ vt)) or 1.0
    r = u @ np.diag(d) @ vt
    var = (a ** 2).sum() / len(src)
    s = float((sig * d).sum() / var)
    return s, r, md - s * r @ ms


def placement(template: np.ndarray, canonical: np.ndarray, centre: np.ndarray, radius: float
              ) -> tuple[float, np.ndarray, np.ndarray]:
    """Similarity from the template frame to this head's canonical frame around `centre` (backend axes). Coarse
    meshes have few vertices there: the window widens (WINDOW_GROWTH) until it holds MIN_VERTICES."""
    distance = np.linalg.norm(template - centre, axis=1)
    for growth in WINDOW_GROWTH:
        near = distance < radius * growth
        if near.sum() >= MIN_VERTICES:
            return similarity(template[near], canonical[near])
    raise ValueError(f"only {int(near.sum())} head vertices near template point {np.round(centre, 3).tolist()}")


def parts_of(head: bpy.types.Object) -> list[bpy.types.Object]:
    return [c for c in head.children if PART_KEY in c.keys()]


def remove(head: bpy.types.Object) -> None:
    for child in parts_of(head):
        mesh = mesh_build.mesh_of(child)
        bpy.data.objects.remove(child)
        if mesh is not None and mesh.users == 0:
            bpy.data.meshes.remove(mesh)


def attach(head: bpy.types.Object, eyeball_regions: list[int]) -> list[bpy.types.Object]:
    """(Re)build the head's eyes, teeth, gums and tongue from its current mesh, and its skin masks (lips;
    its own eyeball faces hidden); returns the new parts."""
    arrays, jaw_names = asset()
    mesh = mesh_build.mesh_of(head)
    template = axes.blender_to_backend(mesh_build.read_point_vector(mesh, mesh_build.TEMPLATE)).astype(np.float64)
    canonical = axes.blender_to_backend(mesh_build.read_point_vector(mesh, mesh_build.CANONICAL)).astype(np.float64)
    remove(head)
    eye_sim = [placement(template, canonical, arrays["eye_centre"][i], EYE_WINDOW * float(arrays["eye_radius"][i]))
               for i in range(2)]
    mouth_sim = placement(template, canonical, arrays["mouth_centre"], MOUTH_WINDOW_M)
    made = []
    for part in PARTS:
        if part.material == "eye":
            side = 0 if part.kind.endswith(".L") else 1
            obj = _eye(head, part, arrays, eye_sim[side], side)
        else:
            obj = _mouth_part(head, part, arrays, mouth_sim, jaw_names)
        made.append(obj)
    skin_masks(head, template, arrays["lip_contour"], eyeball_regions)
    return made


def skin_masks(head: bpy.types.Object, template: np.ndarray, lip_contour: np.ndarray,
               eyeball_regions: list[int]) -> None:
    """The `imhead_lips` weight (1 inside the outer lip contour seen from the front, a LIP_EDGE_M soft edge) and
    the head's own eyeball faces moved to the transparent second material slot: the eye objects replace them,
    and a fused sclera would otherwise show through wherever a turned eye is not."""
    mesh = head.data
    weight = lip_weight(template, lip_contour)
    attr = mesh.attributes.get(materials.LIPS_ATTRIBUTE) or mesh.attributes.new(
        materials.LIPS_ATTRIBUTE, "FLOAT", "POINT")
    attr.data.foreach_set("value", weight.astype(np.float32))
    region = np.empty(len(mesh.vertices), np.int32)
    mesh.attributes[mesh_build.REGION].data.foreach_get("value", region)
    tris = np.empty(len(mesh.polygons) * 3, np.int32)
    mesh.polygons.foreach_get("vertices", tris)
    on_eyeball = np.isin(region, eyeball_regions)[tris.reshape(-1, 3)].all(1)
    while len(mesh.materials) < 2:
        mesh.materials.append(None)
    mesh.materials[1] = materials.hidden()
    mesh.polygons.foreach_set("material_index", on_eyeball.astype(np.int32))
    mesh.update()


def lip_weight(template: np.ndarray, contour: np.ndarray) -> np.ndarray:
    """Per vertex: 1 inside the lip contour (x, y of the template, front of the face only), falling to 0 over
    LIP_EDGE_M across it."""
    p, c = template[:, :2], np.asarray(contour, np.float64)[:, :2]
    a, b = c, np.roll(c, -1, axis=0)
    ab = b - a
    t = np.clip(((p[:, None] - a) * ab).sum(-1) / (ab ** 2).sum(-1), 0.0, 1.0)
    dist = np.linalg.norm(p[:, None] - (a + t[..., None] * ab), axis=-1).min(1)
    crosses = ((a[:, 1] > p[:, 1, None]) != (b[:, 1] > p[:, 1, None])) & (
        p[:, 0, None] < a[:, 0] + (p[:, 1, None] - a[:, 1]) * ab[:, 0] / np.where(ab[:, 1] == 0, 1e-12, ab[:, 1]))
    inside = crosses.sum(1) % 2 == 1
    signed = np.where(inside, dist, -dist)
    front = template[:, 2] > np.asarray(contour)[:, 2].min() - LIP_DEPTH_M
    return np.clip(0.5 + signed / LIP_EDGE_M, 0.0, 1.0) * front


def _to_blender(points_backend: np.ndarray, sim) -> np.ndarray:
    s, r, t = sim
    return axes.backend_to_blender(s * np.asarray(points_backend, np.float64) @ r.T + t)


def _new_part(head: bpy.types.Object, part: Part, name_suffix: str, co: np.ndarray, faces: np.ndarray
              ) -> bpy.types.Object:
    mesh = bpy.data.meshes.new(f"{head.name}.{name_suffix}")
    mesh_build.fill_mesh(mesh, co, faces, {}, vertices_in_backend_axes=False)
    obj = bpy.data.objects.new(f"{head.name}.{name_suffix}", mesh)
    for collection in head.users_collection:
        collection.objects.link(obj)
    obj[PART_KEY] = part.kind
    obj.parent = head
    obj.matrix_parent_inverse.identity()
    material = {"eye": materials.eye, "teeth": materials.teeth, "gums": materials.gums}[part.material]()
    materials.assign(obj, material)
    return obj


def _eye(head: bpy.types.Object, part: Part, arrays: dict, sim, side: int) -> bpy.types.Object:
    s, r, _t = sim
    centre = _to_blender(arrays["eye_centre"][side][None], sim)[0]
    radius = float(arrays["eye_radius"][side])
    verts = arrays[f"{part.asset}_vertices"].astype(np.float64)
    local = (verts - arrays["eye_centre"][side]) * EYE_MARGIN  # about the pivot, still in template axes
    co = axes.backend_to_blender(s * local @ r.T)
    obj = _new_part(head, part, part.kind, co, arrays[f"{part.asset}_faces"])
    obj.location = centre
    # A frontal projection of the template eyeball (looking along +Z): UV (0.5, 0.5) on the gaze axis, 0.5 away
    # at one radius; the back half maps to a corner (sclera).
    uv = 0.5 + 0.5 * local[:, :2] / (radius * EYE_MARGIN)
    uv[local[:, 2] <= 0.0] = 1.0
    faces = arrays[f"{part.asset}_faces"]
    layer = obj.data.uv_layers.new(name=mesh_build.UV_NAME)
    layer.data.foreach_set("uv", uv[faces.ravel()].astype(np.float32).ravel())
    _gaze_drivers(obj, head, "L" if side == 0 else "R")
    # The eye material reads the iris hue from the object it shades: follow the head's control.
    driver = obj.driver_add("imhead.iris_hue").driver
    driver.type = "AVERAGE"
    _driver_var(driver, "hue", head, "iris_hue", "imhead.")
    return obj


def _gaze_drivers(obj: bpy.types.Object, head: bpy.types.Object, side: str) -> None:
    """delta_rotation_euler from the eyeLook* weights (rotation_euler stays free for the artist's own keys).
    Looking up turns -Y (the gaze) toward +Z: a negative X rotation; looking toward +x: a positive Z rotation.
    The subject's left eye looks out toward +x, the right eye toward -x."""
    pitch, yaw = math.radians(GAZE_PITCH_DEG), math.radians(GAZE_YAW_DEG)
    toward_plus_x = ("eyeLookOut_L", "eyeLookIn_L") if side == "L" else ("eyeLookIn_R", "eyeLookOut_R")
    for index, (pos, neg), gain in ((0, (f"eyeLookDown_{side}", f"eyeLookUp_{side}"), pitch),
                                    (2, toward_plus_x, yaw)):
        fcurve = obj.driver_add("delta_rotation_euler", index)
        driver = fcurve.driver
        driver.type = "SCRIPTED"
        _driver_var(driver, "a", head, pos)
        _driver_var(driver, "b", head, neg)
        driver.expression = f"(a - b) * {gain:.6f}"


def _driver_var(driver, name: str, head: bpy.types.Object, prop: str, prefix: str = "imhead.expressions.") -> None:
    var = driver.variables.new()
    var.name = name
    var.type = "SINGLE_PROP"
    var.targets[0].id_type = "OBJECT"
    var.targets[0].id = head
    var.targets[0].data_path = f"{prefix}{prop}"


def _mouth_part(head: bpy.types.Object, part: Part, arrays: dict, sim, jaw_names: tuple[str, ...]
                ) -> bpy.types.Object:
    co = _to_blender(arrays[f"{part.asset}_vertices"] - np.array([0.0, 0.0, MOUTH_INSET_M]), sim)
    obj = _new_part(head, part, part.kind, co, arrays[f"{part.asset}_faces"])
    if part.jaw:
        s, r, _t = sim
        deltas = arrays[f"{part.asset}_deltas"]
        obj.shape_key_add(name="Basis", from_mix=False)
        for k, name in enumerate(jaw_names):
            block = obj.shape_key_add(name=name, from_mix=False)
            moved = co + axes.backend_to_blender(s * deltas[k].astype(np.float64) @ r.T)
            block.data.foreach_set("co", moved.astype(np.float32).ravel())
            driver = block.driver_add("value").driver
            driver.type = "AVERAGE"
            _driver_var(driver, "w", head, name)
    return obj
