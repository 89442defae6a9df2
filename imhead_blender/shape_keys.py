"""Shape keys computed by the model: the 52 ARKit expression keys (a standard Blender face rig) and the exact
per-frame bake. Both come from `deform` chains (deform_jobs), so they are the model's own poses, not guesses.

ARKit keys: Basis = the head's neutral canonical mesh; key "eyeBlinkLeft" = the model's deform at
eyeBlink_L = 1 (browInnerUp / cheekPuff: both ICT sides at 1; tongueOut: empty, equal to the Basis). Each key's
value is driven by the head's expression controls (an AVERAGE driver: the one ICT control, or the mean of the
two sides), so keyframed controls play, render and export through FBX with no backend. glTF's exporter reads
shape-key animation only from keyframes, so `keyframe_from_controls` writes the driven values as keyframes too.

Bake: one key per distinct pose over the frame range ("imhead_f0012"), keyed 1 on the frames that use it and 0
on their neighbours. With ARKit keys present a bake key is the corrective (exact pose minus the ARKit keys' mix
at that frame), so keys plus correctives give the model's non-linear pose exactly on every baked frame.
"""

from __future__ import annotations

from typing import cast

import bpy
import numpy as np

from . import arkit, deform_jobs, live_deform, mesh_build, undo

BASIS = "Basis"
BAKED_PREFIX = live_deform.BAKED_PREFIX
KEY_DECIMALS = live_deform.KEY_DECIMALS


def has_arkit_keys(obj: bpy.types.Object) -> bool:
    keys = obj.data.shape_keys
    return keys is not None and all(name in keys.key_blocks for name in arkit.ARKIT_NAMES)


def _ensure_basis(obj: bpy.types.Object) -> np.ndarray:
    """The Basis key (created from the canonical mesh when missing); returns the canonical positions."""
    mesh = mesh_build.mesh_of(obj)
    canonical = mesh_build.read_point_vector(mesh, mesh_build.CANONICAL)
    if mesh.shape_keys is None:
        mesh_build.set_positions(mesh, canonical)
        obj.shape_key_add(name=BASIS, from_mix=False)
    return canonical


def _write_key(obj: bpy.types.Object, name: str, positions: np.ndarray) -> bpy.types.ShapeKey:
    block = obj.data.shape_keys.key_blocks.get(name) if obj.data.shape_keys else None
    if block is None:
        block = obj.shape_key_add(name=name, from_mix=False)
    block.data.foreach_set("co", np.ascontiguousarray(positions, dtype=np.float32).ravel())
    return block


# --- ARKit keys ------------------------------------------------------------------------------------------

def start_arkit_keys(obj: bpy.types.Object) -> deform_jobs.Chain:
    """Compute the 52 keys (51 deforms at weight 1; tongueOut is the canonical mesh, a zero frame the backend
    does not solve). Raises BackendUnavailable / RuntimeError (a chain already runs)."""
    return deform_jobs.start(obj, arkit.KEY_WEIGHTS, "ARKit shape keys", apply_arkit_keys)


def apply_arkit_keys(obj: bpy.types.Object, positions: np.ndarray) -> None:
    """positions (52,N,3) in Blender axes, in ARKIT_NAMES order."""
    if positions.shape[0] != len(arkit.ARKIT_NAMES):
        raise ValueError(f"expected {len(arkit.ARKIT_NAMES)} poses, got {positions.shape[0]}")
    _ensure_basis(obj)
    for name, pose in zip(arkit.ARKIT_NAMES, positions):
        block = _write_key(obj, name, pose)
        block.slider_min, block.slider_max = 0.0, 1.0
        _drive(obj, block, arkit.ARKIT_TO_ICT[name])
    obj.data.update()
    live_deform.forget(obj.name)
    undo.push("imHead ARKit shape keys")


def _drive(obj: bpy.types.Object, block: bpy.types.ShapeKey, controls: tuple[str, ...]) -> None:
    """value = mean of the head's expression controls (no Python expression: AVERAGE of properties)."""
    path = f'key_blocks["{block.name}"].value'
    key = obj.data.shape_keys
    if key.animation_data is not None:
        for old in [d for d in key.animation_data.drivers if d.data_path == path]:
            key.animation_data.drivers.remove(old)
    if not controls:
        return  # tongueOut: free for keyframes (the capture import writes it)
    driver = block.driver_add("value").driver
    driver.type = "AVERAGE"
    for control in controls:
        var = driver.variables.new()
        var.name = control
        var.type = "SINGLE_PROP"
        var.targets[0].id_type = "OBJECT"
        var.targets[0].id = obj
        var.targets[0].data_path = f"imhead.expressions.{control}"


