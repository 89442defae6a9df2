"""A head an artist can use, in real Blender (bpy 5.0.1) against the real backend: eyes, teeth, gums and tongue
placed through the template correspondence and following gaze and jaw; materials rendered in Cycles and EEVEE;
identity sliders, Randomise, per-region sliders with Symmetric editing; heads side by side, independent, Apply
as Mesh; the device preference and automatic restarts; fits of things that are not heads.

Each scenario runs in its own Blender process (this file run as a script, as in test_blender_addon.py).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))

from test_blender_addon import LayoutChecker, _backend_pids, _heads, _install, draw_panels  # noqa: E402

SCENARIO_TIMEOUT_S = 900
PARTS = ["Eye.L", "Eye.R", "Gums.Lower", "Gums.Upper", "Teeth.Lower", "Teeth.Upper"]


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
def artist(built_zip, venv_python, tmp_path_factory) -> dict:
    return run_scenario("artist", built_zip, venv_python, tmp_path_factory.mktemp("artist"))


@pytest.fixture(scope="module")
def service(built_zip, venv_python, tmp_path_factory) -> dict:
    return run_scenario("service", built_zip, venv_python, tmp_path_factory.mktemp("service"))


# --------------------------------------------------------------------------------------------- 1. parts

def test_every_head_gets_eyes_teeth_gums_and_tongue_as_children(artist):
    for head in artist["heads"]:
        assert sorted(head["parts"]) == PARTS
        assert all(p["parent_is_head"] for p in head["parts"].values())


def test_eyes_sit_on_the_heads_eyeballs(artist):
    for head in artist["heads"]:
        for side in ("L", "R"):
            eye = head["parts"][f"Eye.{side}"]
            # the head's own (fused) eyeball-region vertices lie on the eye's sphere
            assert eye["eyeball_region_radius_error_mm"] < 2.5
            assert 9.0 < eye["radius_mm"] < 20.0
        assert head["parts"]["Eye.L"]["centre"][0] > 0 > head["parts"]["Eye.R"]["centre"][0]  # subject's left: +x


def test_teeth_sit_in_the_mouth(artist):
    for head in artist["heads"]:
        upper, lower = head["parts"]["Teeth.Upper"], head["parts"]["Teeth.Lower"]
        lips = head["lips"]
        # between nose and chin, behind the lips' front, the lower set under the upper
        for teeth in (upper, lower):
            assert lips["chin_z"] < teeth["centre"][2] < lips["nose_tip_z"]
            assert teeth["centre"][1] > lips["front_y"]
            assert abs(teeth["centre"][0]) < 0.005
        assert lower["centre"][2] < upper["centre"][2]


def test_lower_set_follows_the_jaw_live_and_baked(artist):
    j = artist["jaw"]
    assert j["upper_moved_mm"] < 1e-3  # the skull's parts stay
    assert j["lower_teeth_drop_mm"] > 10.0 and j["tongue_drop_mm"] > 5.0
    assert j["chin_drop_mm"] > 3.0  # the head's own chin went down with it
    assert j["baked_keys"] > 1
    assert j["baked_frame_drop_mm"] == pytest.approx(j["lower_teeth_drop_mm"], abs=0.5)
    assert j["baked_frame1_drop_mm"] < 1e-3


def test_eyes_turn_with_the_eye_look_controls(artist):
    g = artist["gaze"]
    assert g["left_up_z"] == pytest.approx(math.sin(math.radians(25.0)), abs=0.02)
    assert g["right_unmoved"] < 1e-6
    assert g["left_out_x"] > 0.3  # the subject's left eye looks out toward +x
    assert g["manual_rotation_kept"]


def test_parts_are_rebuilt_with_the_head_and_exported_with_it(artist):
    r = artist["rebuild"]
    assert r["parts_after"] == PARTS and r["new_objects"] and r["vertices_changed"]
    assert r["materials_kept"]
    assert r["exported_objects"] == 7 and r["exported_shape_keys"]


# ------------------------------------------------------------------------------------------ 2. materials

def test_materials_are_assigned(artist):
    m = artist["materials"]
    assert m["head"] == "imHead Skin" and m["subsurface"] > 0.1
    assert m["eye"] == "imHead Eye" and m["teeth"] == "imHead Teeth" and m["gums"] == "imHead Gums"
    assert {"imhead.skin_tone", "imhead_lips", "imhead_template"} <= set(m["skin_attributes"])
    assert m["eye_hue_follows_head"] == pytest.approx(0.1)
    assert m["lips_weight_max"] == pytest.approx(1.0) and m["lips_fraction"] < 0.05
    # the head's own eyeball faces (fused to the lids where the mesh keeps them) are all hidden behind the eye
    # objects, and nothing else is
    assert len(m["eyeball_region_ids"]) == 2 and m["hidden_material"] == "imHead Hidden"
    assert m["visible_eyeball_faces"] == 0 and m["hidden_faces"] == m["eyeball_faces"]


@pytest.mark.parametrize("engine", ["CYCLES", "BLENDER_EEVEE"])
def test_renders_look_like_skin_not_grey(artist, engine):
    r = artist["renders"][engine]
    # head pixels (not the dark background): warm (red over blue), and the tone control darkens them
    assert r["head_pixels"] > 200
    assert r["red_minus_blue"] > 0.05
    assert r["dark_tone_luma"] < 0.8 * r["luma"]


# ------------------------------------------------------------------------------------------- 3. identity

def test_identity_sliders_are_named_keyframeable_and_rebuild(artist):
    i = artist["identity"]
    assert i["count"] >= 10 and i["named"] and len(set(i["names"])) == i["count"]
    assert i["sliders_match_identity"] < 1e-3
    assert i["jobs_after_move"] == 1 and i["head_size_grew"]
    assert i["animatable"] and i["jobs_on_keyed_frame"] == 1 and i["keyed_value_applied"] < 1e-3


def test_randomise_with_strength(artist):
    r = artist["randomise"]
    assert r["zero_strength_sliders_max"] < 1e-3 and r["overrides_cleared"]
    assert r["strong_sliders_max"] > 0.5


def test_region_sliders_need_no_load_step_and_symmetric_mirrors(artist):
    s = artist["symmetric"]
    assert s["known_after_generate"] and s["nonzero"]
    assert sorted(s["ops_regions"]) == sorted([s["region"], s["partner"]])
    assert s["partner_change"] > 0.5 and s["partner_vs_expected"] < 0.05
    assert s["off_partner_unchanged"] < 1e-6


# ------------------------------------------------------------------------------------------ 4. scene

def test_new_heads_stand_beside_each_other(artist):
    assert artist["placement"]["overlap"] is False and artist["placement"]["gap_m"] > 0.0


def test_heads_are_independent(artist):
    ind = artist["independent"]
    assert ind["b_identity_unchanged"] and ind["b_vertices_unchanged"] and ind["b_tone_unchanged"]


def test_identity_look_and_region_panels_draw(artist):
    drawn = artist["panels_with_head"]
    assert drawn["IMHEAD_PT_identity"] > 12 and drawn["IMHEAD_PT_look"] == 4
    assert {"IMHEAD_PT_regions", "IMHEAD_PT_head"} <= set(drawn)


def test_apply_as_mesh(artist):
    a = artist["apply"]
    assert a["is_head"] is False and a["shape_keys_kept"] and a["parts_kept"]
    assert a["jobs_after_edits"] == 0 and a["still_mesh"]


# ------------------------------------------------------------------------------------------ 5. backend

def test_device_preference_reaches_the_backend(service):
    d = service["device"]
    assert d["cpu"] == "cpu"
    assert d["env"] == {"AUTO": "auto", "CPU": "cpu", "GPU": "cuda"}
    if not d["cuda_available"]:
        assert "cuda" in d["gpu_error"].lower() or "gpu" in d["gpu_error"].lower()
    assert d["prefs_draw_calls"] > 0


def test_a_crashed_backend_restarts_with_backoff_at_most_three_times_a_minute(service):
    r = service["restart"]
    assert "restarts automatically" in r["message_after_crash"]
    assert r["not_before_backoff"]
    assert r["restarted"] == [True, True, True] and r["generate_after_restart"]
    assert "automatically" in r["notice"]
    assert r["fourth_restarted"] is False and "3 times within a minute" in r["fourth_message"]


# ------------------------------------------------------------------------------------------ 6. fit

@pytest.mark.parametrize("kind", ["suzanne", "cube", "body"])
def test_fitting_something_that_is_not_a_head_says_so(service, kind):
    f = service["fit"][kind]
    assert f["code"] == "not_a_head" and "does not look like a head" in f["message"]
    assert f["heads_added"] == 0 and f["selection_untouched"]


def test_fitting_an_empty_mesh_is_refused_at_once(service):
    f = service["fit"]["empty"]
    assert "no faces" in f["message"] and f["selection_untouched"] and f["jobs"] == 0


# =========================================================================================== scenarios

def _vec(v) -> list[float]:
    return [float(x) for x in v]


def _evaluated_co(bpy, obj):
    import numpy as np

    ev = obj.evaluated_get(bpy.context.evaluated_depsgraph_get())
    mesh = ev.to_mesh()
    co = np.empty(len(mesh.vertices) * 3, np.float32)
    mesh.vertices.foreach_get("co", co)
    ev.to_mesh_clear()
    m = np.array(obj.matrix_world)
    return co.reshape(-1, 3) @ m[:3, :3].T + m[:3, 3]


def _head_facts(bpy, head, region_names) -> dict:
    import numpy as np

    mesh = head.data
    n = len(mesh.vertices)
    co = np.empty(n * 3, np.float32)
    mesh.vertices.foreach_get("co", co)
    co = co.reshape(-1, 3)
    region = np.empty(n, np.int32)
    mesh.attributes["imhead_region"].data.foreach_get("value", region)

    def where(name):
        return co[region == region_names.index(name)]

    parts = {}
    for child in head.children:
        if "imhead_part" not in child:
            continue
        local = np.array([list(v.co) for v in child.data.vertices])
        entry = {"parent_is_head": child.parent == head, "centre": _vec(local.mean(0) + np.array(child.location))}
        if child["imhead_part"].startswith("Eye"):
            side = "left" if child["imhead_part"].endswith(".L") else "right"
            entry["centre"] = _vec(child.location)
            entry["radius_mm"] = float(1000 * np.linalg.norm(local, axis=1).mean())
            dist = np.linalg.norm(where(f"{side} eyeball") - np.array(child.location), axis=1)
            entry["eyeball_region_radius_error_mm"] = float(abs(1000 * np.median(dist) - entry["radius_mm"]))
        parts[child["imhead_part"]] = entry
    lips = np.concatenate([where("upper lip"), where("lower lip")])
    return {"parts": parts, "lips": {"front_y": float(lips[:, 1].min()), "chin_z": float(where("chin")[:, 2].min()),
                                     "nose_tip_z": float(where("nose tip")[:, 2].max())}}


def _render_facts(bpy, scene, head, engine: str, out: Path) -> dict:
    import numpy as np

    scene.render.engine = engine
    scene.render.resolution_x = scene.render.resolution_y = 64
    scene.cycles.samples = 8
    scene.eevee.taa_render_samples = 8
    result = {}
    for key, tone in (("luma", head.imhead.skin_tone), ("dark_tone_luma", 0.9)):
        saved = head.imhead.skin_tone
        head.imhead.skin_tone = tone
        path = out / f"{engine}_{key}.png"
        scene.render.filepath = str(path)
        bpy.ops.render.render(write_still=True)
        head.imhead.skin_tone = saved
        img = bpy.data.images.load(str(path))
        px = np.array(img.pixels[:], np.float32).reshape(-1, 4)[:, :3]
        bpy.data.images.remove(img)
        on_head = np.abs(px - px[0]).sum(1) > 0.05  # not the background (the corner pixel's colour)
        lum = px[on_head] @ np.array([0.2126, 0.7152, 0.0722])
        result[key] = float(lum.mean())
        if key == "luma":
            result["head_pixels"] = int(on_head.sum())
            result["red_minus_blue"] = float((px[on_head, 0] - px[on_head, 2]).mean())
    return result


def scenario_artist(zip_path: str, out_dir: str) -> dict:
    import bpy
    import numpy as np

    sys.path.insert(0, str(HERE.parent.parent / "scripts"))
    import demo

    out = Path(out_dir)
    module = _install(bpy, zip_path)
    service = sys.modules[f"{module}.backend_service"]
    identity = sys.modules[f"{module}.identity"]
    for obj in list(bpy.data.objects):
        bpy.data.objects.remove(obj)
    scene = bpy.context.scene
    scene.imhead.resolution = 48
    for seed in (1, 2):
        scene.imhead.seed = seed
        assert bpy.ops.imhead.generate() == {"FINISHED"}
        service.drain(600)
    a, b = (next(o for o in _heads(scene) if o.imhead.seed == s) for s in (1, 2))
    region_names = [r.name for r in a.imhead.regions]
    bpy.context.view_layer.update()
    facts: dict = {"heads": [_head_facts(bpy, h, region_names) for h in (a, b)]}

    def bounds(obj):
        m = np.array(obj.matrix_world)
        c = np.array([list(v) for v in obj.bound_box]) @ m[:3, :3].T + m[:3, 3]
        return c.min(0), c.max(0)

    (alo, ahi), (blo, bhi) = bounds(a), bounds(b)
    facts["placement"] = {"overlap": bool((alo < bhi).all() and (ahi > blo).all()),
                          "gap_m": float(max(blo[0] - ahi[0], alo[0] - bhi[0]))}

    # --- materials and renders
    bpy.context.view_layer.objects.active = a
    parts = {c["imhead_part"]: c for c in a.children}
    skin = a.data.materials[0]
    facts["materials"] = {
        "head": skin.name, "eye": parts["Eye.L"].data.materials[0].name,
        "teeth": parts["Teeth.Upper"].data.materials[0].name, "gums": parts["Gums.Lower"].data.materials[0].name,
        "subsurface": float(skin.node_tree.nodes["Principled BSDF"].inputs["Subsurface Weight"].default_value),
        "skin_attributes": sorted(n.attribute_name for n in skin.node_tree.nodes if n.type == "ATTRIBUTE"),
        "hidden_material": a.data.materials[1].name,
    }
    index = np.empty(len(a.data.polygons), np.int32)
    a.data.polygons.foreach_get("material_index", index)
    lips = np.empty(len(a.data.vertices), np.float32)
    a.data.attributes["imhead_lips"].data.foreach_get("value", lips)
    a.imhead.iris_hue = 0.1
    bpy.context.view_layer.update()
    region = np.empty(len(a.data.vertices), np.int32)
    a.data.attributes["imhead_region"].data.foreach_get("value", region)
    tris = np.empty(len(a.data.polygons) * 3, np.int32)
    a.data.polygons.foreach_get("vertices", tris)
    eyeball_ids = [int(r.region_id) for r in a.imhead.regions if r.name in ("left eyeball", "right eyeball")]
    on_eyeball = np.isin(region, eyeball_ids)[tris.reshape(-1, 3)].all(1)
    facts["materials"].update(hidden_faces=int(index.sum()), eyeball_faces=int(on_eyeball.sum()),
                              visible_eyeball_faces=int((on_eyeball & (index == 0)).sum()),
                              eyeball_region_ids=eyeball_ids, lips_weight_max=float(lips.max()),
                              lips_fraction=float((lips > 0.5).mean()),
                              eye_hue_follows_head=float(parts["Eye.L"].imhead.iris_hue))
    a.imhead.iris_hue = 0.5
    b.hide_render = True
    for child in b.children:
        child.hide_render = True
    demo.frame_head(bpy, a, scene, 64)
    demo.setup_render(bpy, scene, 8, out / "unused.png")
    facts["renders"] = {engine: _render_facts(bpy, scene, a, engine, out) for engine in ("CYCLES", "BLENDER_EEVEE")}

    # --- jaw: live and baked
    upper, lower, gums_lower = parts["Teeth.Upper"], parts["Teeth.Lower"], parts["Gums.Lower"]
    chin = region_names.index("chin")
    region = np.empty(len(a.data.vertices), np.int32)
    a.data.attributes["imhead_region"].data.foreach_get("value", region)
    rest = {o.name: _evaluated_co(bpy, o) for o in (upper, lower, gums_lower, a)}
    a.imhead.expressions.jawOpen = 1.0
    service.drain(600)
    bpy.context.view_layer.update()
    posed = {o.name: _evaluated_co(bpy, o) for o in (upper, lower, gums_lower, a)}

    def drop(name, rows=slice(None)):
        return float(1000 * (rest[name][rows, 2] - posed[name][rows, 2]).mean())

    jaw = {"upper_moved_mm": float(1000 * np.abs(posed[upper.name] - rest[upper.name]).max()),
           "lower_teeth_drop_mm": drop(lower.name), "tongue_drop_mm": drop(gums_lower.name),
           "chin_drop_mm": drop(a.name, region == chin)}
    expr = a.imhead.expressions
    expr.jawOpen = 0.0
    service.drain(600)
    expr.keyframe_insert("jawOpen", frame=1)
    expr.jawOpen = 1.0
    expr.keyframe_insert("jawOpen", frame=3)
    scene.frame_start, scene.frame_end = 1, 3
    assert bpy.ops.imhead.bake_expressions() == {"FINISHED"}
    service.drain(600)
    jaw["baked_keys"] = len(a.data.shape_keys.key_blocks)
    scene.frame_set(3)
    jaw["baked_frame_drop_mm"] = float(1000 * (rest[lower.name][:, 2] - _evaluated_co(bpy, lower)[:, 2]).mean())
    scene.frame_set(1)
    jaw["baked_frame1_drop_mm"] = float(1000 * np.abs(rest[lower.name] - _evaluated_co(bpy, lower)).max())
    facts["jaw"] = jaw

    # --- gaze
    eye_l, eye_r = parts["Eye.L"], parts["Eye.R"]

    def gaze(eye):
        bpy.context.view_layer.update()
        m = np.array(eye.matrix_world)[:3, :3]
        a_m = np.array(a.matrix_world)[:3, :3]
        d = np.linalg.inv(a_m) @ m @ np.array([0.0, -1.0, 0.0])  # local -Y is where the eye looks
        return d / np.linalg.norm(d)

    before_r = gaze(eye_r)
    expr.eyeLookUp_L = 1.0
    service.drain(600)
    up = gaze(eye_l)
    expr.eyeLookUp_L = 0.0
    expr.eyeLookOut_L = 1.0
    service.drain(600)
    out_dir_l = gaze(eye_l)
    eye_l.rotation_euler = (0.1, 0.0, 0.0)
    bpy.context.view_layer.update()
    manual_kept = abs(eye_l.rotation_euler[0] - 0.1) < 1e-6 and abs(eye_l.delta_rotation_euler[2]) > 0.1
    expr.eyeLookOut_L = 0.0
    eye_l.rotation_euler = (0.0, 0.0, 0.0)
    service.drain(600)
    facts["gaze"] = {"left_up_z": float(up[2]), "left_out_x": float(out_dir_l[0]),
                     "right_unmoved": float(np.abs(gaze(eye_r) - before_r).max()),
                     "manual_rotation_kept": manual_kept}

    # --- identity sliders (head B: A has baked keys now)
    bpy.context.view_layer.objects.active = b
    stats = identity.stats()
    spec = json.loads(b.imhead.head_json)
    width_before = float(np.ptp(np.array([list(v.co) for v in b.data.vertices]), axis=0).prod())
    facts["identity"] = {
        "count": len(stats.names), "names": list(stats.names),
        "named": not any(n.startswith("Identity ") for n in stats.names),
        "sliders_match_identity": float(np.abs(np.array(b.imhead.identity)
                                               - identity.coordinates(spec["identity"])).max()),
        "animatable": b.imhead.bl_rna.properties["identity"].is_animatable,
    }
    a_identity, a_vertices, a_tone = a.imhead.head_json, len(a.data.vertices), a.imhead.skin_tone
    size_index = list(stats.names).index("Head Size") if "Head Size" in stats.names else 0
    values = list(b.imhead.identity)
    values[size_index] += 2.0
    b.imhead.identity = values
    facts["identity"]["jobs_after_move"] = len(service.jobs(b.name))
    service.drain(600)
    width_after = float(np.ptp(np.array([list(v.co) for v in b.data.vertices]), axis=0).prod())
    facts["identity"]["head_size_grew"] = width_after > width_before
    b.imhead.skin_tone = 0.8
    facts["independent"] = {"b_identity_unchanged": a.imhead.head_json == a_identity,
                            "b_vertices_unchanged": len(a.data.vertices) == a_vertices,
                            "b_tone_unchanged": a.imhead.skin_tone == a_tone}
    b.keyframe_insert("imhead.identity", index=size_index, frame=10)
    values = list(b.imhead.identity)
    values[size_index] -= 1.0
    b.imhead.identity = values
    service.drain(600)
    b.keyframe_insert("imhead.identity", index=size_index, frame=20)
    scene.frame_set(10)
    facts["identity"]["jobs_on_keyed_frame"] = len(service.jobs(b.name))
    service.drain(600)
    keyed = float(b.imhead.identity[size_index])
    facts["identity"]["keyed_value_applied"] = float(
        abs(identity.coordinates(json.loads(b.imhead.head_json)["identity"])[size_index] - keyed))
    b.animation_data_clear()

    # --- randomise with a strength
    b.imhead.randomise_strength = 0.0
    assert bpy.ops.imhead.randomise_identity() == {"FINISHED"}
    service.drain(600)
    zero = np.abs(np.array(b.imhead.identity)).max()
    overrides = json.loads(b.imhead.head_json)["region_overrides"]
    b.imhead.randomise_strength = 2.0
    assert bpy.ops.imhead.randomise_identity() == {"FINISHED"}
    service.drain(600)
    facts["randomise"] = {"zero_strength_sliders_max": float(zero), "overrides_cleared": overrides == {},
                          "strong_sliders_max": float(np.abs(np.array(b.imhead.identity)).max())}

    # --- region sliders: known from generate; Symmetric applies the mirrored change to the partner
    region_item = b.imhead.regions["left cheek"]
    partner = b.imhead.regions["right cheek"]
    sym = {"known_after_generate": a.imhead.sliders_known,
           "nonzero": bool(np.any([list(r.sliders) for r in a.imhead.regions])),
           "region": region_item.name, "partner": partner.name}
    # Randomise (unseeded) may have left these sliders near the limit: start the pair from the mean shape.
    b.imhead.symmetric = False
    region_item.sliders = [0.0] * len(region_item.sliders)
    partner.sliders = [0.0] * len(partner.sliders)
    service.drain(600)
    b.imhead.symmetric = True
    applied_partner = np.array(partner.applied)
    applied_region = np.array(region_item.applied)
    sent = []
    real_submit = service.submit

    def spy(request, **kw):
        if request.OP == "edit":
            sent.append([o["region"] for o in request.ops if o["op"] == "pca"])
        return real_submit(request, **kw)

    service.submit = spy
    try:
        region_item.sliders[0] = region_item.sliders[0] + 1.0
        service.drain(600)
    finally:
        service.submit = real_submit
    sym["ops_regions"] = sent[0] if sent else []
    # The change is what the slider took; the partner's mirrored sliders stop at the limit too.
    delta = np.array(region_item.applied) - applied_region
    limit = region_item.bl_rna.properties["sliders"].hard_max
    expected = np.clip(applied_partner + identity.mirrored_delta(region_item.region_id, partner.region_id, delta),
                       -limit, limit)
    sym["partner_change"] = float(np.abs(np.array(partner.applied) - applied_partner).max())
    sym["partner_vs_expected"] = float(np.abs(np.array(partner.applied) - expected).max())
    b.imhead.symmetric = False
    before = np.array(partner.applied)
    region_item.sliders[1] = region_item.sliders[1] + 1.0
    service.drain(600)
    sym["off_partner_unchanged"] = float(np.abs(np.array(partner.applied) - before).max())
    facts["symmetric"] = sym

    # --- rebuild: parts follow the new mesh; export takes the head with its parts
    for c in b.children:
        c["before_rebuild"] = True
    n_before = len(b.data.vertices)
    bpy.context.view_layer.objects.active = b
    b.imhead.resolution = 40
    assert bpy.ops.imhead.regenerate() == {"FINISHED"}
    service.drain(600)
    new_parts = sorted(c["imhead_part"] for c in b.children if "imhead_part" in c)
    path = out / "head.obj"
    for o in scene.objects:
        o.select_set(False)
    for o in (b, *b.children):
        o.select_set(True)
    bpy.ops.wm.obj_export(filepath=str(path), export_selected_objects=True, apply_modifiers=True)
    text = path.read_text()
    facts["rebuild"] = {"parts_after": new_parts, "vertices_changed": len(b.data.vertices) != n_before,
                        "new_objects": not any("before_rebuild" in c for c in b.children),
                        "materials_kept": b.data.materials[0].name == "imHead Skin",
                        "exported_objects": sum(line.startswith("o ") for line in text.splitlines()),
                        "exported_shape_keys": b.children and any(
                            c.data.shape_keys is not None for c in b.children if c["imhead_part"] == "Teeth.Lower")}

    facts["panels_with_head"] = draw_panels(bpy, module)

    # --- Apply as Mesh (A has baked shape keys): no backend requests for it afterwards
    bpy.context.view_layer.objects.active = a
    assert bpy.ops.imhead.apply_as_mesh() == {"FINISHED"}
    a.imhead.expressions.jawOpen = 0.3
    scene.frame_set(2)
    facts["apply"] = {"is_head": a.imhead.is_head, "shape_keys_kept": a.data.shape_keys is not None
                      and len(a.data.shape_keys.key_blocks) > 1, "parts_kept": len(a.children) == 6,
                      "jobs_after_edits": len(service.jobs(a.name)), "still_mesh": a.type == "MESH"}
    service.shutdown()
    return facts


def _fit_failure(bpy, service, scene, obj) -> dict:
    for o in scene.objects:
        o.select_set(o is obj)
    bpy.context.view_layer.objects.active = obj
    selection = sorted(o.name for o in scene.objects if o.select_get())
    heads = len(_heads(scene))
    service.clear_error()
    out: dict = {"jobs": 0}
    try:
        bpy.ops.imhead.fit_selected()
    except RuntimeError as exc:  # the operator's ERROR report
        out["message"] = str(exc)
    jobs = service.jobs()
    out["jobs"] = len(jobs)
    if jobs:
        job = jobs[0]
        service.drain(600)
        try:
            job.future.result()
            out["code"], out["message"] = "finished", ""
        except Exception as exc:
            out["code"], out["message"] = getattr(exc, "code", ""), getattr(exc, "message", str(exc))
        out["status"] = service.status()[1]
    out["heads_added"] = len(_heads(scene)) - heads
    out["selection_untouched"] = (sorted(o.name for o in scene.objects if o.select_get()) == selection
                                  and bpy.context.view_layer.objects.active == obj)
    return out


def scenario_service(zip_path: str, out_dir: str) -> dict:
    import bpy

    module = _install(bpy, zip_path)
    service = sys.modules[f"{module}.backend_service"]
    prefs_mod = sys.modules[f"{module}.preferences"]
    prefs = bpy.context.preferences.addons[module].preferences
    for obj in list(bpy.data.objects):
        bpy.data.objects.remove(obj)
    scene = bpy.context.scene
    facts: dict = {}

    # --- device preference -> the backend's --device (through $IMHEAD_DEVICE), shown from the handshake
    env = {}
    for choice in ("AUTO", "CPU", "GPU"):
        prefs.device = choice
        env[choice] = prefs_mod.backend_env(prefs)[prefs_mod.DEVICE_ENV]
    prefs.device = "GPU"
    service.restart()
    service.drain(120, until=lambda: service.handshake() is not None or service.status()[0] == "ERROR"
                  or "cuda" in service.status()[1].lower())
    gpu_status = service.status()
    prefs.device = "CPU"  # restarts the running backend
    service.drain(120, until=lambda: service.handshake() is not None)
    log: list = []

    class Drawn:  # the preferences with a checking layout (headless Blender has no window to draw in)
        layout = LayoutChecker(log)

        def __getattr__(self, name):
            return getattr(prefs, name)

    prefs_mod.ImHeadPreferences.draw(Drawn(), bpy.context)
    facts["device"] = {"env": env, "cpu": service.handshake().torch_device,
                       "cuda_available": gpu_status[0] == "READY",
                       "gpu_error": gpu_status[1], "prefs_draw_calls": len(log)}

    # --- crashes: restarted after a backoff, at most 3 times a minute, the user told each time
    restart: dict = {"restarted": []}
    for n in range(4):
        client = service.client()
        for pid in _backend_pids():
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while client.alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        service.pump_backend()
        if n == 0:
            restart["message_after_crash"] = service.status()[1]
            restart["not_before_backoff"] = service.client() is client
        try:
            service.drain(20, until=lambda c=client: service.client() is not c and service.handshake() is not None)
            restarted = True
        except TimeoutError:
            restarted = False
        if n < 3:
            restart["restarted"].append(restarted)
            if n == 0:
                scene.imhead.seed, scene.imhead.resolution = 1, 24
                assert bpy.ops.imhead.generate() == {"FINISHED"}
                service.drain(300)
                restart["generate_after_restart"] = len(_heads(scene)) == 1
                restart["notice"] = service.notice()
        else:
            restart["fourth_restarted"] = restarted
            restart["fourth_message"] = service.status()[1]
    facts["restart"] = restart
    assert bpy.ops.imhead.restart_backend() == {"FINISHED"}
    service.drain(120, until=lambda: service.handshake() is not None)
    for obj in list(bpy.data.objects):
        bpy.data.objects.remove(obj)

    # --- fits of things that are not heads: a clear message, nothing added, the selection as it was
    fits = {}
    bpy.ops.mesh.primitive_monkey_add(size=2.0)
    fits["suzanne"] = bpy.context.active_object
    bpy.ops.mesh.primitive_cube_add(size=2.0, location=(3, 0, 0))
    fits["cube"] = bpy.context.active_object
    limbs = []
    for loc, size in (((0, 5, 1.25), (0.18, 0.11, 0.3)), ((0.28, 5, 1.25), (0.05, 0.05, 0.3)),
                      ((-0.28, 5, 1.25), (0.05, 0.05, 0.3)), ((0.1, 5, 0.5), (0.07, 0.07, 0.45)),
                      ((-0.1, 5, 0.5), (0.07, 0.07, 0.45)), ((0, 5, 1.6), (0.05, 0.05, 0.06))):
        bpy.ops.mesh.primitive_uv_sphere_add(location=loc, segments=24, ring_count=12, scale=size)
        limbs.append(bpy.context.active_object)
    for o in scene.objects:
        o.select_set(o in limbs)
    bpy.context.view_layer.objects.active = limbs[0]
    bpy.ops.object.join()
    fits["body"] = bpy.context.active_object
    empty = bpy.data.objects.new("empty mesh", bpy.data.meshes.new("empty mesh"))
    scene.collection.objects.link(empty)
    fits["empty"] = empty
    facts["fit"] = {kind: _fit_failure(bpy, service, scene, obj) for kind, obj in fits.items()}
    service.shutdown()
    return facts


SCENARIOS = {"artist": scenario_artist, "service": scenario_service}

if __name__ == "__main__":
    name, zip_arg, out_arg, work = sys.argv[1:5]
    result = SCENARIOS[name](zip_arg, work)
    Path(out_arg).write_text(json.dumps(result, indent=1))
