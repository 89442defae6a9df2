"""Render the documentation pictures with the real backend and Blender (Cycles on CPU).

    .venv/bin/python tools/render_docs.py --out docs/pictures [--samples N] [--resolution R] [--weights DIR]

Writes heads_grid.png (random heads), expressions_row.png (one head through the `deform` op) and
region_swap.png (A, B, A with B's nose and chin through the `edit` op, and the A'->A distance heat map).
Geometry comes from `backend.engine.session.Session` in-process; backend axes (metres, +Y up, face +Z) become
Blender's (Z up, face -Y) by (x, y, z) -> (x, -z, y). A docs tool: not shipped, not a test.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bpy  # noqa: E402
import torch  # noqa: E402
from scipy.spatial import cKDTree  # noqa: E402

from backend.engine.head import HeadSpec  # noqa: E402
from backend.engine.session import Session  # noqa: E402
from backend.engine.template import closest_point_on_triangles  # noqa: E402
from backend.weights import WEIGHTS_FILE  # noqa: E402

TURN_DEG = 30.0  # three-quarter view: each head turned about its vertical axis toward the viewer's right
TILT_DEG = 8.0  # camera looks slightly down
SPACING = 0.27  # m between head centres in a row / grid of whole heads
ROW_SPACING = 0.40
GRID_CUT_Y = -0.165  # m (backend +Y): the grid's busts end here, above the ragged shoulders at the box floor
CLOSE_SPACING = 0.24  # for neck-cut busts
CLOSE_ROW_SPACING = 0.34
NECK_CUT_Y = -0.115  # m (backend +Y): close-ups drop faces below this height
CLAY = (0.50, 0.50, 0.50, 1.0)
BACKDROP = (0.80, 0.81, 0.83, 1.0)
TEXT_PX = 26  # caption height in pixels (titles and captions scale with each picture's px_per_m)
LOCAL_MARGIN = 0.01  # m
SWAP_REGIONS = ["nose tip", "nose bridge", "left nostril", "right nostril", "chin"]
EXPRESSIONS: list[tuple[str, dict[str, float]]] = [
    ("neutral", {}),
    ("jawOpen", {"jawOpen": 1.0}),
    ("mouthSmile L+R", {"mouthSmile_L": 1.0, "mouthSmile_R": 1.0}),
    ("browInnerUp L+R", {"browInnerUp_L": 1.0, "browInnerUp_R": 1.0}),
    ("eyeBlink L+R", {"eyeBlink_L": 1.0, "eyeBlink_R": 1.0}),
    ("mouthPucker", {"mouthPucker": 1.0}),
    ("cheekPuff L+R", {"cheekPuff_L": 1.0, "cheekPuff_R": 1.0}),
    ("jawLeft", {"jawLeft": 1.0}),
]
# Heat ramp stops (sRGB): dark blue (no change) -> cyan -> yellow -> red (largest change).
RAMP = np.array([[0.10, 0.15, 0.45], [0.10, 0.60, 0.85], [0.95, 0.90, 0.25], [0.85, 0.15, 0.10]])


@dataclass
class Panel:
    vertices: np.ndarray  # (N,3) Blender axes, already turned and placed
    faces: np.ndarray  # (F,3) int32
    caption: str
    heat: np.ndarray | None = None  # (N,) per-vertex value in [0, 1] shown through RAMP, or None for clay
    row: int = 0  # captions sit under the lowest point of their row


@dataclass
class Picture:
    panels: list[Panel]
    title: str
    px_per_m: float  # image pixels per metre of scene
    legend: tuple[float, str] | None = None  # (max value, unit caption) of the heat ramp
    extra: list[str] = field(default_factory=list)  # lines under the title


# ---------------------------------------------------------------------- geometry (backend side)
def to_blender(v: np.ndarray) -> np.ndarray:
    """Backend (x, y, z) -> Blender (x, -z, y)."""
    v = np.asarray(v, np.float64)
    return np.stack([v[:, 0], -v[:, 2], v[:, 1]], 1)


def place(v_backend: np.ndarray, x: float, z: float) -> np.ndarray:
    """Turn a head by TURN_DEG about Blender's Z, then move its canonical origin to (x, 0, z)."""
    v = to_blender(v_backend)
    a = math.radians(TURN_DEG)
    rot = np.array([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])
    return v @ rot.T + np.array([x, 0.0, z])


