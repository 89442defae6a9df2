"""The "imHead" tab in the 3D viewport sidebar."""

import time
from typing import TYPE_CHECKING

import bpy

from . import backend_service, deform_jobs, expressions, identity, live_deform, preferences, region_edit, shape_keys
from .operators import fit as fit_ops
from .operators.common import active_head


if TYPE_CHECKING:
    _PanelMixin = bpy.types.Panel  # so that mypy checks the mixin's settings against Panel's literal types
else:
    _PanelMixin = object  # Blender registers the panels below, which list bpy.types.Panel after the mixin


class _ImHeadPanel(_PanelMixin):
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "imHead"


class _HeadSubPanel(_ImHeadPanel):
    """A sub-panel of the imHead tab shown only while an imHead head is active."""

    bl_parent_id = "IMHEAD_PT_main"

    @classmethod
    def poll(cls, context):
        return active_head(context) is not None


class IMHEAD_PT_main(_ImHeadPanel, bpy.types.Panel):
    bl_label = "imHead"

    def draw(self, context):
        layout = self.layout
        if preferences.get_preferences(context).start_with_panel:
            backend_service.prestart()
        _draw_backend_status(layout)
        settings = context.scene.imhead
        col = layout.column(align=True)
        row = col.row(align=True)
        row.prop(settings, "seed")
        row.prop(settings, "random_seed", text="", icon="FILE_REFRESH")
        col.prop(settings, "resolution")
        layout.operator("imhead.generate", icon="USER")
        for job in backend_service.jobs():
            box = layout.box()
            row = box.row(align=True)
            message = job.future.message or "waiting"
            elapsed = time.monotonic() - job.started
            row.progress(factor=float(job.future.progress), type="BAR",
                         text=f"{job.label}: {message} ({elapsed:.0f} s)")
            op = row.operator("imhead.cancel_job", text="", icon="CANCEL")
            op.request_id = job.request_id


def _draw_backend_status(layout) -> None:
    state, text = backend_service.status()
    box = layout.box()
    if state == "READY":
        hs = backend_service.handshake()
        row = box.row()
        row.label(text=f"{hs.model_name} on {hs.torch_device}", icon="CHECKMARK")
        sub = box.row()
        sub.alert = not hs.trained
        sub.label(text="TRAINED weights" if hs.trained else "UNTRAINED weights (geometric init only)",
                  icon="INFO" if hs.trained else "ERROR")
        if text:
            _draw_error(box, text)
        if backend_service.notice():
            for line in _wrap(backend_service.notice()):
                box.label(text=line, icon="INFO")
    elif state == "STARTING":
        box.label(text="Starting backend...", icon="SORTTIME")
    elif state in ("ERROR", "HUNG"):
        _draw_error(box, text)
        box.operator("imhead.restart_backend", icon="FILE_REFRESH")
    else:
        box.label(text="Backend starts on first use", icon="DOT")


ERROR_LINES = 8  # the full text (backend stderr tail included) is in the console / system report


def _draw_error(layout, text: str) -> None:
    """Labels do not wrap and the sidebar is narrow: wrap by words, cap the number of lines."""
    lines = _wrap(text)
    col = layout.column(align=True)
    col.alert = True
    for i, line in enumerate(lines):
        col.label(text=line, icon="ERROR" if i == 0 else "BLANK1")


def _wrap(text: str) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + len(word) > 40:
            lines.append(line)
            line = ""
        line = f"{line} {word}".strip()
    if line:
        lines.append(line)
    if len(lines) > ERROR_LINES:
        lines = lines[: ERROR_LINES - 1] + [lines[ERROR_LINES - 1] + " ..."]
    return lines


class IMHEAD_PT_head(_HeadSubPanel, bpy.types.Panel):
    bl_label = "Active Head"

    def draw(self, context):
        obj = active_head(context)
        props = obj.imhead
        layout = self.layout
        col = layout.column(align=True)
        col.label(text=f"{obj.name}: seed {props.seed}, {len(obj.data.vertices)} vertices")
        col.label(text=f"Model {props.model_name or '?'} ({'trained' if props.trained else 'UNTRAINED'})")
        if props.fit_error_mm >= 0.0:
            col.label(text=f"Fit error {props.fit_error_mm:.2f} mm")
        row = layout.row(align=True)
        row.prop(props, "resolution")
        row.operator("imhead.regenerate", text="", icon="FILE_REFRESH")
        layout.operator("imhead.apply_as_mesh", icon="MESH_DATA")


class IMHEAD_PT_identity(_HeadSubPanel, bpy.types.Panel):
    bl_label = "Identity"

    def draw(self, context):
        obj = active_head(context)
        props = obj.imhead
        layout = self.layout
        row = layout.row(align=True)
        row.operator("imhead.randomise_identity", text="Randomise", icon="FILE_REFRESH")
        row.prop(props, "randomise_strength")
        if identity.busy(obj.name):
            layout.label(text="Rebuilding...", icon="SORTTIME")
        try:
            names = identity.stats().names
        except ValueError as exc:
            _draw_error(layout, str(exc))
            return
        col = layout.column(align=True)
        for i, name in enumerate(names):
            col.prop(props, "identity", index=i, text=name, slider=True)


class IMHEAD_PT_look(_HeadSubPanel, bpy.types.Panel):
    bl_label = "Look"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        props = active_head(context).imhead
        col = self.layout.column(align=True)
        for name in ("skin_tone", "skin_redness", "iris_hue"):
            col.prop(props, name, slider=True)


