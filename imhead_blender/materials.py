"""Materials for a head and its parts: skin, eyes, teeth, gums. One node tree of each per file, shared by every
head; per-head looks come from the object's own keyframeable properties (`imhead.skin_tone`,
`imhead.skin_redness`, `imhead.iris_hue`) read through Attribute nodes of type OBJECT, so heads stay
independent and the controls animate like any other parameter.

Skin: Principled BSDF with subsurface scattering; a tone ramp (pale to deep brown) driven by the tone
control, redness on the lips (a soft-edged weight inside the template's outer lip contour), and mottling plus
pore bump from noise on the template position (the correspondence behind the template UVs, so the pattern sits
at the same place on every face, but continuous where the ICT UV layout has seams). The head keeps the template
UV map for the artist's own textures. Its own eyeball faces get the transparent second slot (the eye objects
show instead).
Eyes: the UV map written with each eyeball (a frontal projection, see face_parts) gives the distance from the
gaze axis: pupil, iris with radial fibres, limbal ring, sclera; a clear coat for the wet cornea.
"""

import bpy

SKIN, EYE, TEETH, GUMS = "imHead Skin", "imHead Eye", "imHead Teeth", "imHead Gums"
LIPS_ATTRIBUTE = "imhead_lips"  # FLOAT point attribute, 1 inside the outer lip contour (face_parts.skin_masks)
HIDDEN = "imHead Hidden"
PUPIL, IRIS, LIMBUS = 0.13, 0.36, 0.40  # radii on the frontal projection, in eyeball radii
SKIN_SSS_RADIUS = (1.0, 0.35, 0.2)
SKIN_SSS_SCALE_M = 0.006


def _principled(nodes):
    node = nodes.get("Principled BSDF")
    if node is None:
        node = nodes.new("ShaderNodeBsdfPrincipled")
    return node


def _new_material(name: str):
    mat = bpy.data.materials.new(name)
    mat.use_nodes = True
    return mat, mat.node_tree.nodes, mat.node_tree.links


def _object_value(nodes, path: str):
    node = nodes.new("ShaderNodeAttribute")
    node.attribute_type = "OBJECT"
    node.attribute_name = path
    return node


def _math(nodes, links, op: str, a, b=None, value: float | None = None):
    node = nodes.new("ShaderNodeMath")
    node.operation = op
    links.new(a, node.inputs[0])
    if b is not None:
        links.new(b, node.inputs[1])
    elif value is not None:
        node.inputs[1].default_value = value
    return node.outputs[0]


