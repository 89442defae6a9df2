"""Per-object imHead state (several heads may share a scene) and the scene's settings for new heads.

Everything an artist tweaks is an animatable Float/Int property so it can be keyframed.
"""

import bpy

from . import expressions

ANIMATABLE = {"ANIMATABLE"}


PCA_SLIDERS = 8  # leading principal directions per region shown as sliders (the backend keeps the rest)
SLIDER_RANGE = 5.0  # the backend's limit, in standard deviations


IDENTITY_SLIDERS = 12  # identity.COUNT (not imported here: identity imports the head modules)


def _sliders_changed(self, context):
    from . import region_edit

    region_edit.request_sliders(self.id_data, self.name)


def _identity_changed(self, context):
    from . import identity

    identity.on_update(self, context)


def _expression_changed(self, context):
    # Imported here: these modules import this one for the PropertyGroup types.
    from . import backend_service, live_deform

    try:
        live_deform.request_for_object(self.id_data)
    except backend_service.BackendUnavailable:
        pass  # the panel's status box says why; an update callback has no way to report


def _expression_annotations() -> dict:
    return {
        name: bpy.props.FloatProperty(
            name=expressions.pretty(name),
            description=f"ICT-FaceKit / ARKit expression '{name}'",
            min=0.0, max=1.0, default=0.0,
            options={"ANIMATABLE"},  # ANIMATABLE, spelled out so that mypy reads it as the options' literal
            update=_expression_changed,
        )
        for name in expressions.EXPRESSION_NAMES
    }


ImHeadExpressions = type(
    "ImHeadExpressions",
    (bpy.types.PropertyGroup,),
    {"__annotations__": _expression_annotations(), "__doc__": "53 keyframeable expression weights"},
)


class ImHeadRegion(bpy.types.PropertyGroup):
    """One of the 39 regions (name, id and mirror partner from the handshake); `selected` marks it for
    randomise / swap."""

    region_id: bpy.props.IntProperty(options=set())
    mirror: bpy.props.IntProperty(default=-1, options=set())
    selected: bpy.props.BoolProperty(name="Selected", default=False, options=set())
    sliders: bpy.props.FloatVectorProperty(
        name="Shape", size=PCA_SLIDERS, default=(0.0,) * PCA_SLIDERS,
        min=-SLIDER_RANGE, max=SLIDER_RANGE, soft_min=-3.0, soft_max=3.0,
        description="Position along this region's leading principal directions, in standard deviations",
        options=ANIMATABLE, update=_sliders_changed)
    applied: bpy.props.FloatVectorProperty(
        size=PCA_SLIDERS, default=(0.0,) * PCA_SLIDERS, options=set(),
        description="The backend's slider positions for this head (what Symmetric editing measures moves from)")


def _redraw_material(self, context):
    # Object attributes feed the shaders; tag the object so viewport and renders pick up the new value.
    self.id_data.update_tag()
    for child in self.id_data.children:
        child.update_tag()


def _is_other_head(self, obj) -> bool:
    return obj.imhead.is_head and obj != self.id_data