def cut_neck(reference: np.ndarray, faces: np.ndarray, y_cut: float = NECK_CUT_Y) -> np.ndarray:
    """Faces (F',3) whose three vertices lie above y_cut in `reference` (backend axes)."""
    return faces[(reference[faces, 1] > y_cut).all(1)]


def surface_distance(points: np.ndarray, verts: np.ndarray, faces: np.ndarray, k: int = 8,
                     chunk: int = 8192) -> np.ndarray:
    """Distance (N,) from each point to the triangle mesh (verts, faces): exact point-triangle distance over
    the triangles around the k nearest mesh vertices. On uniform (marching-cubes) meshes the closest triangle
    touches one of them; on the ICT template this matched brute force over all triangles exactly."""
    order = np.argsort(faces.ravel(), kind="stable")
    vert_of, face_of = faces.ravel()[order], order // 3
    counts = np.bincount(vert_of, minlength=len(verts))
    width = int(counts.max())
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    vf = np.repeat(face_of[starts][:, None], width, 1)  # pad with each vertex's first face
    vf[vert_of, np.arange(len(vert_of)) - starts[vert_of]] = face_of
    tree = cKDTree(verts)
    tri_all = torch.as_tensor(verts[faces], dtype=torch.float64)
    out = np.empty(len(points))
    for s in range(0, len(points), chunk):
        p = points[s : s + chunk]
        _, near = tree.query(p, k=k)
        cand = torch.as_tensor(vf[near].reshape(len(p), -1))
        tri = tri_all[cand] - torch.as_tensor(p)[:, None, None, :]
        bc = closest_point_on_triangles(torch.zeros(len(p), 1, 3, dtype=torch.float64),
                                        tri[..., 0, :], tri[..., 1, :], tri[..., 2, :])
        out[s : s + chunk] = (bc[..., None] * tri).sum(-2).norm(dim=-1).min(1).values.numpy()
    return out


def srgb_to_linear(c: np.ndarray) -> np.ndarray:
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def log(t0: float, msg: str) -> None:
    print(f"[{time.time() - t0:6.1f} s] {msg}", flush=True)


def opened_mesh(s: Session, head: HeadSpec, res: int) -> tuple[np.ndarray, np.ndarray]:
    """The canonical mesh that `generate` returns (handles repaired, neck cut, lips and lids slit, one piece:
    docs/surface.md), the one the add-on shows and poses."""
    _, arrays = s.generate({"head": head.to_dict(), "resolution": res}, {})
    return arrays["canonical"], arrays["faces"]


def heads_grid(s: Session, seeds: list[int], cols: int, res: int, t0: float) -> Picture:
    panels = []
    rows = math.ceil(len(seeds) / cols)
    for n, seed in enumerate(seeds):
        r, c = divmod(n, cols)
        verts, faces = opened_mesh(s, HeadSpec(identity=s.sample_identity(seed)), res)
        x, z = (c - (cols - 1) / 2) * SPACING, ((rows - 1) / 2 - r) * ROW_SPACING
        panels.append(Panel(place(verts, x, z), cut_neck(verts, faces, GRID_CUT_Y), f"seed {seed}", row=r))
        log(t0, f"grid: seed {seed}: {len(verts)} vertices")
    title = (f"Random heads (seeds {seeds[0]}-{seeds[-1]}) at real scale, extraction resolution {res}, "
             f"cut {-GRID_CUT_Y * 100:g} cm below the origin")
    return Picture(panels, title, 1300.0)


