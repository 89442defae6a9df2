"""Animation in real Blender (bpy 5.0.1) against the real backend: ARKit shape keys, the chunked exact bake with
progress and cancel, render-safe live mode, Live Link Face CSV import / export, keyframed region sliders,
changes kept while the backend is down, FBX / glTF export and undo.

Each scenario runs in its own subprocess (this file run as a script, isolated Blender user folder), as in
test_blender_addon.py; the tests assert on the facts it reports.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
SCENARIO_TIMEOUT_S = 1200


def run_scenario(name: str, zip_path: Path, python: str, tmp_path: Path) -> dict:
    user = tmp_path / "blender_user"
    env = dict(os.environ, BLENDER_USER_RESOURCES=str(user))
    for kind in ("CONFIG", "SCRIPTS", "EXTENSIONS", "DATAFILES"):
        (user / kind.lower()).mkdir(parents=True, exist_ok=True)
        env[f"BLENDER_USER_{kind}"] = str(user / kind.lower())
    facts = tmp_path / f"{name}.json"
    proc = subprocess.run([python, str(HERE), name, str(zip_path), str(facts), str(tmp_path)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=SCENARIO_TIMEOUT_S)
    assert proc.returncode == 0, f"scenario {name} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return json.loads(facts.read_text())


@pytest.fixture(scope="module")
def rig(built_zip, venv_python, tmp_path_factory) -> dict:
    return run_scenario("rig", built_zip, venv_python, tmp_path_factory.mktemp("rig"))


@pytest.fixture(scope="module")
def live(built_zip, venv_python, tmp_path_factory) -> dict:
    return run_scenario("live", built_zip, venv_python, tmp_path_factory.mktemp("live"))


def test_arkit_keys_are_the_models_own_deforms(rig):
    k = rig["arkit"]
    assert k["keys"][0] == "Basis" and k["keys"][1:53] == k["arkit_names"] and len(k["arkit_names"]) == 52
    # 12 frames per request here: frames done / total seen after each of the five requests but the last
    assert k["chunks_in_flight_at_start"] == 1
    assert k["progress"] == [[0, 52], [12, 52], [24, 52], [36, 52], [48, 52]]
    # the same deform as a one-pose request; the root finder stops within ~1 um, and a batch of poses may take
    # another iteration than a single pose (1.07e-6 m measured)
    assert k["jaw_vs_direct"] < 5e-6 and k["brow_inner_vs_direct"] < 5e-6
    assert k["tongue_vs_basis"] == 0.0
    if rig["trained"]:
        assert k["jaw_moved_m"] > 1e-4 and k["brow_inner_moved_m"] > 1e-5
    assert k["driven"] == pytest.approx({"eyeBlinkLeft": 0.7, "browInnerUp": 0.3, "jawOpen": 0.0}, abs=1e-6)
    assert k["undo"] == {"keys_after_undo": 0, "keys_after_redo": 53}


def test_bake_runs_in_chunks_with_progress_and_is_exact_over_the_arkit_keys(rig):
    b = rig["bake"]
    assert b["cancelled"] == {"bake_keys": 0, "chains": 0}
    assert b["progress"] == [[0, 4], [1, 4], [2, 4], [3, 4]]  # one pose per request here
    assert b["bake_keys"] == b["poses"] == 4
    assert max(b["exact_vs_direct"]) < 2e-5  # ARKit mix + corrective = the model's pose, every frame


def test_capture_csv_import_export_round_trip(rig):
    c = rig["capture"]
    assert c["imported_frames"] == 48  # 119/60 s of 60 Hz rows on a 30 fps timecode, retimed to 24 fps
    assert c["smile_at_1s"] == pytest.approx(0.8, abs=1e-3) and c["blink_peak"] > 0.8
    assert c["head_yaw_at_0_5s"] == pytest.approx(0.15, abs=2e-3)
    assert c["menu_entries"] == {"import": True, "export": True}
    assert c["round_trip_max_diff"] < 1e-5 and c["round_trip_frames"] == 48
    assert c["undo_import_keys"] == 0
    for key, (value, control) in c["key_vs_control"].items():  # the controls drive the ARKit keys
        assert value == pytest.approx(control, abs=1e-6) and value > 0.2, key


def test_malformed_csv_names_line_and_column_and_changes_nothing(rig):
    bad = rig["malformed"]
    assert "missing blendshape column(s): JawOpen" in bad["missing_column"]
    assert "line 3, column 20 (JawOpen)" in bad["not_a_number"] and "'abc' is not a number" in bad["not_a_number"]
    assert "empty" in bad["empty"]
    assert "line 2" in bad["latin1"] and "UTF-8" in bad["latin1"]
    assert "line 3" in bad["short_row"]
    assert bad["scene_unchanged"]


def test_glb_and_fbx_carry_the_shape_keys_and_animation(rig):
    glb = rig["glb"]
    assert glb["target_names"] == rig["arkit"]["arkit_names"]
    assert glb["morph_targets"] == 52 and glb["weight_channels"] >= 1
    assert glb["animation_frames"] >= 48
    fbx = rig["fbx"]
    assert fbx["shape_keys"] == 53
    assert {"mouthSmileLeft", "mouthSmileRight", "cheekSquintLeft", "eyeBlinkLeft", "browInnerUp", "jawOpen",
            "browOuterUpRight"} <= set(fbx["animated_keys"])


def test_render_of_a_live_head_shows_each_frames_pose(live):
    r = live["render"]
    assert r["frames_differ"] > 1e-3  # frame 1 and frame 2 of one animation render
    assert r["frame2_vs_still"] < 1e-6 and r["frame1_vs_still"] < 1e-6  # each equals that pose rendered alone


def test_keyframed_region_sliders_apply_on_frame_change(live):
    s = live["sliders"]
    assert s["jobs_after_frame_change"] == 1 and s["override_after"] == [s["region"]]
    assert s["slider_sent"] == pytest.approx(2.0, abs=1e-4) and s["mesh_changed"]
    assert s["blend"]["jobs"] == 1 and s["blend"]["t_sent"] == pytest.approx(0.8, abs=1e-6)


def test_changes_while_the_backend_is_down_are_applied_when_it_is_back(live):
    p = live["pending"]
    assert p["pending_while_down"] == [p["name"]] and p["region_pending_while_down"]
    assert p["pending_after_restart"] == [] and p["region_pending_after"] == {}
    assert p["mesh_matches_direct"] < 1e-6 and p["slider_override_after"]


def test_generate_and_region_edit_are_undoable(live):
    u = live["undo"]
    assert u["heads_after_generate_undo"] == u["heads_before"] and u["heads_after_redo"] == u["heads_before"] + 1
    assert u["overrides_after_edit"] == 1 and u["overrides_after_undo"] == 0


def test_demo_capture_is_a_valid_live_link_face_file():
    import importlib
    import types

    package = types.ModuleType("imhead_blender")
    package.__path__ = [str(REPO / "imhead_blender")]
    sys.modules.setdefault("imhead_blender", package)
    capture_csv = importlib.import_module("imhead_blender.capture_csv")
    capture = capture_csv.parse((REPO / "scripts" / "demo_capture.csv").read_bytes())
    assert capture.rate == 30 and len(capture.seconds) == 120 and capture.duration == pytest.approx(119 / 60)


# ===================================================================== scenarios (run inside Blender)

def _install(bpy, zip_path: str) -> str:
    before = {a.module for a in bpy.context.preferences.addons}
    assert bpy.ops.extensions.package_install_files(
        filepath=zip_path, repo="user_default", enable_on_install=True, overwrite=True) == {"FINISHED"}
    added = [m for m in {a.module for a in bpy.context.preferences.addons} - before if m.startswith("bl_ext.")]
    assert len(added) == 1, added
    bpy.context.preferences.addons[added[0]].preferences.python_path = sys.executable
    return added[0]


def _heads(scene) -> list:
    return [o for o in scene.objects if o.type == "MESH" and o.imhead.is_head]


def _generate(bpy, service, seed: int, resolution: int):
    scene = bpy.context.scene
    scene.imhead.seed, scene.imhead.resolution = seed, resolution
    assert bpy.ops.imhead.generate() == {"FINISHED"}
    service.drain(600)
    return next(o for o in _heads(scene) if o.imhead.seed == seed)


def _co(mesh_or_block) -> np.ndarray:
    data = mesh_or_block.data if hasattr(mesh_or_block, "relative_key") else mesh_or_block.vertices
    out = np.empty(len(data) * 3, np.float32)
    data.foreach_get("co", out)
    return out.reshape(-1, 3)


def _evaluated(bpy, obj) -> np.ndarray:
    depsgraph = bpy.context.evaluated_depsgraph_get()
    evaluated = obj.evaluated_get(depsgraph)
    mesh = evaluated.to_mesh()
    try:
        return _co(mesh)
    finally:
        evaluated.to_mesh_clear()


def _direct_deform(service, axes, obj, weights) -> np.ndarray:
    canonical = np.empty(len(obj.data.vertices) * 3, np.float32)
    obj.data.attributes["imhead_canonical"].data.foreach_get("vector", canonical)
    client = service.client()
    _p, out = client.wait(client.submit("deform", {"head": json.loads(obj.imhead.head_json)}, {
        "canonical": axes.blender_to_backend(canonical.reshape(-1, 3)),
        "expressions": np.asarray(weights, np.float32).reshape(-1, 53)}), 600)
    return axes.backend_to_blender(out["vertices"])


def _drain_recording(service, jobs_module, name: str, timeout: float = 900) -> list:
    seen: list = []

    def until() -> bool:
        for chain in jobs_module.running(name):
            if not seen or seen[-1] != [chain.done, chain.total]:
                seen.append([chain.done, chain.total])
        return not jobs_module.running(name) and not service.jobs()

    service.drain(timeout, until=until)
    return seen


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _glb_json(path: Path) -> dict:
    data = path.read_bytes()
    magic, _version, _length = struct.unpack("<4sII", data[:12])
    assert magic == b"glTF", magic
    chunk_len, chunk_type = struct.unpack("<II", data[12:20])
    assert chunk_type == 0x4E4F534A  # "JSON"
    return json.loads(data[20 : 20 + chunk_len])


def scenario_rig(zip_path: str, tmp: Path) -> dict:
    import bpy

    module = _install(bpy, zip_path)
    mods = {n: sys.modules[f"{module}.{n}"] for n in ("backend_service", "axes", "arkit", "deform_jobs",
                                                     "shape_keys", "expressions")}
    service, axes, arkit, jobs = mods["backend_service"], mods["axes"], mods["arkit"], mods["deform_jobs"]
    names = mods["expressions"].EXPRESSION_NAMES
    for obj in list(bpy.data.objects):
        bpy.data.objects.remove(obj)
    scene = bpy.context.scene
    scene.render.fps, scene.render.fps_base = 24, 1.0
    obj = _generate(bpy, service, 5, 40)
    name = obj.name
    n = len(obj.data.vertices)
    facts: dict = {"trained": service.handshake().trained, "vertices": n}

    # --- ARKit keys in several chunks (a small chunk size stands in for a big mesh).
    jobs.CHUNK_POINTS = 12 * n
    bpy.ops.ed.undo_push(message="before keys")
    assert bpy.ops.imhead.arkit_shape_keys() == {"FINISHED"}
    chunks = [len(service.jobs(name))]
    progress = _drain_recording(service, jobs, name)
    obj = bpy.data.objects[name]
    blocks = obj.data.shape_keys.key_blocks
    basis = _co(blocks["Basis"])
    jaw = np.zeros(53, np.float32)
    jaw[names.index("jawOpen")] = 1
    brow = np.zeros(53, np.float32)
    brow[[names.index("browInnerUp_L"), names.index("browInnerUp_R")]] = 1
    direct = _direct_deform(service, axes, obj, np.stack([jaw, brow]))
    expr = obj.imhead.expressions
    expr.eyeBlink_L, expr.browInnerUp_L, expr.browInnerUp_R = 0.7, 0.2, 0.4
    bpy.context.view_layer.update()
    facts["arkit"] = {
        "keys": [k.name for k in blocks], "arkit_names": list(arkit.ARKIT_NAMES),
        "chunks_in_flight_at_start": chunks[0], "progress": progress,
        "jaw_vs_direct": float(np.abs(_co(blocks["jawOpen"]) - direct[0]).max()),
        "brow_inner_vs_direct": float(np.abs(_co(blocks["browInnerUp"]) - direct[1]).max()),
        "tongue_vs_basis": float(np.abs(_co(blocks["tongueOut"]) - basis).max()),
        "jaw_moved_m": float(np.abs(direct[0] - basis).max()),
        "brow_inner_moved_m": float(np.abs(direct[1] - basis).max()),
        "driven": {k: round(blocks[k].value, 6) for k in ("eyeBlinkLeft", "browInnerUp", "jawOpen")},
    }
    expr.eyeBlink_L, expr.browInnerUp_L, expr.browInnerUp_R = 0.0, 0.0, 0.0
    bpy.ops.ed.undo()
    keys_after_undo = bpy.data.objects[name].data.shape_keys
    undo_facts = {"keys_after_undo": 0 if keys_after_undo is None else len(keys_after_undo.key_blocks)}
    bpy.ops.ed.redo()
    scene = bpy.context.scene  # undo steps reload the data: earlier references are gone
    obj = bpy.data.objects[name]
    undo_facts["keys_after_redo"] = len(obj.data.shape_keys.key_blocks)
    facts["arkit"]["undo"] = undo_facts

    # --- Bake frames 1..4 over the ARKit keys: cancel once, then run it through.
    expr = obj.imhead.expressions
    scene.frame_start, scene.frame_end = 1, 4
    for frame, (j, s_l, b_l) in enumerate([(0.0, 0.0, 0.0), (0.3, 0.6, 0.0), (0.1, 0.9, 0.5), (0.0, 0.2, 1.0)], 1):
        expr.jawOpen, expr.mouthSmile_L, expr.browInnerUp_L = j, s_l, b_l
        for prop in ("jawOpen", "mouthSmile_L", "browInnerUp_L"):
            expr.keyframe_insert(prop, frame=frame)
    jobs.CHUNK_POINTS = n  # one frame per request
    bpy.context.view_layer.objects.active = obj
    assert bpy.ops.imhead.bake_expressions() == {"FINISHED"}
    service.drain(600, until=lambda: jobs.running(name)[0].done >= 1 if jobs.running(name) else True)
    assert bpy.ops.imhead.cancel_bake() == {"FINISHED"}
    service.drain(600)
    cancelled = {"bake_keys": sum(k.name.startswith("imhead_f") for k in obj.data.shape_keys.key_blocks),
                 "chains": len(jobs.running())}
    assert bpy.ops.imhead.bake_expressions() == {"FINISHED"}
    progress = _drain_recording(service, jobs, name)
    obj = bpy.data.objects[name]
    weights = np.zeros((4, 53), np.float32)
    for f in range(1, 5):
        scene.frame_set(f)
        weights[f - 1] = [getattr(obj.imhead.expressions, k) for k in names]
    direct = _direct_deform(service, axes, obj, weights)
    exact = []
    for f in range(1, 5):
        scene.frame_set(f)
        exact.append(float(np.abs(_evaluated(bpy, obj) - direct[f - 1]).max()))
    facts["bake"] = {"cancelled": cancelled, "progress": progress, "poses": 4,
                     "bake_keys": sum(k.name.startswith("imhead_f") for k in obj.data.shape_keys.key_blocks),
                     "exact_vs_direct": exact}
    for block in [k for k in obj.data.shape_keys.key_blocks if k.name.startswith("imhead_f")]:
        obj.shape_key_remove(block)

    # --- Capture import (the demo's file), export, import onto a second head.
    obj.animation_data_clear()
    scene.frame_start, scene.frame_end = 1, 1
    bpy.ops.ed.undo_push(message="before import")
    demo_csv = REPO / "scripts" / "demo_capture.csv"
    assert bpy.ops.imhead.import_capture(filepath=str(demo_csv)) == {"FINISHED"}
    bpy.ops.ed.undo()
    head = bpy.data.objects[name]
    undo_import_keys = 0 if head.animation_data is None or head.animation_data.action is None else sum(
        len(bag.fcurves) for layer in head.animation_data.action.layers for strip in layer.strips
        for bag in strip.channelbags)
    bpy.ops.ed.redo()
    scene = bpy.context.scene  # undo steps reload the data: earlier references are gone
    obj = bpy.data.objects[name]
    scene.frame_set(25)
    smile = obj.imhead.expressions.mouthSmile_L
    blocks = obj.data.shape_keys.key_blocks
    key_vs_control = {k: [round(blocks[k].value, 6), round(getattr(obj.imhead.expressions, c), 6)]
                      for k, c in (("mouthSmileRight", "mouthSmile_R"), ("cheekSquintLeft", "cheekSquint_L"),
                                   ("mouthSmileLeft", "mouthSmile_L"))}
    blink = max((scene.frame_set(f), obj.imhead.expressions.eyeBlink_L)[1] for f in range(20, 30))
    scene.frame_set(13)
    yaw = obj.rotation_euler.z
    import_menu = [f.__name__ for f in bpy.types.TOPBAR_MT_file_import._dyn_ui_initialize()]
    export_menu = [f.__name__ for f in bpy.types.TOPBAR_MT_file_export._dyn_ui_initialize()]
    out_csv = tmp / "exported.csv"
    assert bpy.ops.imhead.export_capture(filepath=str(out_csv)) == {"FINISHED"}
    ref = []
    for f in range(scene.frame_start, scene.frame_end + 1):
        scene.frame_set(f)
        ref.append([getattr(obj.imhead.expressions, k) for k in names] + [obj.rotation_euler.z])
    other = _generate(bpy, service, 6, 24)
    bpy.context.view_layer.objects.active = other
    assert bpy.ops.imhead.import_capture(filepath=str(out_csv)) == {"FINISHED"}
    got = []
    for f in range(scene.frame_start, scene.frame_end + 1):
        scene.frame_set(f)
        got.append([getattr(other.imhead.expressions, k) for k in names] + [other.rotation_euler.z])
    facts["capture"] = {
        "imported_frames": scene.frame_end - scene.frame_start + 1, "smile_at_1s": smile, "blink_peak": blink,
        "head_yaw_at_0_5s": yaw,
        "menu_entries": {"import": "menu_import" in import_menu, "export": "menu_export" in export_menu},
        "round_trip_max_diff": float(np.abs(np.array(got) - np.array(ref)).max()), "round_trip_frames": len(got),
        "undo_import_keys": undo_import_keys, "key_vs_control": key_vs_control,
    }

    # --- Malformed files: a clear error, nothing changed.
    def snapshot() -> str:
        state = {"objects": sorted(o.name for o in bpy.data.objects), "range": [scene.frame_start, scene.frame_end],
                 "actions": sorted(a.name for a in bpy.data.actions)}
        for o in _heads(scene):
            curves = []
            if o.animation_data and o.animation_data.action:
                for layer in o.animation_data.action.layers:
                    for strip in layer.strips:
                        for bag in strip.channelbags:
                            curves += [(c.data_path, c.array_index, len(c.keyframe_points),
                                        [tuple(p.co) for p in c.keyframe_points][:3]) for c in bag.fcurves]
            state[o.name] = [sorted(curves), list(o.rotation_euler)]
        return json.dumps(state, sort_keys=True, default=str)

    good = demo_csv.read_bytes().decode()
    lines = good.splitlines()
    header = lines[0].split(",")
    jaw_col = header.index("JawOpen")
    bad_value = lines[2].split(",")
    bad_value[jaw_col] = "abc"
    cases = {
        "missing_column": "\n".join(",".join(c for i, c in enumerate(r.split(",")) if i != jaw_col)
                                    for r in lines[:5]).encode(),
        "not_a_number": "\n".join([lines[0], lines[1], ",".join(bad_value)] + lines[3:6]).encode(),
        "empty": b"",
        "latin1": (lines[0] + "\n" + lines[1].replace("10:21", "10:21\xe9", 1) + "\n").encode("latin-1"),
        "short_row": "\n".join([lines[0], lines[1], lines[2].rsplit(",", 3)[0]]).encode(),
    }
    bpy.context.view_layer.objects.active = obj
    before = snapshot()
    malformed: dict[str, str | bool] = {}
    for case, data in cases.items():
        try:
            bpy.ops.imhead.import_capture(filepath=_write(tmp / f"{case}.csv", data))
            malformed[case] = "imported"
        except RuntimeError as exc:
            malformed[case] = str(exc)
    malformed["scene_unchanged"] = snapshot() == before
    facts["malformed"] = malformed
    bpy.ops.ed.undo_push(message="after checks")

    # --- glTF and FBX with the 52 keys and their animation (no backend needed for either).
    bpy.data.objects.remove(other)
    bpy.context.view_layer.objects.active = obj
    assert bpy.ops.imhead.keyframe_shape_keys() == {"FINISHED"}
    service.shutdown()
    for o in bpy.data.objects:
        o.select_set(o == obj)
    glb = tmp / "head.glb"
    assert bpy.ops.export_scene.gltf(filepath=str(glb), export_format="GLB", use_selection=True,
                                     export_morph=True, export_animations=True) == {"FINISHED"}
    doc = _glb_json(glb)
    prim = doc["meshes"][0]["primitives"][0]
    channels = [c for a in doc.get("animations", []) for c in a["channels"] if c["target"]["path"] == "weights"]
    sampler_inputs = [doc["animations"][0]["samplers"][c["sampler"]]["input"] for c in
                      doc["animations"][0]["channels"] if c["target"]["path"] == "weights"]
    facts["glb"] = {"morph_targets": len(prim.get("targets", [])),
                    "target_names": doc["meshes"][0].get("extras", {}).get("targetNames"),
                    "weight_channels": len(channels),
                    "animation_frames": doc["accessors"][sampler_inputs[0]]["count"] if sampler_inputs else 0}
    fbx = tmp / "head.fbx"
    # one take, the scene's timeline (by default every action in the file becomes a take of its own, and an
    # importer reads the first)
    assert bpy.ops.export_scene.fbx(filepath=str(fbx), use_selection=True, bake_anim=True,
                                    bake_anim_use_all_actions=False, bake_anim_use_nla_strips=False) == {"FINISHED"}
    exported = set(bpy.data.objects)
    assert bpy.ops.import_scene.fbx(filepath=str(fbx)) == {"FINISHED"}
    mesh_obj = next(o for o in bpy.data.objects if o.type == "MESH" and o not in exported)
    key = mesh_obj.data.shape_keys
    animated = []
    if key is not None and key.animation_data and key.animation_data.action:
        for layer in key.animation_data.action.layers:
            for strip in layer.strips:
                for bag in strip.channelbags:
                    animated += [c.data_path.split('"')[1] for c in bag.fcurves
                                 if len({round(p.co[1], 4) for p in c.keyframe_points}) > 1]
    facts["fbx"] = {"shape_keys": 0 if key is None else len(key.key_blocks), "animated_keys": sorted(animated)}

    return facts


def scenario_live(zip_path: str, tmp: Path) -> dict:
    import bpy

    module = _install(bpy, zip_path)
    service = sys.modules[f"{module}.backend_service"]
    axes = sys.modules[f"{module}.axes"]
    live = sys.modules[f"{module}.live_deform"]
    region_edit = sys.modules[f"{module}.region_edit"]
    names = sys.modules[f"{module}.expressions"].EXPRESSION_NAMES
    for obj in list(bpy.data.objects):
        bpy.data.objects.remove(obj)
    scene = bpy.context.scene
    facts: dict = {}
    bpy.ops.ed.undo_push(message="empty")
    heads_before = len(_heads(scene))
    obj = _generate(bpy, service, 5, 40)
    name = obj.name
    bpy.ops.ed.undo()
    undo_facts = {"heads_before": heads_before, "heads_after_generate_undo": len(_heads(bpy.context.scene))}
    bpy.ops.ed.redo()
    scene = bpy.context.scene
    undo_facts["heads_after_redo"] = len(_heads(scene))
    obj = bpy.data.objects[name]

    # --- Render-safe live mode: two keyframed frames in one animation render, no waiting in between.
    cam = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    scene.collection.objects.link(cam)
    scene.camera = cam
    cam.location, cam.rotation_euler = (0.0, -0.9, 0.0), (1.5708, 0.0, 0.0)
    light = bpy.data.objects.new("Light", bpy.data.lights.new("Light", "SUN"))
    scene.collection.objects.link(light)
    light.rotation_euler = (0.8, 0.2, 0.3)
    scene.render.engine = "CYCLES"
    scene.cycles.samples = 4
    scene.cycles.use_denoising = False
    scene.render.resolution_x = scene.render.resolution_y = 48
    expr = obj.imhead.expressions
    expr.jawOpen, expr.mouthSmile_L = 0.0, 0.0
    expr.keyframe_insert("jawOpen", frame=1)
    expr.keyframe_insert("mouthSmile_L", frame=1)
    expr.jawOpen, expr.mouthSmile_L = 0.6, 1.0
    expr.keyframe_insert("jawOpen", frame=2)
    expr.keyframe_insert("mouthSmile_L", frame=2)
    scene.frame_start, scene.frame_end = 1, 2
    service.drain(600)
    scene.frame_set(1)  # the viewport's frame; the render must not draw this pose on frame 2
    live.forget(name)  # nothing cached: the render itself must get frame 2's pose from the backend
    scene.render.filepath = str(tmp / "anim_")
    bpy.ops.render.render(animation=True)

    def pixels(path: Path) -> np.ndarray:
        image = bpy.data.images.load(str(path))
        out = np.array(image.pixels[:])  # type: ignore[index]  # the stubs' bpy_prop_array has no __getitem__
        bpy.data.images.remove(image)
        return out

    stills = {}
    for frame in (1, 2):
        scene.frame_set(frame)
        service.drain(600)
        scene.render.filepath = str(tmp / f"still_{frame}.png")
        bpy.ops.render.render(write_still=True)
        stills[frame] = pixels(tmp / f"still_{frame}.png")
    a1, a2 = pixels(tmp / "anim_0001.png"), pixels(tmp / "anim_0002.png")
    facts["render"] = {"frames_differ": float(np.abs(a1 - a2).mean()),
                       "frame1_vs_still": float(np.abs(a1 - stills[1]).max()),
                       "frame2_vs_still": float(np.abs(a2 - stills[2]).max())}
    obj.animation_data_clear()
    expr.jawOpen = expr.mouthSmile_L = 0.0
    service.drain(600)

    # --- Keyframed region sliders and blend amount.
    bpy.context.view_layer.objects.active = obj
    assert bpy.ops.imhead.region_edit(action="LOAD_SLIDERS") == {"FINISHED"}
    service.drain(600)
    region = obj.imhead.regions[3].name
    item = obj.imhead.regions[region]
    before_co = _co(obj.data)
    item.keyframe_insert("sliders", index=0, frame=10)
    item.sliders[0] = 2.0
    service.drain(600)
    item.keyframe_insert("sliders", index=0, frame=12)
    scene.frame_set(10)
    service.drain(600)
    scene.frame_set(12)
    jobs = len(service.jobs(name))
    service.drain(600)
    obj = bpy.data.objects[name]
    sliders = {"region": region, "jobs_after_frame_change": jobs,
               "override_after": sorted(json.loads(obj.imhead.head_json)["region_overrides"]),
               "slider_sent": region_edit.sent_sliders(name)[region][0],
               "mesh_changed": len(obj.data.vertices) != len(before_co) or
               bool(np.abs(_co(obj.data) - before_co).max() > 1e-6)}
    obj.animation_data_clear()
    other = _generate(bpy, service, 9, 24)
    bpy.context.view_layer.objects.active = obj
    obj.imhead.swap_source = other
    for r in obj.imhead.regions:
        r.selected = r.name == region
    obj.imhead.blend_amount = 0.3
    assert bpy.ops.imhead.region_edit(action="BLEND") == {"FINISHED"}
    service.drain(600)
    obj.imhead.keyframe_insert("blend_amount", frame=20)
    obj.imhead.blend_amount = 0.8
    obj.imhead.keyframe_insert("blend_amount", frame=21)
    scene.frame_set(21)
    blend_jobs = len(service.jobs(name))
    service.drain(600)
    blend_mod = sys.modules[f"{module}.region_animation"]
    sliders["blend"] = {"jobs": blend_jobs, "t_sent": blend_mod._blend_sent.get(name)}
    facts["sliders"] = sliders
    obj.animation_data_clear()
    bpy.data.objects.remove(other)

    # --- The backend dies: an expression change and a slider move wait for it and go out after Restart.
    pid = service.client()._proc.pid
    os.kill(pid, signal.SIGKILL)
    service.client()._proc.wait(30)
    service.pump_backend()
    obj = bpy.data.objects[name]
    obj.imhead.expressions.mouthSmile_R = 0.9
    r2 = obj.imhead.regions[5].name
    obj.imhead.regions[r2].sliders[1] = -1.5
    pending = {"name": name, "pending_while_down": sorted(live.pending()),
               "region_pending_while_down": {k: sorted(v) for k, v in region_edit.pending().items()}}
    assert bpy.ops.imhead.restart_backend() == {"FINISHED"}
    service.drain(600)
    obj = bpy.data.objects[name]
    weights = np.zeros((1, 53), np.float32)
    weights[0, names.index("mouthSmile_R")] = 0.9
    direct = _direct_deform(service, axes, obj, weights)[0]
    pending.update({"pending_after_restart": sorted(live.pending()), "region_pending_after": region_edit.pending(),
                    "mesh_matches_direct": float(np.abs(_co(obj.data) - direct).max()),
                    "slider_override_after": r2 in json.loads(obj.imhead.head_json)["region_overrides"]})
    facts["pending"] = pending

    # --- Region edit undo.
    obj.imhead.expressions.mouthSmile_R = 0.0
    service.drain(600)
    for r in obj.imhead.regions:
        r.selected = False
    assert bpy.ops.imhead.region_edit(action="RESET") == {"FINISHED"}  # active region only; clears overrides
    service.drain(600)
    obj = bpy.data.objects[name]
    for r in obj.imhead.regions:
        r.selected = True
    assert bpy.ops.imhead.region_edit(action="RESET") == {"FINISHED"}
    service.drain(600)
    bpy.ops.ed.undo_push(message="reset all")
    obj = bpy.data.objects[name]
    for r in obj.imhead.regions:
        r.selected = r.name == region
    assert bpy.ops.imhead.region_edit(action="RANDOMISE") == {"FINISHED"}
    service.drain(600)
    undo_facts["overrides_after_edit"] = len(json.loads(bpy.data.objects[name].imhead.head_json)["region_overrides"])
    bpy.ops.ed.undo()
    undo_facts["overrides_after_undo"] = len(json.loads(bpy.data.objects[name].imhead.head_json)["region_overrides"])
    facts["undo"] = undo_facts
    service.shutdown()
    return facts


SCENARIOS = {"rig": scenario_rig, "live": scenario_live}

if __name__ == "__main__":
    name, zip_arg, out_arg, tmp_arg = sys.argv[1:5]
    result = SCENARIOS[name](zip_arg, Path(tmp_arg))
    Path(out_arg).write_text(json.dumps(result, indent=1))
