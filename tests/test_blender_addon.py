"""The extension in real Blender (bpy 5.0.1) against the real backend subprocess: install from the built zip,
Generate from the panel's operator, what lands on the object, backend death and restart, unregister.

bpy can be imported once per process and keeps its state, so each scenario runs in its own subprocess
(this file run as a script, with an isolated Blender user folder); the tests assert on the facts it reports.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
SCENARIO_TIMEOUT_S = 900
BBOX_MIN = (-0.16, -0.22, -0.13)  # backend/constants.py; repeated so this file needs no backend import
BBOX_MAX = (0.16, 0.18, 0.17)


def run_scenario(name: str, zip_path: Path, python: str, tmp_path: Path) -> dict:
    """Run `name` in a fresh Blender process; returns the JSON facts it wrote."""
    user = tmp_path / "blender_user"
    env = dict(os.environ, BLENDER_USER_RESOURCES=str(user))
    for kind in ("CONFIG", "SCRIPTS", "EXTENSIONS", "DATAFILES"):
        (user / kind.lower()).mkdir(parents=True, exist_ok=True)
        env[f"BLENDER_USER_{kind}"] = str(user / kind.lower())
    facts = tmp_path / f"{name}.json"
    proc = subprocess.run([python, str(HERE), name, str(zip_path), str(facts)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=SCENARIO_TIMEOUT_S)
    assert proc.returncode == 0, f"scenario {name} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return json.loads(facts.read_text())


@pytest.fixture(scope="module")
def lifecycle(built_zip, venv_python, tmp_path_factory) -> dict:
    return run_scenario("lifecycle", built_zip, venv_python, tmp_path_factory.mktemp("lifecycle"))


def test_installs_from_zip_and_registers(lifecycle):
    reg = lifecycle["registered"]
    assert lifecycle["module"].startswith("bl_ext.user_default.")
    assert reg["panel"] and reg["generate_op"] and reg["object_props"] and reg["scene_props"]
    assert reg["frame_handler"]


def test_the_panel_starts_the_backend_once_when_the_preference_allows(lifecycle):
    assert lifecycle["started_by_panel_when_off"] is False
    assert lifecycle["started_by_panel"] == {"started": True, "same_client": True, "status": "STARTING"}


def test_handshake_is_shown(lifecycle):
    hs = lifecycle["handshake"]
    assert hs["model_name"]
    assert hs["torch_device"] == "cpu" or hs["torch_device"].startswith("cuda")
    assert isinstance(hs["trained"], bool)
    assert hs["expressions_match"], "backend expression list differs from the add-on's"
    assert hs["regions"] == 39


def test_generate_creates_head_with_attributes(lifecycle):
    g = lifecycle["generate"]
    assert g["heads"] == 1
    n = g["vertices"]
    assert n > 1000 and g["faces"] > 1000
    attrs = g["attributes"]
    assert attrs["imhead_canonical"] == ["FLOAT_VECTOR", "POINT", n]
    assert attrs["imhead_region"] == ["INT", "POINT", n]
    assert attrs["imhead_template"] == ["FLOAT_VECTOR", "POINT", n]
    assert g["uv_maps"] == ["UVMap"]
    assert 0 <= g["region_min"] <= g["region_max"] < 39
    # The canonical attribute, converted back to backend axes, lies in the canonical extraction box.
    half_voxel = 0.5 * 0.40 / g["resolution"]
    for axis in range(3):
        assert g["canonical_backend_min"][axis] >= BBOX_MIN[axis] - half_voxel
        assert g["canonical_backend_max"][axis] <= BBOX_MAX[axis] + half_voxel


def test_generate_stores_parameters_on_the_object(lifecycle):
    g = lifecycle["generate"]
    assert g["stored_seed"] == g["seed"] and g["stored_resolution"] == g["resolution"]
    assert g["head_format"] == "imhead-head/1" and g["identity_len"] == 256
    assert g["stored_model_name"] == lifecycle["handshake"]["model_name"]
    assert g["region_items"] == 39


def test_axes_converted_face_toward_minus_y(lifecycle):
    a = lifecycle["axes"]
    assert a["same_vertex_count"]
    assert a["max_abs_diff"] < 1e-6  # Blender co == (x, -z, y) of the backend's vertices
    # The most frontal backend vertex (max +Z) is the one with minimal Blender Y.
    assert a["face_vertex_y"] == pytest.approx(a["min_blender_y"], abs=1e-7)


def test_cancel_button_stops_a_generate(lifecycle):
    c = lifecycle["cancel"]
    assert c["code"] == "cancelled" and c["heads_added"] == 0
    assert c["status"] == ["READY", ""]


def test_backend_death_gives_clear_error_then_restart_works(lifecycle):
    d = lifecycle["death"]
    assert d["killed"]
    assert "backend_died" in d["pending_error_code"]
    assert d["status_after_death"] == "ERROR"
    assert "Restart" in d["next_request_error"] and "stopped" in d["next_request_error"]
    assert d["heads_after_restart"] == 2 and d["restart_status"] == "READY"


def test_panels_draw_in_every_state(lifecycle):
    # Checked call by call against Blender's RNA (a headless Blender has no window to draw in).
    assert set(lifecycle["panels_before"]) == {"IMHEAD_PT_main", "IMHEAD_PT_fit", "IMHEAD_PT_footage"}
    assert {"IMHEAD_PT_main", "IMHEAD_PT_head", "IMHEAD_PT_expressions"} <= set(lifecycle["panels_with_head"])
    assert lifecycle["panels_with_head"]["IMHEAD_PT_expressions"] > 53  # every expression slider
    assert "IMHEAD_PT_main" in lifecycle["panels_after_death"]


def test_unregisters_cleanly(lifecycle):
    u = lifecycle["unregistered"]
    assert u["leftover_classes"] == []
    assert not u["object_props"] and not u["scene_props"] and not u["frame_handler"]
    assert not u["timer"] and not u["backend_alive"]
    assert u["reenabled_panel"]


@pytest.fixture(scope="module")
def expressions(built_zip, venv_python, tmp_path_factory) -> dict:
    return run_scenario("expressions", built_zip, venv_python, tmp_path_factory.mktemp("expressions"))


def test_expression_edits_deform_without_blocking_and_coalesce(expressions):
    e = expressions
    assert e["in_flight_after_two_edits"] == 1  # the second edit waits for the first reply
    assert e["cached_poses"] == 2  # first pose, then one follow-up with both weights
    assert e["same_topology"]
    if e["trained"]:  # the untrained warp is initialised to zero motion
        assert e["moved_max_m"] > 1e-4
    assert e["matches_direct_deform"] < 1e-6


def test_keyframed_expressions_follow_frame_changes_with_cache(expressions):
    e = expressions
    assert e["jaw_weight_at_5"] == pytest.approx(0.5, abs=0.05)  # Bezier between 0 at 1 and 1 at 9
    assert e["jobs_after_frame_change"] == 1
    if e["trained"]:
        assert e["frame_5_moved_m"] > 1e-4
    assert e["jobs_on_revisit"] == 0 and e["revisit_same"]


def test_bake_is_one_request_and_reproduces_live_poses(expressions):
    e = expressions
    assert e["bake_jobs"] == 1
    assert e["shape_keys"][0] == "Basis" and len(e["shape_keys"]) == 1 + 6  # six distinct poses
    assert e["baked_frame_5_vs_live"] < 1e-6


@pytest.fixture(scope="module")
def regions(built_zip, venv_python, tmp_path_factory) -> dict:
    return run_scenario("regions", built_zip, venv_python, tmp_path_factory.mktemp("regions"))


def test_region_sliders_load_from_the_backend(regions):
    assert not regions["sliders_known_after_generate"] or regions["loaded"]["known"]
    assert regions["loaded"] == {"known": True, "overrides": 0, "nonzero": True}
    assert "IMHEAD_PT_regions" in regions["panels"]
    assert regions["mirror_selected"] == regions["mirror_expected"]


def test_swap_takes_the_other_heads_region_and_keeps_the_transform(regions):
    r0 = regions["names"][0]
    sw = regions["swap"]
    assert sw["overrides"] == [r0]
    assert sw["sliders_vs_b"] < 1e-4
    assert sw["matrix_kept"] and sw["has_attributes"] and sw["objects"] == 2


def test_slider_moves_coalesce_into_one_follow_up_edit(regions):
    r0, r1, _ = regions["names"]
    assert regions["slider_jobs_in_flight"] == 1
    assert regions["sliders_after"] == pytest.approx([1.5, -1.0], abs=1e-4)
    assert regions["slider_overrides"] == sorted([r0, r1])


def test_randomise_and_reset(regions):
    r0, r1, r2 = regions["names"]
    assert regions["randomised_changed"]
    assert regions["randomised_overrides"] == sorted([r0, r1, r2])
    assert regions["reset_overrides"] == 0
    assert regions["status"] == ["READY", ""]


@pytest.fixture(scope="module")
def fitting(built_zip, venv_python, tmp_path_factory) -> dict:
    return run_scenario("fit", built_zip, venv_python, tmp_path_factory.mktemp("fit"))


def test_fit_shows_progress_and_cancels(fitting):
    assert fitting["progress_seen"][0] > 0.0 and fitting["progress_seen"][1]
    assert fitting["cancel_code"] == "cancelled" and fitting["heads_after_cancel"] == 0


def test_fit_adds_a_head_overlaying_the_input(fitting):
    f = fitting["fit"]
    assert fitting["heads"] == 1 and f["attributes"] and f["head_json"] and f["source_untouched"]
    assert f["error_mm"] >= 0.0
    # The scan is in centimetres: the overlay transform carries that scale (about 100, uniform).
    assert max(f["scale"]) == pytest.approx(min(f["scale"]), rel=1e-4)
    assert 50.0 < f["scale"][0] < 200.0
    assert f["overlay_max_diff_over_extent"] < 1e-5
    if fitting["trained"]:  # the untrained network is a sphere: it cannot follow the scan's shape
        assert f["median_dist_over_extent"] < 0.02
    assert fitting["status"] == ["READY", ""]


def test_fit_takes_landmarks_from_vertex_groups(fitting):
    assert sorted(fitting["landmark_names"]) == ["chin", "left ear", "nose tip", "right ear"]  # not the rig's "chin"
    assert "at least 3" in fitting["two_landmarks"]
    lf = fitting["landmark_fit"]
    assert lf["hypotheses"] == 1  # the landmarks' Umeyama fit replaced the automatic hypotheses
    assert lf["median_dist_over_extent"] < (0.02 if fitting["trained"] else 0.1)


# ===================================================================== scenarios (run inside Blender)

def _install(bpy, zip_path: str) -> str:
    before = {a.module for a in bpy.context.preferences.addons}
    assert bpy.ops.extensions.package_install_files(
        filepath=zip_path, repo="user_default", enable_on_install=True, overwrite=True) == {"FINISHED"}
    added = [m for m in {a.module for a in bpy.context.preferences.addons} - before if m.startswith("bl_ext.")]
    assert len(added) == 1, added
    bpy.context.preferences.addons[added[0]].preferences.python_path = sys.executable
    return added[0]


def _backend_pids() -> list[int]:
    """Children of this process running `-m backend serve` (Linux /proc)."""
    pids = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                cmd = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"backend" in cmd and b"serve" in cmd:
                pids.append(int(child))
    return pids


def _heads(scene) -> list:
    return [o for o in scene.objects if o.type == "MESH" and o.imhead.is_head]


class LayoutChecker:
    """Stands in for a panel's UILayout when no window exists (headless Blender cannot draw) and checks each
    call against Blender's own RNA: the function exists, its keywords are real parameters, icons are known,
    `prop` names a real property of its data, `operator` a registered operator whose fields exist."""

    def __init__(self, log: list):
        object.__setattr__(self, "_log", log)

    def __setattr__(self, name, value):
        import bpy

        if name not in bpy.types.UILayout.bl_rna.properties:
            raise AttributeError(f"UILayout has no attribute {name!r}")

    def __getattr__(self, name):
        import bpy

        func = bpy.types.UILayout.bl_rna.functions.get(name)
        if func is None:
            raise AttributeError(f"UILayout has no function {name!r}")
        params = {p.identifier: p for p in func.parameters}

        def call(*args, **kwargs):
            unknown = set(kwargs) - set(params)
            if unknown:
                raise TypeError(f"UILayout.{name}() got unknown keywords {sorted(unknown)}")
            icon = kwargs.get("icon")
            if icon is not None and icon not in params["icon"].enum_items:
                raise ValueError(f"unknown icon {icon!r}")
            self._log.append(name)
            if name in ("prop", "prop_search"):
                data, prop = args[0], args[1]
                if prop not in data.bl_rna.properties:
                    raise AttributeError(f"{data!r} has no property {prop!r}")
            if name == "template_list":
                for data, prop in ((args[2], args[3]), (args[4], args[5])):
                    if prop not in data.bl_rna.properties:
                        raise AttributeError(f"{data!r} has no property {prop!r}")
            if name == "operator":
                category, op = args[0].split(".")
                return _OperatorFields(getattr(getattr(bpy.ops, category), op).get_rna_type())
            if name in ("row", "column", "box", "split", "column_flow", "grid_flow"):
                return LayoutChecker(self._log)
            if name == "panel":
                return LayoutChecker(self._log), LayoutChecker(self._log)
            return None

        return call


class _OperatorFields:
    def __init__(self, rna):
        object.__setattr__(self, "_rna", rna)

    def __setattr__(self, name, value):
        if name not in self._rna.properties:
            raise AttributeError(f"operator {self._rna.identifier} has no property {name!r}")


def draw_panels(bpy, module: str) -> dict:
    """Draw every imHead panel whose poll passes; returns {panel: number of layout calls}."""
    drawn = {}
    for name in dir(bpy.types):
        cls = getattr(bpy.types, name)
        if not name.startswith("IMHEAD_PT_"):
            continue
        if hasattr(cls, "poll") and not cls.poll(bpy.context):
            continue
        log: list = []
        panel = type("PanelSelf", (), {"layout": LayoutChecker(log)})()
        cls.draw(panel, bpy.context)
        drawn[name] = len(log)
    return drawn


def scenario_lifecycle(zip_path: str) -> dict:
    import bpy
    import numpy as np

    facts: dict = {}
    module = _install(bpy, zip_path)
    facts["module"] = module
    service = sys.modules[f"{module}.backend_service"]
    live = sys.modules[f"{module}.live_deform"]
    axes = sys.modules[f"{module}.axes"]
    expressions = sys.modules[f"{module}.expressions"]
    facts["registered"] = {
        "panel": hasattr(bpy.types, "IMHEAD_PT_main"),
        "generate_op": hasattr(bpy.ops.imhead, "generate"),
        "object_props": hasattr(bpy.types.Object, "imhead"),
        "scene_props": hasattr(bpy.types.Scene, "imhead"),
        "frame_handler": live.on_frame_change in bpy.app.handlers.frame_change_post,
    }
    for obj in list(bpy.data.objects):
        bpy.data.objects.remove(obj)
    scene = bpy.context.scene
    prefs = bpy.context.preferences.addons[module].preferences
    prefs.start_with_panel = False
    facts["panels_before"] = draw_panels(bpy, module)
    facts["started_by_panel_when_off"] = service.client() is not None
    prefs.start_with_panel = True  # the default: the first draw starts the backend, later draws do not restart it
    draw_panels(bpy, module)
    first = service.client()
    draw_panels(bpy, module)
    facts["started_by_panel"] = {"started": first is not None, "same_client": service.client() is first,
                                 "status": service.status()[0]}

    # --- Generate through the operator, replies applied by pump_backend() (timers do not run here).
    seed, resolution = 11, 48
    scene.imhead.seed, scene.imhead.resolution = seed, resolution
    assert bpy.ops.imhead.generate() == {"FINISHED"}
    service.drain(600)
    state, text = service.status()
    assert state == "READY" and not text, (state, text)
    hs = service.handshake()
    facts["handshake"] = {"model_name": hs.model_name, "torch_device": hs.torch_device, "trained": hs.trained,
                          "expressions_match": tuple(hs.info["expressions"]) == expressions.EXPRESSION_NAMES,
                          "regions": len(hs.info["regions"])}
    heads = _heads(scene)
    obj = heads[0]
    mesh = obj.data
    n = len(mesh.vertices)
    region = np.empty(n, np.int32)
    mesh.attributes["imhead_region"].data.foreach_get("value", region)
    canonical = np.empty(n * 3, np.float32)
    mesh.attributes["imhead_canonical"].data.foreach_get("vector", canonical)
    canonical_backend = axes.blender_to_backend(canonical.reshape(-1, 3))
    head = json.loads(obj.imhead.head_json)
    facts["generate"] = {
        "heads": len(heads), "vertices": n, "faces": len(mesh.polygons), "seed": seed, "resolution": resolution,
        "attributes": {a.name: [a.data_type, a.domain, len(a.data)] for a in mesh.attributes
                       if a.name.startswith("imhead_")},
        "region_min": int(region.min()), "region_max": int(region.max()),
        "canonical_backend_min": canonical_backend.min(0).tolist(),
        "canonical_backend_max": canonical_backend.max(0).tolist(),
        "stored_seed": obj.imhead.seed, "stored_resolution": obj.imhead.resolution,
        "head_format": head.get("format"), "identity_len": len(head.get("identity", [])),
        "stored_model_name": obj.imhead.model_name, "region_items": len(obj.imhead.regions),
        "uv_maps": mesh.uv_layers.keys(),
    }

    facts["panels_with_head"] = draw_panels(bpy, module)

    # --- Axis conversion: the same request straight through the client, compared with the mesh.
    client = service.client()
    _params, raw = client.wait(client.submit("generate", {"seed": seed, "resolution": resolution}), 600)
    co = np.empty(n * 3, np.float32)
    mesh.vertices.foreach_get("co", co)
    co = co.reshape(-1, 3)
    same = raw["vertices"].shape == co.shape
    facts["axes"] = {
        "same_vertex_count": same,
        "max_abs_diff": float(np.abs(axes.backend_to_blender(raw["vertices"]) - co).max()) if same else 1.0,
        "face_vertex_y": float(co[int(np.argmax(raw["vertices"][:, 2])), 1]) if same else 1.0,
        "min_blender_y": float(co[:, 1].min()),
    }

    # --- Cancel from the panel's button: the job ends as cancelled, no object appears, no error is shown.
    heads_before = len(_heads(scene))
    scene.imhead.resolution = 256
    assert bpy.ops.imhead.generate() == {"FINISHED"}
    job = service.jobs()[0]
    assert bpy.ops.imhead.cancel_job(request_id=job.request_id) == {"FINISHED"}
    service.drain(600)
    try:
        job.future.result()
        cancel_code = "finished"
    except Exception as exc:
        cancel_code = getattr(exc, "code", repr(exc))
    facts["cancel"] = {"code": cancel_code, "heads_added": len(_heads(scene)) - heads_before,
                       "status": list(service.status())}

    # --- Kill the backend while a request runs.
    scene.imhead.resolution = 256
    assert bpy.ops.imhead.generate() == {"FINISHED"}
    job = service.jobs()[0]
    pids = _backend_pids()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while not job.future.done() and time.monotonic() < deadline:
        service.pump_backend()
        time.sleep(0.02)
    try:
        job.future.result()
        code = "no error"
    except Exception as exc:
        code = f"{getattr(exc, 'code', '')}: {getattr(exc, 'message', exc)}"
    status_after, _ = service.status()
    death_panels = draw_panels(bpy, module)
    try:
        bpy.ops.imhead.generate()
        next_error = ""
    except RuntimeError as exc:  # the operator's ERROR report
        next_error = str(exc)
    scene.imhead.resolution = resolution
    assert bpy.ops.imhead.restart_backend() == {"FINISHED"}
    assert bpy.ops.imhead.generate() == {"FINISHED"}
    service.drain(600)
    facts["panels_after_death"] = death_panels
    facts["death"] = {"killed": len(pids) == 1, "pending_error_code": code, "status_after_death": status_after,
                      "next_request_error": next_error, "heads_after_restart": len(_heads(scene)),
                      "restart_status": service.status()[0]}

    # --- Disable the add-on: nothing of it may stay registered, the backend must be gone.
    timer = service._timer
    assert bpy.ops.preferences.addon_disable(module=module) == {"FINISHED"}
    time.sleep(0.5)
    facts["unregistered"] = {
        "leftover_classes": [c for c in dir(bpy.types) if c.startswith(("IMHEAD_", "ImHead"))],
        "object_props": hasattr(bpy.types.Object, "imhead"),
        "scene_props": hasattr(bpy.types.Scene, "imhead"),
        "frame_handler": any(getattr(h, "__module__", "").startswith(module)
                             for h in (*bpy.app.handlers.frame_change_post, *bpy.app.handlers.load_pre,
                                      *bpy.app.handlers.undo_post, *bpy.app.handlers.redo_post)),
        "timer": bpy.app.timers.is_registered(timer),
        "backend_alive": bool(_backend_pids()),
    }
    assert bpy.ops.preferences.addon_enable(module=module) == {"FINISHED"}
    facts["unregistered"]["reenabled_panel"] = hasattr(bpy.types, "IMHEAD_PT_main")
    sys.modules[f"{module}.backend_service"].shutdown()
    return facts


def scenario_expressions(zip_path: str) -> dict:
    import bpy
    import numpy as np

    module = _install(bpy, zip_path)
    service = sys.modules[f"{module}.backend_service"]
    live = sys.modules[f"{module}.live_deform"]
    axes = sys.modules[f"{module}.axes"]
    names = sys.modules[f"{module}.expressions"].EXPRESSION_NAMES
    for obj in list(bpy.data.objects):
        bpy.data.objects.remove(obj)
    scene = bpy.context.scene
    scene.imhead.seed, scene.imhead.resolution = 5, 40
    assert bpy.ops.imhead.generate() == {"FINISHED"}
    service.drain(600)
    obj = _heads(scene)[0]
    mesh = obj.data
    n = len(mesh.vertices)

    def positions():
        co = np.empty(n * 3, np.float32)
        mesh.vertices.foreach_get("co", co)
        return co.reshape(-1, 3)

    canonical = positions()
    facts: dict = {"vertices": n, "trained": service.handshake().trained}

    # Two edits in a row: one request in flight, the second coalesced into one follow-up.
    obj.imhead.expressions.jawOpen = 0.8
    obj.imhead.expressions.mouthSmile_L = 0.5
    facts["in_flight_after_two_edits"] = len(service.jobs(obj.name))
    service.drain(600)
    facts["cached_poses"] = len(live._state.cache[obj.name])
    posed = positions()
    facts["moved_max_m"] = float(np.abs(posed - canonical).max())
    facts["same_topology"] = len(mesh.vertices) == n
    weights = np.zeros((1, len(names)), np.float32)
    weights[0, names.index("jawOpen")], weights[0, names.index("mouthSmile_L")] = 0.8, 0.5
    client = service.client()
    _p, direct = client.wait(client.submit("deform", {"head": json.loads(obj.imhead.head_json)}, {
        "canonical": axes.blender_to_backend(canonical), "expressions": weights}), 600)
    facts["matches_direct_deform"] = float(np.abs(axes.backend_to_blender(direct["vertices"][0]) - posed).max())

    # Keyframed weights: frame changes only submit; a revisited pose comes from the cache.
    expr = obj.imhead.expressions
    expr.jawOpen, expr.mouthSmile_L = 0.0, 0.0
    service.drain(600)
    expr.keyframe_insert("jawOpen", frame=1)
    expr.jawOpen = 1.0
    expr.keyframe_insert("jawOpen", frame=9)
    scene.frame_set(1)
    service.drain(600)
    at_1 = positions()
    scene.frame_set(5)
    facts["jobs_after_frame_change"] = len(service.jobs(obj.name))
    service.drain(600)
    at_5 = positions()
    facts["jaw_weight_at_5"] = float(expr.jawOpen)
    facts["frame_5_moved_m"] = float(np.abs(at_5 - at_1).max())
    scene.frame_set(1)
    service.drain(600)
    scene.frame_set(5)
    facts["jobs_on_revisit"] = len(service.jobs(obj.name))
    facts["revisit_same"] = bool(np.array_equal(positions(), at_5))

    # Bake frames 1..6 in one batched request into per-frame shape keys.
    scene.frame_start, scene.frame_end = 1, 6
    assert bpy.ops.imhead.bake_expressions() == {"FINISHED"}
    facts["bake_jobs"] = len(service.jobs(obj.name))
    service.drain(600)
    blocks = mesh.shape_keys.key_blocks
    facts["shape_keys"] = [k.name for k in blocks]
    scene.frame_set(5)
    evaluated = obj.evaluated_get(bpy.context.evaluated_depsgraph_get()).to_mesh()
    co = np.empty(n * 3, np.float32)
    evaluated.vertices.foreach_get("co", co)
    facts["baked_frame_5_vs_live"] = float(np.abs(co.reshape(-1, 3) - at_5).max())
    obj.evaluated_get(bpy.context.evaluated_depsgraph_get()).to_mesh_clear()
    service.shutdown()
    return facts


def scenario_regions(zip_path: str) -> dict:
    import bpy
    import numpy as np

    module = _install(bpy, zip_path)
    service = sys.modules[f"{module}.backend_service"]
    for obj in list(bpy.data.objects):
        bpy.data.objects.remove(obj)
    scene = bpy.context.scene
    scene.imhead.resolution = 32
    for seed in (1, 2):
        scene.imhead.seed = seed
        assert bpy.ops.imhead.generate() == {"FINISHED"}
        service.drain(600)
    a, b = (next(o for o in _heads(scene) if o.imhead.seed == s) for s in (1, 2))
    bpy.context.view_layer.objects.active = a
    a.location, a.rotation_euler = (0.5, 0.2, 0.1), (0.1, 0.2, 0.3)
    bpy.context.view_layer.update()
    matrix = [list(row) for row in a.matrix_world]
    names = [r.name for r in a.imhead.regions]
    facts: dict = {"sliders_known_after_generate": a.imhead.sliders_known}

    assert bpy.ops.imhead.region_edit(action="LOAD_SLIDERS") == {"FINISHED"}
    service.drain(600)
    facts["loaded"] = {"known": a.imhead.sliders_known,
                       "overrides": len(json.loads(a.imhead.head_json)["region_overrides"]),
                       "nonzero": bool(np.any([list(r.sliders) for r in a.imhead.regions]))}
    facts["panels"] = draw_panels(bpy, module)

    # Mirror selection: a left region brings its right partner (ids from the handshake).
    left = next(r for r in a.imhead.regions if r.mirror >= 0 and r.mirror != r.region_id)
    left.selected = True
    assert bpy.ops.imhead.region_select(action="MIRROR") == {"FINISHED"}
    facts["mirror_selected"] = sorted(r.region_id for r in a.imhead.regions if r.selected)
    facts["mirror_expected"] = sorted({left.region_id, left.mirror})
    assert bpy.ops.imhead.region_select(action="NONE") == {"FINISHED"}

    # Swap one region from B: A's code for it becomes B's (compared through B's slider positions).
    r0, r1, r2 = names[0], names[5], names[10]
    a.imhead.regions[r0].selected = True
    a.imhead.swap_source = b
    assert bpy.ops.imhead.region_edit(action="SWAP") == {"FINISHED"}
    service.drain(600)
    client = service.client()
    b_params, _ = client.wait(client.submit("edit", {"head": json.loads(b.imhead.head_json), "resolution": 16,
                                                     "ops": [{"op": "reset", "regions": [r0]}]}), 600)
    head = json.loads(a.imhead.head_json)
    facts["swap"] = {
        "overrides": sorted(head["region_overrides"]),
        "sliders_vs_b": float(np.abs(np.array(a.imhead.regions[r0].sliders) - b_params["sliders"][r0][:8]).max()),
        "matrix_kept": [list(row) for row in a.matrix_world] == matrix,
        "has_attributes": all(k in a.data.attributes for k in ("imhead_canonical", "imhead_region")),
        "objects": len(_heads(scene)),
    }

    # Two slider moves in a row on another region: one edit in flight, one follow-up with both values.
    a.imhead.regions[r0].selected = False
    a.imhead.regions[r1].sliders[0] = 1.5
    a.imhead.regions[r1].sliders[1] = -1.0
    facts["slider_jobs_in_flight"] = len(service.jobs(a.name))
    service.drain(600)
    facts["sliders_after"] = list(a.imhead.regions[r1].sliders)[:2]
    facts["slider_overrides"] = sorted(json.loads(a.imhead.head_json)["region_overrides"])

    # Randomise the active region (nothing checked), then reset all three.
    a.imhead.active_region = names.index(r2)
    before = list(a.imhead.regions[r2].sliders)
    assert bpy.ops.imhead.region_edit(action="RANDOMISE") == {"FINISHED"}
    service.drain(600)
    facts["randomised_changed"] = list(a.imhead.regions[r2].sliders) != before
    facts["randomised_overrides"] = sorted(json.loads(a.imhead.head_json)["region_overrides"])
    for r in (r0, r1, r2):
        a.imhead.regions[r].selected = True
    assert bpy.ops.imhead.region_edit(action="RESET") == {"FINISHED"}
    service.drain(600)
    facts["reset_overrides"] = len(json.loads(a.imhead.head_json)["region_overrides"])
    facts["names"] = [r0, r1, r2]
    facts["status"] = list(service.status())
    service.shutdown()
    return facts


def scenario_fit(zip_path: str) -> dict:
    import bpy
    import numpy as np
    from mathutils import kdtree

    module = _install(bpy, zip_path)
    service = sys.modules[f"{module}.backend_service"]
    for obj in list(bpy.data.objects):
        bpy.data.objects.remove(obj)
    scene = bpy.context.scene
    scene.imhead.seed, scene.imhead.resolution = 4, 40
    assert bpy.ops.imhead.generate() == {"FINISHED"}
    service.drain(600)
    # An "imported character": plain mesh data in centimetres, moved and turned, no imHead state.
    head = _heads(scene)[0]
    co = np.empty(len(head.data.vertices) * 3, np.float32)
    head.data.vertices.foreach_get("co", co)
    region = np.empty(len(head.data.vertices), np.int32)
    head.data.attributes["imhead_region"].data.foreach_get("value", region)
    region_names = [r.name for r in head.imhead.regions]
    tris = np.empty(len(head.data.polygons) * 3, np.int32)
    head.data.polygons.foreach_get("vertices", tris)
    mesh = bpy.data.meshes.new("scan")
    mesh.from_pydata((co.reshape(-1, 3) * 100.0).tolist(), [], tris.reshape(-1, 3).tolist())
    scan = bpy.data.objects.new("scan", mesh)
    scene.collection.objects.link(scan)
    bpy.data.objects.remove(head)
    scan.location, scan.rotation_euler = (1.0, 2.0, 0.5), (0.4, 0.3, 1.1)
    bpy.context.view_layer.objects.active = scan
    bpy.context.view_layer.update()
    facts: dict = {}

    # Cancel a fit once it reports progress.
    scene.imhead.resolution = 32
    assert bpy.ops.imhead.fit_selected() == {"FINISHED"}
    job = service.jobs()[0]
    deadline = time.monotonic() + 300
    while job.future.progress <= 0.0 and not job.future.done() and time.monotonic() < deadline:
        service.pump_backend()
        time.sleep(0.02)
    facts["progress_seen"] = [job.future.progress, job.future.message]
    assert bpy.ops.imhead.cancel_job(request_id=job.request_id) == {"FINISHED"}
    service.drain(300)
    try:
        job.future.result()
        facts["cancel_code"] = "finished"
    except Exception as exc:
        facts["cancel_code"] = getattr(exc, "code", repr(exc))
    facts["heads_after_cancel"] = len(_heads(scene))

    # A short fit: a new head object overlays the scan in world space.
    bpy.context.view_layer.objects.active = scan
    assert bpy.ops.imhead.fit_selected(steps=5) == {"FINISHED"}
    job = service.jobs()[0]
    reply: dict = {}
    apply_reply = job.on_success

    def record(params, arrays):  # keep the real reply to check the overlay against
        reply["arrays"] = arrays
        apply_reply(params, arrays)

    job.on_success = record
    service.drain(900)
    heads = _heads(scene)
    facts["heads"] = len(heads)
    fitted = heads[0]
    bpy.context.view_layer.update()
    scan_world = np.array([scan.matrix_world @ v.co for v in scan.data.vertices])
    head_world = np.array([fitted.matrix_world @ v.co for v in fitted.data.vertices])
    tree = kdtree.KDTree(len(scan_world))
    for i, p in enumerate(scan_world):
        tree.insert(p, i)
    tree.balance()
    dist = np.array([tree.find(p)[2] for p in head_world])
    axes = sys.modules[f"{module}.axes"]
    # The backend's fitted vertices come in the scan's own frame (in backend axes); the head object, built in
    # the model frame with the overlay matrix, must put every vertex at the same place in the world.
    local = axes.backend_to_blender(reply["arrays"]["vertices"]).astype(np.float64)
    m = np.array(scan.matrix_world)
    expected = local @ m[:3, :3].T + m[:3, 3]
    facts["trained"] = service.handshake().trained
    facts["fit"] = {
        "overlay_max_diff_over_extent": float(np.abs(head_world - expected).max() / np.ptp(scan_world, axis=0).max()),
        "error_mm": fitted.imhead.fit_error_mm,
        "median_dist_over_extent": float(np.median(dist) / np.ptp(scan_world, axis=0).max()),
        "scale": list(fitted.matrix_world.to_scale()),
        "attributes": all(k in fitted.data.attributes for k in ("imhead_canonical", "imhead_region")),
        "head_json": bool(json.loads(fitted.imhead.head_json)["identity"]),
        "source_untouched": len(scan.data.vertices) == len(co) // 3 and not scan.imhead.is_head,
    }

    # Landmarks: vertex groups "imhead:<region>" over four regions' vertices. Two are refused before sending;
    # four replace the automatic hypotheses by their one Umeyama start.
    for name in ("nose tip", "chin", "left ear", "right ear"):
        group = scan.vertex_groups.new(name=f"imhead:{name}")
        group.add(np.flatnonzero(region == region_names.index(name)).tolist(), 1.0, "REPLACE")
    scan.vertex_groups.new(name="chin")  # a skinning group of a rig: not a landmark
    fit_module = sys.modules[f"{module}.operators.fit"]
    facts["landmark_names"] = fit_module.landmark_groups(scan)[0]
    for g in [g for g in scan.vertex_groups if g.name in ("imhead:chin", "imhead:left ear")]:
        scan.vertex_groups.remove(g)
    bpy.context.view_layer.objects.active = scan
    try:
        facts["two_landmarks"] = list(bpy.ops.imhead.fit_selected(steps=5))
    except RuntimeError as exc:  # the operator's ERROR report
        facts["two_landmarks"] = str(exc)
    for name in ("chin", "left ear"):
        scan.vertex_groups.new(name=f"imhead:{name}").add(
            np.flatnonzero(region == region_names.index(name)).tolist(), 1.0, "REPLACE")
    assert bpy.ops.imhead.fit_selected(steps=5) == {"FINISHED"}
    job = service.jobs()[0]
    apply_reply = job.on_success

    def record_params(params, arrays):
        reply["params"] = params
        apply_reply(params, arrays)

    job.on_success = record_params
    service.drain(900)
    newest = [h for h in _heads(scene) if h is not fitted][0]
    bpy.context.view_layer.update()
    head_world = np.array([newest.matrix_world @ v.co for v in newest.data.vertices])
    dist = np.array([tree.find(p)[2] for p in head_world])
    facts["landmark_fit"] = {"hypotheses": reply["params"]["alignment"]["hypotheses"],
                             "median_dist_over_extent": float(np.median(dist) / np.ptp(scan_world, axis=0).max())}
    facts["status"] = list(service.status())
    service.shutdown()
    return facts


SCENARIOS = {"lifecycle": scenario_lifecycle, "expressions": scenario_expressions, "regions": scenario_regions,
             "fit": scenario_fit}

if __name__ == "__main__":
    name, zip_arg, out_arg = sys.argv[1:4]
    result = SCENARIOS[name](zip_arg)
    Path(out_arg).write_text(json.dumps(result, indent=1))