def expressions_row(s: Session, seed: int, res: int, t0: float) -> Picture:
    head = HeadSpec(identity=s.sample_identity(seed))
    canonical, faces = opened_mesh(s, head, res)
    names = s.expression_names
    weights = np.zeros((len(EXPRESSIONS), len(names)), np.float32)
    for i, (_, expr) in enumerate(EXPRESSIONS):
        for name, w in expr.items():
            weights[i, names.index(name)] = w
    out, posed = s.deform({"head": head.to_dict()}, {"canonical": canonical, "expressions": weights})
    log(t0, f"expressions: {len(EXPRESSIONS)} frames x {len(canonical)} vertices, "
            f"non-converged {out['non_converged']}, residual p99 {out['residual_p99_m'] * 1e3:.3f} mm")
    faces = cut_neck(canonical, faces)
    cols = math.ceil(len(EXPRESSIONS) / 2)
    panels = []
    for i, (label, _) in enumerate(EXPRESSIONS):
        r, c = divmod(i, cols)
        x, z = (c - (cols - 1) / 2) * CLOSE_SPACING, (0.5 - r) * CLOSE_ROW_SPACING
        panels.append(Panel(place(posed["vertices"][i], x, z), faces, label, row=r))
    title = f"One head (seed {seed}) through the deform op: same vertices and faces in every pose"
    return Picture(panels, title, 2000.0,
                   extra=[f"{len(canonical)} vertices; sdf residual p99 {out['residual_p99_m'] * 1e3:.2f} mm, "
                          f"{out['non_converged']} of {len(EXPRESSIONS) * len(canonical)} not converged"])


def region_swap(s: Session, seed_a: int, seed_b: int, res: int, t0: float) -> Picture:
    head_a, head_b = (HeadSpec(identity=s.sample_identity(seed)) for seed in (seed_a, seed_b))
    a_v, a_f = opened_mesh(s, head_a, res)
    b_v, b_f = opened_mesh(s, head_b, res)
    ops = [{"op": "swap", "regions": SWAP_REGIONS, "other": head_b.to_dict()}]
    _, a2 = s.edit({"head": head_a.to_dict(), "ops": ops, "resolution": res}, {})
    d_mm = surface_distance(a2["vertices"].astype(np.float64), a_v.astype(np.float64), a_f) * 1e3
    swapped = np.isin(a2["region"], [s.region_names.index(r) for r in SWAP_REGIONS])
    # Locality as the eval command measures it: vertices farther than LOCAL_MARGIN from the swapped regions.
    far, _ = cKDTree(a2["vertices"][swapped]).query(a2["vertices"][~swapped])
    outside = d_mm[~swapped][far > LOCAL_MARGIN]
    vmax = max(1.0, float(np.ceil(np.percentile(d_mm, 99.5))))
    stat = (f"vertices > {LOCAL_MARGIN * 100:g} cm from the swapped regions: p95 {np.percentile(outside, 95):.3f} mm, "
            f"max {outside.max():.2f} mm; overall max {d_mm.max():.2f} mm")
    log(t0, "swap: " + stat)
    xs = [(i - 1.5) * CLOSE_SPACING for i in range(4)]
    f_a2 = cut_neck(a2["vertices"], a2["faces"])
    panels = [Panel(place(a_v, xs[0], 0), cut_neck(a_v, a_f), f"A (seed {seed_a})"),
              Panel(place(b_v, xs[1], 0), cut_neck(b_v, b_f), f"B (seed {seed_b})"),
              Panel(place(a2["vertices"], xs[2], 0), f_a2, "A' = A with B's nose + chin"),
              Panel(place(a2["vertices"], xs[3], 0), f_a2, "distance A' -> A surface",
                    heat=np.clip(d_mm / vmax, 0.0, 1.0))]
    return Picture(panels, "Region swap through the edit op: " + ", ".join(SWAP_REGIONS) + " from B", 2000.0,
                   legend=(vmax, "mm"),
                   extra=[stat])


# ---------------------------------------------------------------------- Blender side
CAMERA_EULER = (math.pi / 2 - math.radians(TILT_DEG), 0.0, 0.0)  # looks along +Y, tilted down by TILT_DEG