def skin() -> bpy.types.Material:
    """The shared skin material (made on first use)."""
    mat = bpy.data.materials.get(SKIN)
    if mat is not None:
        return mat
    mat, nodes, links = _new_material(SKIN)
    bsdf = _principled(nodes)
    tone = _object_value(nodes, "imhead.skin_tone")
    ramp = nodes.new("ShaderNodeValToRGB")
    stops = ((0.0, (0.86, 0.64, 0.53)), (0.35, (0.72, 0.48, 0.36)), (0.7, (0.42, 0.25, 0.16)),
             (1.0, (0.18, 0.10, 0.06)))
    ramp.color_ramp.elements[0].position, ramp.color_ramp.elements[0].color = stops[0][0], (*stops[0][1], 1)
    ramp.color_ramp.elements[1].position, ramp.color_ramp.elements[1].color = stops[-1][0], (*stops[-1][1], 1)
    for pos, col in stops[1:-1]:
        ramp.color_ramp.elements.new(pos).color = (*col, 1)
    links.new(tone.outputs["Fac"], ramp.inputs["Fac"])

    # Redness: the lips' weight (a point attribute with a soft edge, face_parts.skin_masks) times the control.
    lips = nodes.new("ShaderNodeAttribute")
    lips.attribute_type, lips.attribute_name = "GEOMETRY", LIPS_ATTRIBUTE
    redness = _object_value(nodes, "imhead.skin_redness")
    amount = _math(nodes, links, "MULTIPLY", lips.outputs["Fac"], redness.outputs["Fac"])

    # Mottling and pores from noise on the template position: the same spot of every face gets the same
    # pattern, like a texture in the shared ICT UV layout, but without that layout's seams.
    uv = nodes.new("ShaderNodeAttribute")
    uv.attribute_type, uv.attribute_name = "GEOMETRY", "imhead_template"
    noise = nodes.new("ShaderNodeTexNoise")
    noise.inputs["Scale"].default_value = 60.0
    noise.inputs["Detail"].default_value = 6.0
    links.new(uv.outputs["Vector"], noise.inputs["Vector"])
    mottle = _math(nodes, links, "MULTIPLY", _math(nodes, links, "SUBTRACT", noise.outputs["Fac"], value=0.5),
                   value=0.35)
    amount = _math(nodes, links, "ADD", amount, mottle)

    mix = nodes.new("ShaderNodeMix")
    mix.data_type = "RGBA"
    mix.blend_type = "MULTIPLY"
    mix.inputs["B"].default_value = (1.0, 0.55, 0.5, 1.0)
    links.new(_math(nodes, links, "MINIMUM", _math(nodes, links, "MAXIMUM", amount, value=0.0), value=1.0),
              mix.inputs["Factor"])
    links.new(ramp.outputs["Color"], mix.inputs["A"])
    links.new(mix.outputs["Result"], bsdf.inputs["Base Color"])

    pores = nodes.new("ShaderNodeTexNoise")
    pores.inputs["Scale"].default_value = 1500.0
    pores.inputs["Detail"].default_value = 2.0
    links.new(uv.outputs["Vector"], pores.inputs["Vector"])
    bump = nodes.new("ShaderNodeBump")
    bump.inputs["Strength"].default_value = 0.08
    bump.inputs["Distance"].default_value = 0.0002
    links.new(pores.outputs["Fac"], bump.inputs["Height"])
    links.new(bump.outputs["Normal"], bsdf.inputs["Normal"])

    bsdf.inputs["Subsurface Weight"].default_value = 0.35
    bsdf.inputs["Subsurface Radius"].default_value = SKIN_SSS_RADIUS
    bsdf.inputs["Subsurface Scale"].default_value = SKIN_SSS_SCALE_M
    bsdf.inputs["Roughness"].default_value = 0.58
    bsdf.inputs["Specular IOR Level"].default_value = 0.4
    return mat