class IMHEAD_PT_expressions(_HeadSubPanel, bpy.types.Panel):
    bl_label = "Expressions"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        obj = active_head(context)
        layout = self.layout
        row = layout.row(align=True)
        row.operator("imhead.reset_expressions", icon="LOOP_BACK")
        row.operator("imhead.bake_expressions", text="Bake", icon="SHAPEKEY_DATA")
        row = layout.row(align=True)
        row.operator("imhead.arkit_shape_keys", text="ARKit Keys", icon="SHAPEKEY_DATA")
        row.operator("imhead.import_capture", text="Import CSV", icon="IMPORT")
        row.operator("imhead.export_capture", text="Export CSV", icon="EXPORT")
        for chain in deform_jobs.running(obj.name):
            row = layout.row(align=True)
            row.progress(factor=chain.done / chain.total, type="BAR",
                         text=f"{chain.label}: {chain.done}/{chain.total} frames")
            row.operator("imhead.cancel_bake", text="", icon="CANCEL")
        if shape_keys.has_arkit_keys(obj):
            layout.label(text="ARKit shape keys follow the controls", icon="INFO")
            layout.operator("imhead.keyframe_shape_keys", icon="KEY_HLT")
        elif live_deform.is_baked(obj):
            layout.label(text="Baked to shape keys: delete them for live editing", icon="INFO")
        stats = live_deform.stats(obj.name)
        if stats is not None and stats[0] >= 0.0:
            layout.label(text=f"Residual p99 {stats[0] * 1000:.3f} mm, {stats[1]} not converged")
        weights = obj.imhead.expressions
        for title, prefix in expressions.GROUPS:
            header, body = layout.panel(f"imhead_expr_{prefix}", default_closed=True)
            header.label(text=title)
            if body is not None:
                col = body.column(align=True)
                for name in expressions.group_members(prefix):
                    col.prop(weights, name, slider=True)


class IMHEAD_UL_regions(bpy.types.UIList):
    def draw_item(self, context, layout, data, item, icon, active_data, active_propname, index=0):
        row = layout.row(align=True)
        row.prop(item, "selected", text="")
        row.label(text=item.name)


class IMHEAD_PT_regions(_HeadSubPanel, bpy.types.Panel):
    bl_label = "Regions"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        obj = active_head(context)
        props = obj.imhead
        layout = self.layout
        if not props.regions:
            layout.label(text="Region list arrives with the backend handshake", icon="INFO")
            return
        layout.template_list("IMHEAD_UL_regions", "", props, "regions", props, "active_region", rows=6)
        row = layout.row(align=True)
        for action, text in (("ALL", "All"), ("NONE", "None"), ("INVERT", "Invert"), ("MIRROR", "Mirror")):
            row.operator("imhead.region_select", text=text).action = action
        layout.prop(props, "symmetric")
        if region_edit.busy(obj.name):
            layout.label(text="Editing...", icon="SORTTIME")

        box = layout.box()
        if 0 <= props.active_region < len(props.regions):
            active = props.regions[props.active_region]
            box.label(text=f"{active.name}: principal directions (std)")
            if props.sliders_known:
                col = box.column(align=True)
                for i in range(len(active.sliders)):
                    col.prop(active, "sliders", index=i, text=f"Direction {i + 1}", slider=True)
            else:
                box.operator("imhead.region_edit", text="Edit Sliders", icon="OPTIONS").action = "LOAD_SLIDERS"

        col = layout.column(align=True)
        row = col.row(align=True)
        row.operator("imhead.region_edit", text="Randomise", icon="FILE_REFRESH").action = "RANDOMISE"
        row.prop(props, "randomise_scale")
        col.operator("imhead.region_edit", text="Reset to Identity", icon="LOOP_BACK").action = "RESET"

        col = layout.column(align=True)
        col.prop(props, "swap_source")
        row = col.row(align=True)
        row.operator("imhead.region_edit", text="Swap", icon="UV_SYNC_SELECT").action = "SWAP"
        row.operator("imhead.region_edit", text="Blend", icon="MOD_MASK").action = "BLEND"
        row.prop(props, "blend_amount")


class IMHEAD_PT_fit(_ImHeadPanel, bpy.types.Panel):
    bl_label = "Fit Imported Character"
    bl_parent_id = "IMHEAD_PT_main"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        layout = self.layout
        obj = context.active_object
        if obj is None or obj.type != "MESH" or obj.imhead.is_head:
            layout.label(text="Select a mesh (not an imHead head)", icon="INFO")
        else:
            count = len(fit_ops.landmark_group_names(obj))
            layout.label(text=f"Landmarks: {count} vertex group(s) '{fit_ops.LANDMARK_PREFIX}<region>'",
                         icon="CHECKMARK" if count >= 3 else "INFO")
        layout.operator("imhead.fit_selected", icon="MOD_SHRINKWRAP")


class IMHEAD_PT_footage(_ImHeadPanel, bpy.types.Panel):
    bl_label = "Head from Photo / Video"
    bl_parent_id = "IMHEAD_PT_main"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        layout = self.layout
        layout.label(text="One face; a photo or a short video", icon="INFO")
        layout.operator("imhead.head_from_footage", icon="FILE_MOVIE")


CLASSES = (IMHEAD_UL_regions, IMHEAD_PT_main, IMHEAD_PT_head, IMHEAD_PT_identity, IMHEAD_PT_look,
           IMHEAD_PT_expressions, IMHEAD_PT_regions, IMHEAD_PT_fit, IMHEAD_PT_footage)