def camera_basis() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The orthographic camera's right, up and viewing directions (Blender axes); screen u = p.right,
    v = p.up."""
    t = math.radians(TILT_DEG)
    right, up = np.array([1.0, 0.0, 0.0]), np.array([0.0, math.sin(t), math.cos(t)])
    return right, up, np.array([0.0, math.cos(t), -math.sin(t)])


def reset_scene(samples: int) -> bpy.types.Scene:
    bpy.ops.wm.read_factory_settings(use_empty=True)
    sc = bpy.context.scene
    sc.render.engine = "CYCLES"
    cy = sc.cycles
    cy.device = "CPU"
    cy.samples = samples
    cy.use_adaptive_sampling = True
    cy.use_denoising = True
    cy.denoiser = "OPENIMAGEDENOISE"
    cy.max_bounces, cy.diffuse_bounces, cy.glossy_bounces, cy.transmission_bounces = 3, 2, 1, 0
    cy.caustics_reflective = cy.caustics_refractive = False
    sc.view_settings.view_transform = "Standard"  # exact heat-map colours
    sc.render.image_settings.file_format = "PNG"
    sc.render.image_settings.color_mode = "RGB"  # opaque backdrop: no alpha channel to store
    sc.render.image_settings.compression = 90
    sc.render.resolution_percentage = 100
    world = bpy.data.worlds.new("world")  # Blender 5 data-blocks come with a node tree
    nt = world.node_tree
    # Camera rays see a light backdrop; everything else gets a dimmer ambient light.
    backdrop, ambient = nt.nodes["Background"], nt.nodes.new("ShaderNodeBackground")
    backdrop.inputs["Color"].default_value = BACKDROP
    ambient.inputs["Color"].default_value = (0.30, 0.31, 0.33, 1.0)
    path, mix = nt.nodes.new("ShaderNodeLightPath"), nt.nodes.new("ShaderNodeMixShader")
    nt.links.new(path.outputs["Is Camera Ray"], mix.inputs["Fac"])
    nt.links.new(ambient.outputs[0], mix.inputs[1])
    nt.links.new(backdrop.outputs[0], mix.inputs[2])
    nt.links.new(mix.outputs[0], nt.nodes["World Output"].inputs["Surface"])
    sc.world = world
    for name, rot, energy, angle in (("key", (50, 0, -35), 2.2, 25), ("fill", (70, 0, 60), 0.5, 40),
                                     ("rim", (-60, 0, 170), 1.5, 15)):
        light = bpy.data.lights.new(name, "SUN")
        light.energy, light.angle = energy, math.radians(angle)
        obj = bpy.data.objects.new(name, light)
        obj.rotation_euler = tuple(math.radians(v) for v in rot)
        sc.collection.objects.link(obj)
    assert sc is not None
    return sc


def material(name: str, color: tuple | None, emission: bool = False, heat: bool = False) -> bpy.types.Material:
    """Grey/black clay, or (heat=True) a colour from RAMP at the per-vertex value stored in UV map 'heat'.
    The value travels as a UV coordinate because this bpy build's Cycles reads generic colour attributes
    as black, while UV maps arrive intact."""
    mat = bpy.data.materials.new(name)
    nt = mat.node_tree
    nt.nodes.clear()
    out = nt.nodes.new("ShaderNodeOutputMaterial")
    shader = nt.nodes.new("ShaderNodeEmission" if emission else "ShaderNodeBsdfPrincipled")
    if not emission:
        shader.inputs["Roughness"].default_value = 0.55
        shader.inputs["Specular IOR Level"].default_value = 0.3
    key = "Color" if emission else "Base Color"
    if heat:
        uv, split, ramp = (nt.nodes.new(k) for k in ("ShaderNodeUVMap", "ShaderNodeSeparateXYZ", "ShaderNodeValToRGB"))
        uv.uv_map = "heat"
        elements = ramp.color_ramp.elements
        while len(elements) < len(RAMP):
            elements.new(0.0)
        for el, pos, rgb in zip(elements, np.linspace(0.0, 1.0, len(RAMP)), srgb_to_linear(RAMP)):
            el.position, el.color = float(pos), (*rgb, 1.0)
        nt.links.new(uv.outputs["UV"], split.inputs[0])
        nt.links.new(split.outputs["X"], ramp.inputs["Fac"])
        nt.links.new(ramp.outputs["Color"], shader.inputs[key])
    else:
        shader.inputs[key].default_value = color
    nt.links.new(shader.outputs[0], out.inputs["Surface"])
    return mat


def mesh_object(sc: bpy.types.Scene, name: str, verts: np.ndarray, faces: np.ndarray, mat: bpy.types.Material,
                heat: np.ndarray | None = None) -> bpy.types.Object:
    me = bpy.data.meshes.new(name)
    me.vertices.add(len(verts))
    me.vertices.foreach_set("co", np.ascontiguousarray(verts, np.float32).ravel())
    me.loops.add(faces.size)
    me.loops.foreach_set("vertex_index", np.ascontiguousarray(faces, np.int32).ravel())
    me.polygons.add(len(faces))
    me.polygons.foreach_set("loop_start", np.arange(0, faces.size, 3, dtype=np.int32))
    me.polygons.foreach_set("loop_total", np.full(len(faces), 3, np.int32))
    me.update(calc_edges=True)
    me.validate()
    me.shade_smooth()
    if heat is not None:
        uv = me.uv_layers.new(name="heat")
        per_loop = np.asarray(heat, np.float32)[np.asarray(faces).ravel()]
        uv.data.foreach_set("uv", np.stack([per_loop, np.zeros_like(per_loop)], 1).ravel())
    me.materials.append(mat)
    obj = bpy.data.objects.new(name, me)
    sc.collection.objects.link(obj)
    return obj


def text_object(sc: bpy.types.Scene, body: str, u: float, v: float, size: float, mat: bpy.types.Material,
                align: str = "CENTER") -> None:
    """A caption in the camera plane at screen coordinates (u, v) (metres along the camera's right/up)."""
    curve = bpy.data.curves.new(f"text_{len(bpy.data.curves)}", type="FONT")
    curve.body, curve.size, curve.align_x, curve.align_y = body, size, align, "CENTER"
    curve.materials.append(mat)
    obj = bpy.data.objects.new(curve.name, curve)
    right, up, forward = camera_basis()
    obj.location = tuple(u * right + v * up - 0.3 * forward)  # in front of the heads
    obj.rotation_euler = CAMERA_EULER
    sc.collection.objects.link(obj)


def render(pic: Picture, path: Path, samples: int) -> None:
    sc = reset_scene(samples)
    clay = material("clay", CLAY)
    heat = material("heat", None, heat=True)
    ink = material("ink", (0.02, 0.02, 0.02, 1.0), emission=True)
    right, up, forward = camera_basis()
    all_v = np.concatenate([p.vertices[np.unique(p.faces)] for p in pic.panels])
    u_all, v_all = all_v[:, 0], all_v @ up
    lo_v, hi_v = float(v_all.min()), float(v_all.max())
    ts = TEXT_PX / pic.px_per_m  # caption height, m
    margin = 1.5 * ts
    caption_gap = 2.2 * ts
    for i, p in enumerate(pic.panels):
        mesh_object(sc, f"head_{i}", p.vertices, p.faces, heat if p.heat is not None else clay, p.heat)
        row_lo = min(float((q.vertices[np.unique(q.faces)] @ up).min()) for q in pic.panels if q.row == p.row)
        used = p.vertices[np.unique(p.faces)]
        text_object(sc, p.caption, 0.5 * float(used[:, 0].min() + used[:, 0].max()), row_lo - caption_gap * 0.6,
                    ts, ink)
    lo_u, hi_u = float(u_all.min()) - margin, float(u_all.max()) + margin
    lines = [pic.title] + pic.extra
    top = hi_v + margin + len(lines) * 1.6 * ts
    for n, line in enumerate(lines):
        text_object(sc, line, lo_u + 0.5 * ts, hi_v + margin + (len(lines) - n - 0.5) * 1.6 * ts,
                    ts * (1.0 if n == 0 else 0.8), ink, align="LEFT")
    bottom = lo_v - caption_gap - margin
    if pic.legend is not None:
        vmax, unit = pic.legend
        hi_u = legend(sc, hi_u, lo_v, hi_v, vmax, unit, ink, ts)
    width, height = hi_u - lo_u, top - bottom
    cam_data = bpy.data.cameras.new("cam")
    cam_data.type = "ORTHO"
    cam_data.ortho_scale = max(width, height)
    cam = bpy.data.objects.new("cam", cam_data)
    centre = 0.5 * (lo_u + hi_u) * right + 0.5 * (bottom + top) * up
    cam.location = tuple(centre - 2.0 * forward)
    cam.rotation_euler = CAMERA_EULER
    sc.collection.objects.link(cam)
    sc.camera = cam
    sc.render.resolution_x = int(round(width * pic.px_per_m))
    sc.render.resolution_y = int(round(height * pic.px_per_m))
    sc.render.filepath = str(path)
    bpy.ops.render.render(write_still=True)


def legend(sc: bpy.types.Scene, hi_u: float, lo_v: float, hi_v: float, vmax: float, unit: str,
           ink: bpy.types.Material, ts: float) -> float:
    """A vertical colour bar right of the panels with tick labels; returns the new right edge."""
    right, up, forward = camera_basis()
    n = 64
    v0, v1 = lo_v + 0.25 * (hi_v - lo_v), hi_v - 0.25 * (hi_v - lo_v)
    u0, u1 = hi_u + 0.5 * ts, hi_u + 1.3 * ts
    levels = np.linspace(0.0, 1.0, n + 1)
    v = (v0 + levels * (v1 - v0))[:, None, None] * up
    verts = (np.stack([u0 * right, u1 * right])[None] + v - 0.3 * forward).reshape(-1, 3)  # (left, right) per level
    i = 2 * np.arange(n)[:, None]
    faces = np.concatenate([i + [0, 1, 3], i + [0, 3, 2]])
    mesh_object(sc, "legend", verts, faces.astype(np.int32), material("legend", None, emission=True, heat=True),
                np.repeat(levels, 2))
    for frac in (0.0, 0.5, 1.0):
        text_object(sc, f"{frac * vmax:g} {unit}" if frac == 1.0 else f"{frac * vmax:g}", u1 + 0.4 * ts,
                    v0 + frac * (v1 - v0), ts * 0.8, ink, align="LEFT")
    return u1 + 3.5 * ts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="output folder for the PNGs")
    ap.add_argument("--samples", type=int, default=16, help="Cycles samples per pixel (denoised)")
    ap.add_argument("--resolution", type=int, default=128,
                    help="extraction resolution (cells along 0.40 m) of the expression and swap heads")
    ap.add_argument("--grid-resolution", type=int, default=96, help="extraction resolution of the grid's heads")
    ap.add_argument("--weights", type=Path, default=ROOT / "weights", help="weights folder")
    ap.add_argument("--only", choices=["grid", "expressions", "swap"], action="append",
                    help="render only these pictures (repeatable)")
    args = ap.parse_args()
    if args.samples < 1:
        ap.error("--samples must be >= 1")
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.time()
    s = Session(args.weights, device="cpu")
    wfile = args.weights / WEIGHTS_FILE
    tag = hashlib.sha256(wfile.read_bytes()).hexdigest()[:12] if wfile.exists() else "UNTRAINED (no weights file)"
    log(t0, f"weights: {tag}; trained={s.info()['trained']}")
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = {
        "grid": lambda: heads_grid(s, list(range(9)), 3, args.grid_resolution, t0),
        "expressions": lambda: expressions_row(s, 3, args.resolution, t0),
        "swap": lambda: region_swap(s, 1, 5, args.resolution, t0),
    }
    files = {"grid": "heads_grid.png", "expressions": "expressions_row.png", "swap": "region_swap.png"}
    for key in args.only or list(jobs):
        pic = jobs[key]()
        pic.extra.append(f"weights sha256 {tag}; Cycles CPU, {args.samples} samples, denoised")
        render(pic, args.out / files[key], args.samples)
        log(t0, f"wrote {args.out / files[key]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