class ImHeadObjectProperties(bpy.types.PropertyGroup):
    is_head: bpy.props.BoolProperty(default=False, options=set())
    head_json: bpy.props.StringProperty(
        name="Head", description="HeadSpec JSON (imhead-head/1): identity code, region overrides",
        options=set())
    seed: bpy.props.IntProperty(name="Seed", min=0, default=0, options=ANIMATABLE)
    resolution: bpy.props.IntProperty(name="Resolution", min=16, max=1024, default=128, options=ANIMATABLE)
    model_name: bpy.props.StringProperty(name="Model", options=set())
    trained: bpy.props.BoolProperty(name="Trained", options=set())
    expressions: bpy.props.PointerProperty(type=ImHeadExpressions)
    regions: bpy.props.CollectionProperty(type=ImHeadRegion)
    active_region: bpy.props.IntProperty(name="Region", default=0, min=0, options=set())
    swap_source: bpy.props.PointerProperty(
        name="Other Head", type=bpy.types.Object, poll=_is_other_head,
        description="Another imHead object to swap or blend the selected regions from")
    sliders_known: bpy.props.BoolProperty(
        default=False, options=set(), description="Region sliders hold the backend's positions for this head")
    blend_amount: bpy.props.FloatProperty(
        name="Amount", min=0.0, max=1.0, default=0.5, options=ANIMATABLE,
        description="How far Blend moves the selected regions toward the other head's")
    randomise_scale: bpy.props.FloatProperty(
        name="Scale", min=0.0, max=SLIDER_RANGE, default=1.0, options=ANIMATABLE,
        description="Spread of Randomise, in standard deviations of the training heads")
    fit_error_mm: bpy.props.FloatProperty(name="Fit Error (mm)", default=-1.0, options=set())
    identity: bpy.props.FloatVectorProperty(
        name="Identity", size=IDENTITY_SLIDERS, default=(0.0,) * IDENTITY_SLIDERS,
        min=-SLIDER_RANGE, max=SLIDER_RANGE, soft_min=-3.0, soft_max=3.0, options=ANIMATABLE,
        update=_identity_changed,
        description="Position along the model's leading identity directions, in standard deviations")
    randomise_strength: bpy.props.FloatProperty(
        name="Strength", min=0.0, max=SLIDER_RANGE, default=1.0, options=ANIMATABLE,
        description="Spread of the random identity, in standard deviations (0: the average head)")
    symmetric: bpy.props.BoolProperty(
        name="Symmetric", default=True, options=set(),
        description="Region slider edits also apply the mirrored change to the region's mirror partner")
    # Read by the shared materials through Attribute nodes (type OBJECT), so each head keeps its own look.
    skin_tone: bpy.props.FloatProperty(
        name="Skin Tone", min=0.0, max=1.0, default=0.3, options=ANIMATABLE,
        description="From pale (0) through tan to deep brown (1)", update=_redraw_material)
    skin_redness: bpy.props.FloatProperty(
        name="Redness", min=0.0, max=1.0, default=0.5, options=ANIMATABLE,
        description="Flush of lips, nose and cheeks", update=_redraw_material)
    iris_hue: bpy.props.FloatProperty(
        name="Iris Hue", min=0.0, max=1.0, default=0.5, options=ANIMATABLE,
        description="Hue shift of the iris colour (0.5: the material's own blue-grey)", update=_redraw_material)
    blend_json: bpy.props.StringProperty(
        options=set(), description="The last Blend's base head, regions and other head (JSON): a keyframed "
        "Amount re-blends from it on frame change")


class ImHeadSceneSettings(bpy.types.PropertyGroup):
    """Parameters for the next Generate."""

    seed: bpy.props.IntProperty(name="Seed", min=0, default=0, options=ANIMATABLE)
    random_seed: bpy.props.BoolProperty(
        name="Random Seed", description="Pick a new seed on every Generate", default=False, options=set())
    resolution: bpy.props.IntProperty(
        name="Resolution", min=16, max=1024, default=128, options=ANIMATABLE,
        description="Marching-cubes cells along the longest side of the 0.40 m canonical box")


def head_props(obj: bpy.types.Object) -> ImHeadObjectProperties:
    """`obj.imhead`, typed: register() adds that pointer to every Object at run time, out of the stubs' sight."""
    return obj.imhead  # type: ignore[attr-defined]


CLASSES = (ImHeadExpressions, ImHeadRegion, ImHeadObjectProperties, ImHeadSceneSettings)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    # Blender's documented way to extend its types; the stubs declare no such attribute.
    bpy.types.Object.imhead = bpy.props.PointerProperty(type=ImHeadObjectProperties)  # type: ignore[attr-defined]
    bpy.types.Scene.imhead = bpy.props.PointerProperty(type=ImHeadSceneSettings)  # type: ignore[attr-defined]


def unregister() -> None:
    del bpy.types.Scene.imhead  # type: ignore[attr-defined]
    del bpy.types.Object.imhead  # type: ignore[attr-defined]
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