def arkit_weights_at(obj: bpy.types.Object, ict: np.ndarray, frames: list[int]) -> np.ndarray:
    """(T,52) values the ARKit keys take at `frames` for ICT weights (T,53): their drivers' averages, and
    tongueOut's own animation."""
    out = arkit.arkit_from_ict(ict)
    keys = mesh_build.mesh_of(obj).shape_keys
    block = keys.key_blocks.get("tongueOut") if keys else None
    if keys is not None and block is not None:
        curve = _fcurve(keys, 'key_blocks["tongueOut"].value')
        tongue = [curve.evaluate(f) if curve is not None else block.value for f in frames]
        out[:, arkit.ARKIT_NAMES.index("tongueOut")] = tongue
    return out


def _fcurve(key: bpy.types.Key, path: str):
    anim = key.animation_data
    if anim is None or anim.action is None:
        return None
    for layer in anim.action.layers:
        for strip in layer.strips:
            strip = cast(bpy.types.ActionKeyframeStrip, strip)  # Blender 5 actions hold only keyframe strips
            bag = strip.channelbag(anim.action_slot) if anim.action_slot is not None else None
            if bag is not None:
                curve = bag.fcurves.find(path)
                if curve is not None:
                    return curve
    return None


def keyframe_from_controls(obj: bpy.types.Object, scene: bpy.types.Scene, frames: list[int]) -> None:
    """Key every ARKit key's driven value on `frames` (for exporters that ignore drivers, e.g. glTF)."""
    if not has_arkit_keys(obj):
        raise ValueError(f"'{obj.name}' has no ARKit shape keys")
    values = arkit_weights_at(obj, live_deform.frame_weights(scene, obj, frames), frames)
    blocks = obj.data.shape_keys.key_blocks
    for a, name in enumerate(arkit.ARKIT_NAMES):
        block = blocks[name]
        for f, v in zip(frames, values[:, a]):
            block.value = float(v)
            block.keyframe_insert("value", frame=f)


# --- exact bake ------------------------------------------------------------------------------------------

def start_bake(obj: bpy.types.Object, scene: bpy.types.Scene, frames: list[int]) -> deform_jobs.Chain:
    """Deform every distinct pose of `frames` (chunked, with progress and cancel) into bake keys."""
    weights = live_deform.frame_weights(scene, obj, frames)
    unique, inverse = np.unique(np.round(weights, KEY_DECIMALS), axis=0, return_inverse=True)
    inverse = np.asarray(inverse).reshape(-1)
    linear = None
    if has_arkit_keys(obj):
        linear = arkit_weights_at(obj, weights, frames)

    def done(target: bpy.types.Object, positions: np.ndarray) -> None:
        apply_bake(target, frames, inverse, positions, linear)

    return deform_jobs.start(obj, unique.astype(np.float32), f"Bake {len(frames)} frames", done)


def apply_bake(obj: bpy.types.Object, frames: list[int], inverse: np.ndarray, positions: np.ndarray,
               arkit_values: np.ndarray | None = None) -> None:
    """positions (U,N,3): the distinct poses; inverse (T,): each frame's pose; arkit_values (T,52): the ARKit
    keys' values per frame when the head has them (the bake keys then hold what the keys' mix misses)."""
    basis = _ensure_basis(obj)
    blocks = obj.data.shape_keys.key_blocks
    for block in [k for k in blocks if k.name.startswith(BAKED_PREFIX)]:
        obj.shape_key_remove(block)
    deltas = None
    if arkit_values is not None:
        deltas = np.stack([_co(blocks[name]) - basis for name in arkit.ARKIT_NAMES])  # (52,N,3)
    edit_prefs = bpy.context.preferences.edit
    old_interp = edit_prefs.keyframe_new_interpolation_type
    edit_prefs.keyframe_new_interpolation_type = "LINEAR"  # exact at frames, linear blend between them
    try:
        for u in range(len(positions)):
            used = [i for i, idx in enumerate(inverse) if idx == u]
            pose = positions[u]
            # every frame of a pose has the same controls, so the same mix
            if deltas is not None and arkit_values is not None:
                pose = pose - np.tensordot(arkit_values[used[0]], deltas, axes=1)
            block = _write_key(obj, f"{BAKED_PREFIX}{frames[used[0]]:04d}", pose)
            used_frames = {frames[i] for i in used}
            for f in sorted(used_frames | {f - 1 for f in used_frames} | {f + 1 for f in used_frames}):
                block.value = 1.0 if f in used_frames else 0.0
                block.keyframe_insert("value", frame=f)
    finally:
        edit_prefs.keyframe_new_interpolation_type = old_interp
    obj.data.update()
    live_deform.forget(obj.name)
    undo.push("imHead bake")


def _co(block: bpy.types.ShapeKey) -> np.ndarray:
    out = np.empty(len(block.data) * 3, dtype=np.float32)
    block.data.foreach_get("co", out)
    return out.reshape(-1, 3)
