"""`imhead eval`: the shipped weights on the held-out split (backend/data/splits.py).

For each held-out identity: sample --points surface points (area-uniform, exposed ICT triangles) of its
neutral mesh, fit z_id to them (backend.model.inversion), extract the surface (backend.engine.extract) and
score it with backend.data.metrics (CD-L1, NC, F@1mm; point to surface, mm at real scale). Then, per identity,
--expressions held-out expressions are fitted (z_exp, starting from the neutral fit) and scored the same way, and
each of the 53 named expressions at weight 1 is checked where ICT moves the skin: the backward warp of the
ground-truth posed vertices against their neutral positions (what the deform op inverts). The
correspondence head is scored at the ground-truth vertices (neutral and posed) against their ICT mean-head
positions. Locality: region j's code of identity A is replaced by identity B's; the surface movement is the
change of the SDF at A's surface points (first order in the displacement), reported outside a 1 cm margin
around region j's surface on A's ground-truth mesh (dense surface samples labelled by the atlas as the sampler
labels its points; the distance to region j's vertices, the older margin, is reported beside it).
Defaults finish in minutes on a CPU; `--full` is the GPU-sized run.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from typing import TYPE_CHECKING, Any
from pathlib import Path

import numpy as np
import torch

from .. import errors
from ..weights import default_weights_dir

if TYPE_CHECKING:
    from ..engine.extract import Mesh

TARGETS = {"cd_l1_mm": 0.30, "nc": 0.99, "f1mm": 0.95, "exp_cd_l1_mm": 0.40, "corr_mm": 1.5, "locality_p95_mm": 0.1}
CARD_BEGIN, CARD_END = "<!-- eval:begin -->", "<!-- eval:end -->"
SKIN_PARTS = ("face", "head_neck")
MOTION_MIN = 0.002  # m: skin vertices an expression moves at least this far are scored


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ict", type=Path, default=default_weights_dir().parent / ".data" / "ict.safetensors",
                   help="converted ICT-FaceKit file")
    p.add_argument("--weights", type=Path, default=None, help="weights folder (default: the shipped weights/)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="torch device")
    p.add_argument("--identities", type=int, default=2, help="held-out identities to fit")
    p.add_argument("--expressions", type=int, default=1, help="held-out expressions per identity")
    p.add_argument("--points", type=int, default=10_000, help="surface points each fit sees")
    p.add_argument("--steps", type=int, default=60, help="fitting steps")
    p.add_argument("--batch-points", type=int, default=1024, help="points per fitting step")
    p.add_argument("--resolution", type=int, default=96, help="resolution of the extracted surfaces")
    p.add_argument("--samples", type=int, default=100_000, help="metric samples per mesh")
    p.add_argument("--topk", type=int, default=0,
                   help="regions evaluated per point (0: all 39, exact; the model is trained dense)")
    p.add_argument("--locality-regions", type=int, default=3, help="regions whose swap is scored for locality")
    p.add_argument("--full", action="store_true",
                   help="GPU size: 20 identities x 3 expressions, 300 steps, 2048 points a step, resolution 256")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="start no new identity after this many minutes (locality and the summary still run; "
                        "default: no limit)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here (default: not written)")
    p.add_argument("--write-card", type=Path, default=None,
                   help="replace the eval block of this model card (default: no card is changed)")


def check(args: argparse.Namespace) -> None:
    from ..engine.cli import check_input, check_output, check_weights

    check_weights(args)
    if not args.ict.exists():
        raise errors.InvalidInput(f"{args.ict} not found: convert ICT-FaceKit first (python -m backend.data.ict)")
    if args.json is not None:
        check_output(args.json, "--json")
    if args.write_card is not None:
        check_input(args.write_card, "--write-card")
        check_output(args.write_card, "--write-card")


def run(args: argparse.Namespace) -> int:
    from ..data import metrics, splits
    from ..data.atlas import load_atlas
    from ..data.ict import load_ict
    from ..model.inversion import fit_latents
    from ..weights import load_model

    if args.full:
        args.identities, args.expressions, args.steps, args.resolution, args.batch_points = 20, 3, 300, 256, 2048
    if not args.ict.exists():
        raise errors.InvalidInput(f"{args.ict} not found: convert ICT-FaceKit first (python -m backend.data.ict)")
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
    lm = load_model(args.weights, device=str(dev))
    model, ex = lm.model, lm.extras
    ict, atlas = load_ict(args.ict), load_atlas()
    topk = args.topk or None
    ids = splits.heldout_identities()[: args.identities]
    exps = splits.heldout_expressions(list(ict.expressions))[1 : 1 + args.expressions]  # row 0 is neutral
    exposed = (ict.face_buried == 0).astype(np.float64)
    exposed_verts = np.unique(ict.faces[ict.face_buried == 0])
    skin_verts = skin_vertices(ict)
    motions: list[dict[str, float]] = []
    t_start = time.time()

    def tens(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a, np.float32), device=dev)

    def fit(verts: np.ndarray, seed: int, fit_expression: bool, init: torch.Tensor | None = None):
        pts, nrm, _ = metrics.sample_mesh(verts, ict.faces, args.points, seed, exposed)
        return fit_latents(model, tens(pts), tens(nrm), fit_expression=fit_expression, steps=args.steps,
                           id_mean=ex["id_mean"], id_chol=ex["id_chol"], batch_points=args.batch_points,
                           topk=topk, init_z_id=init, seed=seed)

    mesh_of = partial(surface_of, model, resolution=args.resolution, topk=topk, device=dev)
    rows: list[dict] = []
    fits = []
    for i, c in enumerate(ids):
        if args.max_minutes is not None and i >= 2 and time.time() - t_start > 60 * args.max_minutes:
            print(f"time budget of {args.max_minutes} min reached after {i} identities", flush=True)
            break
        gt = ict.vertices(c, None)
        res = fit(gt, seed=i, fit_expression=False)
        fits.append((res, gt))
        mesh = mesh_of(res.zr, res.z_id, None)
        m = metrics.evaluate_ict(mesh.vertices, mesh.faces, gt, ict, n=args.samples, seed=i, device=dev)
        with torch.no_grad():
            t = model.template(tens(gt[exposed_verts])[None], res.zr, model.anchors(res.zr), topk=topk)[0]
        corr = float(np.linalg.norm(t.cpu().double().numpy() - ict.neutral[exposed_verts], axis=1).mean())
        row = {"identity": i, "cd_l1_mm": m["head"]["chamfer_l1"], "nc": m["head"]["normal_consistency"],
               "f1mm": m["head"]["f_score@1mm"], "face_cd_l1_mm": m["face"]["chamfer_l1"],
               "corr_mm": corr * 1e3, "fit_abs_sdf_mm": float(res.final_abs_sdf[0]) * 1e3}
        motion = named_expression_errors(model, res.z_id, ict, gt, skin_verts, tens)
        motions.append(motion)
        row["motion_err_mm"] = float(np.mean(list(motion.values())))
        row["blink_err_mm"] = float(np.mean([motion["eyeBlink_L"], motion["eyeBlink_R"]]))
        exp_rows = []
        for j, w in enumerate(exps):
            gtp = ict.vertices(c, w)
            rp = fit(gtp, seed=1000 * i + j, fit_expression=True, init=res.z_id)
            mp = mesh_of(rp.zr, rp.z_id, rp.z_exp)
            me = metrics.evaluate_ict(mp.vertices, mp.faces, gtp, ict, n=args.samples, seed=j, device=dev)
            with torch.no_grad():
                x = tens(gtp[exposed_verts])[None]
                xc = x + model.warp(x, rp.z_exp, rp.z_id)
                tp = model.template(xc, rp.zr, model.anchors(rp.zr), topk=topk)[0].cpu().double().numpy()
            exp_rows.append((me["head"]["chamfer_l1"],
                             float(np.linalg.norm(tp - ict.neutral[exposed_verts], axis=1).mean()) * 1e3))
        if exp_rows:
            row["exp_cd_l1_mm"] = float(np.mean([e[0] for e in exp_rows]))
            row["exp_corr_mm"] = float(np.mean([e[1] for e in exp_rows]))
        rows.append(row)
        print(json.dumps(row), flush=True)

    loc = locality(model, fits, atlas, mesh_of, args, topk, dev) if len(fits) >= 2 else {}
    summary: dict[str, Any] = {k: float(np.mean([r[k] for r in rows if k in r])) for k in rows[0] if k != "identity"}
    summary.update(loc)
    per_expression = {k: float(np.mean([m[k] for m in motions])) for k in motions[0]}
    summary["motion_worst"] = sorted(per_expression, key=per_expression.__getitem__)[::-1][:3]
    summary.update(identities=len(rows), expressions_per_identity=len(exps), resolution=args.resolution,
                   steps=args.steps, points=args.points, samples=args.samples, topk=args.topk,
                   device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                   seconds=round(time.time() - t_start, 1), trained=lm.trained)
    table = format_table(summary)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "rows": rows, "named_expressions_mm": per_expression},
                                        indent=1))
    if args.write_card:
        write_card(args.write_card, table)
    return 0


def surface_of(model, zr: torch.Tensor, z_id: torch.Tensor, z_exp: torch.Tensor | None, *, resolution: int,
               topk: int | None, device: torch.device) -> Mesh:
    """The fitted head's surface (posed by z_exp, else neutral): model.sdf through extract_mesh in the engine's
    network-call chunks (tuning.CHUNKS, CUDA's being extract_mesh's default): on CPU the all-region activations
    of the default chunk do not fit in memory at resolution 256 (docs/benchmarks.md)."""
    from ..engine.extract import extract_mesh
    from ..engine.tuning import CHUNKS, for_device

    k = model.anchors(zr)

    def sdf(p: torch.Tensor) -> torch.Tensor:
        x = p[None]
        if z_exp is not None:
            x = x + model.warp(x, z_exp, z_id)
        return model.sdf(x, zr, k, topk=topk)[0]

    with torch.no_grad():
        return extract_mesh(sdf, resolution, device=device, chunk=for_device(CHUNKS, device.type))[0]


def sdf_at(model, x: torch.Tensor, zr: torch.Tensor, topk: int | None) -> torch.Tensor:
    """model.sdf at points (N,3) -> (N,), chunked as the engine evaluates a lattice (extract_grid._evaluate: the
    engine's network-call chunks, threads on CPU, non-finite values raise; CUDA's 2^18 points take a 256^3 mesh's
    vertices in one call)."""
    from ..engine.extract_grid import _evaluate
    from ..engine.tuning import CHUNKS, for_device

    k = model.anchors(zr)
    return _evaluate(lambda p: model.sdf(p[None], zr, k, topk=topk)[0], x, for_device(CHUNKS, x.device.type))


def skin_vertices(ict) -> np.ndarray:
    """The ICT vertices of the face and head/neck surfaces (not sockets, eyeballs or the neck cap)."""
    return np.unique(ict.faces[np.isin(ict.face_part, [ict.face_parts.index(n) for n in SKIN_PARTS])])


def named_expression_errors(model, z_id: torch.Tensor, ict, neutral_mesh: np.ndarray, verts: np.ndarray,
                            tens) -> dict[str, float]:
    """Per named expression at weight 1: the mean distance (mm) from each skin vertex's ground-truth neutral
    position (neutral_mesh (V,3), the identity's ICT vertices) to where the model's backward warp sends its
    ground-truth posed position, over the vertices `verts` that ICT moves more than MOTION_MIN. A warp that
    ignores an expression scores about ICT's own motion there."""
    neutral = neutral_mesh[verts]
    out: dict[str, float] = {}
    with torch.no_grad():
        for e, name in enumerate(ict.expressions):
            delta = ict.exp_basis[e][verts]
            moving = np.linalg.norm(delta, axis=1) > MOTION_MIN
            if not moving.any():
                continue
            w = np.zeros((1, len(ict.expressions)), np.float32)
            w[0, e] = 1.0
            xp = tens((neutral + delta)[moving])[None]
            xc = (xp + model.warp(xp, tens(w), z_id))[0].cpu().double().numpy()
            out[name] = float(np.linalg.norm(xc - neutral[moving], axis=1).mean()) * 1e3
    return out


LOCALITY_MARGIN = 0.01  # m
LOCALITY_SAMPLES = 600_000  # surface samples of A's mesh that stand for the regions' surfaces (~0.6 mm apart)


def locality(model, fits, atlas, mesh_of, args, topk, dev) -> dict[str, Any]:
    """Swap region j of identity A for identity B's; SDF change at A's surface outside j's 1 cm margin.
    The margin is the distance to region j's surface; `locality_p95_vertex_margin_mm` is the same with the
    distance to its vertices, which counts the inside of a large triangle (the neck cap's) as outside."""
    from scipy.spatial import cKDTree

    from ..data.atlas import labelled_surface_samples

    (ra, gta), (rb, _) = fits[0], fits[1]
    mesh = mesh_of(ra.zr, ra.z_id, None)
    v = torch.as_tensor(mesh.vertices, device=dev)
    regions = np.linspace(0, model.cfg.n_regions - 1, args.locality_regions).round().astype(int)
    samples, label = labelled_surface_samples(gta, atlas.faces, atlas.region, LOCALITY_SAMPLES)
    p95: list[float] = []
    p95_dense: list[float] = []
    p95_vertex: list[float] = []
    inside: list[float] = []
    # the dense column is the first one when the eval itself is dense (topk None): evaluated once, not twice
    settings = [(topk, p95)] + ([(None, p95_dense)] if topk is not None else [])
    with torch.no_grad():
        base = {tk: sdf_at(model, v, ra.zr, tk) for tk, _ in settings}  # A's own field: once, not per region
        for j in regions:
            zr = ra.zr.clone()
            zr[:, j] = rb.zr[:, j]
            dist_j, _ = cKDTree(samples[label == j]).query(mesh.vertices)
            outside = dist_j >= LOCALITY_MARGIN
            for i, (tk, out) in enumerate(settings):
                d = (sdf_at(model, v, zr, tk) - base[tk]).abs().cpu().numpy() * 1e3
                out.append(float(np.percentile(d[outside], 95)))
                if i == 0:
                    inside.append(float(np.percentile(d[dist_j < 0.005], 95)) if (dist_j < 0.005).any() else 0.0)
                    vertex_dist, _ = cKDTree(gta[atlas.region == j]).query(mesh.vertices)
                    p95_vertex.append(float(np.percentile(d[vertex_dist >= LOCALITY_MARGIN], 95)))
    dense = p95_dense if topk is not None else p95
    return {"locality_p95_mm": float(np.mean(p95)), "locality_p95_dense_mm": float(np.mean(dense)),
            "locality_p95_vertex_margin_mm": float(np.mean(p95_vertex)),
            "locality_inside_p95_mm": float(np.mean(inside)), "locality_regions": [int(r) for r in regions]}


def format_table(s: dict) -> str:
    def cell(key: str, fmt: str) -> str:
        return format(s[key], fmt) if key in s else "n/a"

    lines = [
        f"Held-out evaluation: {s['identities']} identities x {s['expressions_per_identity']} expressions, "
        f"fit from {s['points']} points ({s['steps']} steps), resolution {s['resolution']}, "
        f"{s['samples']} metric samples, topk {s['topk']}, {s['device']}, {s['seconds']} s",
        "",
        "| metric | value | target | met |",
        "|---|---|---|---|",
    ]
    spec = [("CD-L1 neutral (mm)", "cd_l1_mm", ".3f", "<="), ("normal consistency", "nc", ".4f", ">="),
            ("F-score @1 mm", "f1mm", ".3f", ">="), ("CD-L1 held-out expressions (mm)", "exp_cd_l1_mm", ".3f", "<="),
            ("correspondence error, neutral (mm)", "corr_mm", ".2f", "<="),
            ("locality: p95 movement outside 1 cm margin (mm)", "locality_p95_mm", ".3f", "<=")]
    for name, key, fmt, op in spec:
        met = "n/a"
        if key in s:
            met = "yes" if (s[key] <= TARGETS[key] if op == "<=" else s[key] >= TARGETS[key]) else "NO"
        lines.append(f"| {name} | {cell(key, fmt)} | {op} {TARGETS[key]} | {met} |")
    lines += [f"| CD-L1 face area (mm) | {cell('face_cd_l1_mm', '.3f')} | | |",
              f"| correspondence error, expressions (mm) | {cell('exp_corr_mm', '.2f')} | | |",
              f"| locality p95, dense evaluation (mm) | {cell('locality_p95_dense_mm', '.3f')} | | |",
              f"| locality p95, margin by distance to the region's vertices (before 2026-12-07) (mm) | "
              f"{cell('locality_p95_vertex_margin_mm', '.3f')} | | |",
              f"| swapped region itself, p95 change within 5 mm (mm) | {cell('locality_inside_p95_mm', '.3f')} | | |",
              f"| mean fitted abs SDF at the input points (mm) | {cell('fit_abs_sdf_mm', '.3f')} | | |",
              f"| named expressions at weight 1: warp error where ICT moves the skin > 2 mm, mean of 53 (mm) | "
              f"{cell('motion_err_mm', '.2f')} | | |",
              f"| the same, eyeBlink_L/R (mm) | {cell('blink_err_mm', '.2f')} | | |",
              f"| worst named expressions | {', '.join(s.get('motion_worst', [])) or 'n/a'} | | |"]
    return "\n".join(lines)


def write_card(path: Path, table: str) -> None:
    text = path.read_text() if path.exists() else ""
    block = f"{CARD_BEGIN}\n{table}\n{CARD_END}"
    if CARD_BEGIN in text and CARD_END in text:
        head, rest = text.split(CARD_BEGIN, 1)
        text = head + block + rest.split(CARD_END, 1)[1]
    else:
        text = text + "\n" + block + "\n"
    path.write_text(text)