def eye() -> bpy.types.Material:
    mat = bpy.data.materials.get(EYE)
    if mat is not None:
        return mat
    mat, nodes, links = _new_material(EYE)
    bsdf = _principled(nodes)
    uv = nodes.new("ShaderNodeUVMap")
    uv.uv_map = "UVMap"
    centred = nodes.new("ShaderNodeVectorMath")
    centred.operation = "SUBTRACT"
    centred.inputs[1].default_value = (0.5, 0.5, 0.0)
    links.new(uv.outputs["UV"], centred.inputs[0])
    length = nodes.new("ShaderNodeVectorMath")
    length.operation = "LENGTH"
    links.new(centred.outputs["Vector"], length.inputs[0])
    d = _math(nodes, links, "MULTIPLY", length.outputs["Value"], value=2.0)  # 0 on the gaze axis, 1 at the rim

    ramp = nodes.new("ShaderNodeValToRGB")
    el = ramp.color_ramp.elements
    el[0].position, el[0].color = 0.0, (0.01, 0.01, 0.01, 1)
    el[1].position, el[1].color = 1.0, (0.78, 0.74, 0.70, 1)
    for pos, col in ((PUPIL, (0.01, 0.01, 0.01, 1)), (PUPIL + 0.02, (0.10, 0.22, 0.30, 1)),
                     (IRIS - 0.04, (0.22, 0.40, 0.48, 1)), (IRIS, (0.05, 0.08, 0.10, 1)),
                     (LIMBUS, (0.80, 0.76, 0.72, 1)), (0.85, (0.90, 0.86, 0.82, 1))):
        e = ramp.color_ramp.elements.new(pos)
        e.color = col
    links.new(d, ramp.inputs["Fac"])

    # Radial iris fibres: noise along the angle around the gaze axis, only between pupil and limbus.
    sep = nodes.new("ShaderNodeSeparateXYZ")
    links.new(centred.outputs["Vector"], sep.inputs[0])
    angle = _math(nodes, links, "ARCTAN2", sep.outputs["Y"], sep.outputs["X"])
    fibres = nodes.new("ShaderNodeTexNoise")
    fibres.noise_dimensions = "1D"
    fibres.inputs["Scale"].default_value = 12.0
    links.new(angle, fibres.inputs["W"])
    in_iris = _math(nodes, links, "MULTIPLY", _math(nodes, links, "GREATER_THAN", d, value=PUPIL),
                    _math(nodes, links, "LESS_THAN", d, value=IRIS))
    hue = _object_value(nodes, "imhead.iris_hue")
    tint = nodes.new("ShaderNodeHueSaturation")
    links.new(_math(nodes, links, "ADD", hue.outputs["Fac"], value=0.0), tint.inputs["Hue"])
    links.new(ramp.outputs["Color"], tint.inputs["Color"])
    tint.inputs["Fac"].default_value = 1.0
    mix = nodes.new("ShaderNodeMix")
    mix.data_type, mix.blend_type = "RGBA", "MULTIPLY"
    links.new(_math(nodes, links, "MULTIPLY", in_iris, fibres.outputs["Fac"]), mix.inputs["Factor"])
    links.new(tint.outputs["Color"], mix.inputs["A"])
    mix.inputs["B"].default_value = (0.55, 0.55, 0.55, 1.0)
    links.new(mix.outputs["Result"], bsdf.inputs["Base Color"])
    bsdf.inputs["Roughness"].default_value = 0.35
    bsdf.inputs["Subsurface Weight"].default_value = 0.1
    bsdf.inputs["Subsurface Scale"].default_value = 0.002
    bsdf.inputs["Coat Weight"].default_value = 1.0
    bsdf.inputs["Coat Roughness"].default_value = 0.02
    bsdf.inputs["Coat IOR"].default_value = 1.376
    return mat


def _plain(name: str, colour, roughness: float, sss: float) -> bpy.types.Material:
    mat = bpy.data.materials.get(name)
    if mat is not None:
        return mat
    mat, nodes, _links = _new_material(name)
    bsdf = _principled(nodes)
    bsdf.inputs["Base Color"].default_value = (*colour, 1.0)
    bsdf.inputs["Roughness"].default_value = roughness
    bsdf.inputs["Subsurface Weight"].default_value = sss
    bsdf.inputs["Subsurface Scale"].default_value = 0.002
    return mat


def teeth() -> bpy.types.Material:
    return _plain(TEETH, (0.85, 0.80, 0.68), 0.25, 0.2)


def gums() -> bpy.types.Material:
    return _plain(GUMS, (0.62, 0.22, 0.22), 0.4, 0.4)


def hidden() -> bpy.types.Material:
    """Fully transparent: on the head's own (fused) eyeball faces, so the eye objects show instead."""
    mat = bpy.data.materials.get(HIDDEN)
    if mat is not None:
        return mat
    mat, nodes, _links = _new_material(HIDDEN)
    _principled(nodes).inputs["Alpha"].default_value = 0.0
    if hasattr(mat, "use_transparent_shadow"):
        mat.use_transparent_shadow = True
    return mat


def assign(obj: bpy.types.Object, material: bpy.types.Material) -> None:
    """The object's only material slot holds `material` (its mesh's slots, so a rebuilt mesh keeps it)."""
    mats = obj.data.materials
    if len(mats) == 0:
        mats.append(material)
    elif mats[0] is None:
        mats[0] = material
