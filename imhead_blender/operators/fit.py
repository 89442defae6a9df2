"""Fit an imHead head to an imported character (any mesh: topology, units, position and orientation)."""

from functools import partial

import bpy
import numpy as np
from mathutils import Matrix

from .. import axes, backend_service, head_objects, live_deform, mesh_build, region_edit, undo
from ..client import payloads
from .common import BackendOperator

MAX_POINTS = 5_000_000  # the backend refuses more; say so before sending hundreds of MB
# Vertex groups named LANDMARK_PREFIX + a region name ("imhead:nose tip", "imhead:chin", "imhead:left ear", ...)
# are landmarks: each group's weighted centre is pinned to that region's anchor point during the alignment.
# A prefix, not bare region names: rigged characters carry skinning groups such as "chin" or "jaw".
LANDMARK_PREFIX = "imhead:"


class IMHEAD_OT_fit_selected(BackendOperator, bpy.types.Operator):
    """Fit the model to the active mesh object; the fitted head is added as a new imHead object that
    overlays it (same transform), editable and swappable like a generated one"""

    bl_idname = "imhead.fit_selected"
    bl_label = "Fit to Selected Mesh"
    bl_options = {"REGISTER"}  # no undo step: the result arrives later, from pump_backend()

    steps: bpy.props.IntProperty(
        name="Steps", min=0, max=5000, default=0,
        description="Optimisation steps for the identity and expression codes (0: the backend's default)")
    fit_expression: bpy.props.BoolProperty(
        name="Fit Expression", default=True,
        description="Also fit expression weights (they land in the head's expression controls)")
    use_landmarks: bpy.props.BoolProperty(
        name="Landmarks from Vertex Groups", default=True,
        description="Vertex groups named 'imhead:<region>' (e.g. 'imhead:nose tip', 'imhead:chin', "
        "'imhead:left ear'; at least 3) pin those regions' anchors to the groups' centres for the alignment")

    @classmethod
    def poll(cls, context):
        obj = context.active_object
        return obj is not None and obj.type == "MESH" and not obj.imhead.is_head

    def invoke(self, context, event):
        return context.window_manager.invoke_props_dialog(self)

    def submit_job(self, context):
        obj = context.active_object
        points, normals, triangles = mesh_build.evaluated_points(obj, context.evaluated_depsgraph_get())
        if len(points) < 3 or len(triangles) == 0:
            self.report({"ERROR"}, f"'{obj.name}' has no faces to fit to")
            return {"CANCELLED"}
        if len(points) > MAX_POINTS:
            self.report({"ERROR"}, f"'{obj.name}' has {len(points)} vertices; at most {MAX_POINTS} can be fitted "
                                   "(decimate it first)")
            return {"CANCELLED"}
        if not np.isfinite(points).all():
            self.report({"ERROR"}, f"'{obj.name}' has NaN or infinite vertex coordinates")
            return {"CANCELLED"}
        # The object's own frame, turned into the backend's axes (a pure rotation, undone on the way back),
        # so a character modelled Z-up facing -Y starts out roughly upright for the robust alignment.
        names, centres = [], None
        if self.use_landmarks:
            names, centres = landmark_groups(obj, points)
            if 0 < len(names) < 3:
                self.report({"ERROR"}, f"'{obj.name}' has {len(names)} landmark vertex group(s) "
                                       f"('{LANDMARK_PREFIX}<region>'); the alignment needs at least 3, or none")
                return {"CANCELLED"}
        scene = context.scene
        request = payloads.FitRequest(
            axes.blender_to_backend(points), faces=triangles, normals=axes.blender_to_backend(normals),
            landmarks=axes.blender_to_backend(centres).astype(np.float32) if names else None,
            landmark_regions=names or None, resolution=scene.imhead.resolution, steps=self.steps or None,
            fit_expression=self.fit_expression)
        backend_service.submit(request, label=f"Fit {obj.name}", object_name=obj.name,
                               on_success=partial(_add_fitted, scene.name, obj.name, scene.imhead.resolution))
        return {"FINISHED"}


def landmark_group_names(obj) -> list[str]:
    return [g.name for g in obj.vertex_groups if g.name.lower().startswith(LANDMARK_PREFIX)]


def landmark_groups(obj, evaluated: np.ndarray | None = None) -> tuple[list[str], np.ndarray]:
    """The object's landmark vertex groups: region names (the prefix cut off) and the weighted centres (L,3) of
    their vertices in object space, the frame of the points sent (groups with no weighted vertex are left out;
    the backend rejects names that are not regions, listing the valid ones). Vertex positions come from
    `evaluated` (the evaluated mesh's, e.g. posed by an armature) when it has the same vertices, else from the
    mesh data."""
    use_evaluated = evaluated is not None and len(evaluated) == len(obj.data.vertices)
    index = {g.index: g.name[len(LANDMARK_PREFIX):].strip() for g in obj.vertex_groups
             if g.name.lower().startswith(LANDMARK_PREFIX)}
    if not index:
        return [], np.zeros((0, 3))
    sums, weights = np.zeros((len(index), 3)), np.zeros(len(index))
    slot = {g: i for i, g in enumerate(index)}
    for v in obj.data.vertices:
        for ge in v.groups:
            i = slot.get(ge.group)
            if i is not None and ge.weight > 0:
                sums[i] += ge.weight * (evaluated[v.index] if use_evaluated and evaluated is not None
                                         else np.array(v.co))
                weights[i] += ge.weight
    names = list(index.values())
    used = np.flatnonzero(weights > 0)
    return [names[i] for i in used], sums[used] / weights[used, None]


def fit_error_mm(params: dict) -> float:
    """The reply's trimmed one-sided Chamfer distance (input -> fitted head), in millimetres."""
    value = (params.get("error") or {}).get("trimmed_one_sided_cd_mm")
    return -1.0 if value is None else float(value)


def _add_fitted(scene_name: str, source_name: str, resolution: int, params: dict, arrays: dict) -> None:
    scene, source = bpy.data.scenes.get(scene_name), bpy.data.objects.get(source_name)
    if scene is None or source is None:
        return
    sim = params["transform"]
    scale, rotation = float(sim["scale"]), np.asarray(sim["rotation"], np.float64)
    translation = np.asarray(sim["translation"], np.float64)
    # The reply's vertices are in the input's frame; the head object keeps them in the model frame (like
    # every imHead object, so live deform and region edits apply) and its transform does the overlay.
    model = dict(arrays)
    model["vertices"] = (scale * arrays["vertices"].astype(np.float64) @ rotation.T + translation).astype(np.float32)
    obj = head_objects.create_head_object(scene, f"{source_name}.imHead", params["head"], model, seed=0,
                                          resolution=resolution)
    obj.matrix_world = source.matrix_world @ Matrix(axes.similarity_to_object_matrix(scale, rotation, translation))
    obj.imhead.fit_error_mm = fit_error_mm(params)
    region_edit.store_sliders(obj, params.get("sliders"))
    live_deform.mark_shown(obj)
    undo.push("imHead fit")


CLASSES = (IMHEAD_OT_fit_selected,)
