"""Reconstruction metrics after NPHM's public evaluation (Giebenhain et al. 2023,
src/NPHM/evaluation/metrics.py: eval_pointcloud), in millimetres at real scale, measured point to surface.

    m = evaluate(pred_verts, pred_faces, gt_verts, gt_faces, device=dev)      # meshes in metres
    m = evaluate_ict(pred_verts, pred_faces, gt_verts, ict, device=dev)       # GT on the ICT topology:
                                                                              # "head" and "face" variants
Both meshes are sampled area-uniformly (n points each, default 200,000, face normals; seeded). Accuracy is
the distance from each predicted sample to the ground-truth SURFACE (its closest point on the GT triangles,
exact up to float32 rounding: engine.template.TriangleTree, on `device`), completeness the distance from
each GT sample to the predicted surface:
    accuracy, completeness        means (mm)
    chamfer_l1 = (accuracy + completeness) / 2                               (mm)
    chamfer_l2 = (mean accuracy^2 + mean completeness^2) / 2                 (mm^2)
    normal_consistency = (mean |n_pred . n_gt(closest triangle)| + mean |n_gt . n_pred(closest triangle)|) / 2
    f_score@t = 2 P R / (P + R), P = share of accuracy <= t, R = share of completeness <= t, t in mm
A mesh scored against itself gives ~0 (float32 rounding, larger on long thin triangles: up to 5e-3 mm on
the ICT neck cap's 25 cm x 1 cm fan), whatever n: NPHM's point-to-point distances
(nearest sample of the other cloud) measure the sampling as well, 0.5 / sqrt(samples per m^2) for two
independent samplings of one surface (docs/benchmarks.md: 0.55 mm for an ICT head at 200k samples).
Other differences from NPHM: thresholds 1, 2.5 and 5 mm (NPHM reports 1, 5, 10, 20); samples cover the whole
surface (NPHM samples the rendered visible surface); the face region is ICT's narrow face area (vertices
[0, 6706)) instead of a FLAME region: GT samples on triangles whose corners all lie in the face area,
predicted samples whose nearest GT vertex is a face-area vertex within 10 mm (as NPHM selects points near the
registered face region), the distances of both to the other mesh's whole surface.
"""

from __future__ import annotations

import numpy as np
import torch

from ..engine.template import TEMPLATE_GPU_CHUNK, TriangleTree

THRESHOLDS_MM = (1.0, 2.5, 5.0)
FACE_AREA = (0, 6706)          # ICT "Narrow face area" vertex range (README, Face Area Details)
FACE_RADIUS_M = 0.01
CPU_CHUNK = 8192               # points per TriangleTree pass on CPU (bounds the candidate arrays)


def sample_mesh(verts: np.ndarray, faces: np.ndarray, n: int, seed: int = 0,
                face_weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Area-uniform points (n,3) float64, their unit face normals (n,3) and face ids (n,)."""
    v = np.asarray(verts, np.float64)
    f = np.asarray(faces, np.int64)
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    cross = np.cross(b - a, c - a)
    area = 0.5 * np.linalg.norm(cross, axis=1)
    w = area if face_weights is None else area * face_weights
    if not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError("mesh has no area to sample")
    rng = np.random.default_rng(seed)
    face = rng.choice(len(f), size=n, p=w / w.sum())
    r1, r2 = rng.random(n), rng.random(n)
    s = np.sqrt(r1)
    pts = (1 - s)[:, None] * a[face] + (s * (1 - r2))[:, None] * b[face] + (s * r2)[:, None] * c[face]
    normals = _unit(cross[face])
    return pts, normals, face


class Surface:
    """A triangle mesh's surface for exact closest-point queries: its TriangleTree and unit face normals."""

    def __init__(self, verts: np.ndarray, faces: np.ndarray, device: torch.device | str = "cpu"):
        v, f = np.asarray(verts, np.float64), np.asarray(faces, np.int64)
        self.device = torch.device(device)
        self.tree = TriangleTree(torch.as_tensor(v[f], device=self.device))
        self.normals = _unit(np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]]))

    def distance(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Distance (n,) float64 in metres from each point (n,3) to the surface, and the unit normal (n,3) of the
        closest triangle (the lowest index among equally close ones)."""
        points = np.ascontiguousarray(points, np.float64)
        if not np.isfinite(points).all():  # NaN fails every bound of the tree: such a point would get no triangle
            raise ValueError("non-finite points")
        step = CPU_CHUNK if self.device.type == "cpu" else TEMPLATE_GPU_CHUNK
        dist, face = [np.zeros(0)], [np.zeros(0, np.int64)]
        for s in range(0, len(points), step):
            f, d, _ = self.tree.closest(torch.as_tensor(points[s : s + step], device=self.device))
            dist.append(d.double().cpu().numpy())
            face.append(f.cpu().numpy())
        return np.concatenate(dist), self.normals[np.concatenate(face)]


def eval_surfaces(pred: np.ndarray, pred_normals: np.ndarray, gt_surface: Surface,
                  gt: np.ndarray, gt_normals: np.ndarray, pred_surface: Surface,
                  thresholds_mm: tuple[float, ...] = THRESHOLDS_MM) -> dict[str, float]:
    """Metrics (mm) of predicted samples (n,3) against the GT surface and GT samples against the predicted one."""
    if len(pred) == 0 or len(gt) == 0:
        raise ValueError("empty point cloud")
    acc_m, acc_n = gt_surface.distance(pred)
    comp_m, comp_n = pred_surface.distance(gt)
    return _scores(acc_m * 1e3, comp_m * 1e3, np.abs((pred_normals * acc_n).sum(-1)),
                   np.abs((gt_normals * comp_n).sum(-1)), thresholds_mm)


def evaluate(pred_verts: np.ndarray, pred_faces: np.ndarray, gt_verts: np.ndarray, gt_faces: np.ndarray,
             n: int = 200_000, seed: int = 0, device: torch.device | str = "cpu") -> dict[str, float]:
    """Full-surface metrics between two meshes given in metres."""
    _check_mesh(pred_verts, pred_faces, "prediction")
    _check_mesh(gt_verts, gt_faces, "ground truth")
    p, pn, _ = sample_mesh(pred_verts, pred_faces, n, seed)
    g, gn, _ = sample_mesh(gt_verts, gt_faces, n, seed + 1)
    return eval_surfaces(p, pn, Surface(gt_verts, gt_faces, device), g, gn, Surface(pred_verts, pred_faces, device))


def evaluate_ict(pred_verts: np.ndarray, pred_faces: np.ndarray, gt_verts: np.ndarray, ict,
                 n: int = 200_000, seed: int = 0, device: torch.device | str = "cpu") -> dict[str, dict[str, float]]:
    """{"head": ..., "face": ...} against a ground-truth mesh on the converted ICT topology
    (backend.data.ict.IctModel; buried triangles are not part of the GT surface)."""
    from scipy.spatial import cKDTree

    _check_mesh(pred_verts, pred_faces, "prediction")
    _check_mesh(gt_verts, ict.faces, "ground truth")
    gt_verts = np.asarray(gt_verts, np.float64)
    exposed = ict.faces[ict.face_buried == 0]
    gt_surface, pred_surface = Surface(gt_verts, exposed, device), Surface(pred_verts, pred_faces, device)
    p, pn, _ = sample_mesh(pred_verts, pred_faces, n, seed)
    g, gn, _ = sample_mesh(gt_verts, exposed, n, seed + 1)
    acc, acc_n = gt_surface.distance(p)
    comp, comp_n = pred_surface.distance(g)
    acc_nc = np.abs((pn * acc_n).sum(-1))
    head = _scores(acc * 1e3, comp * 1e3, acc_nc, np.abs((gn * comp_n).sum(-1)))

    lo, hi = FACE_AREA
    in_face = ((exposed >= lo) & (exposed < hi)).all(1)
    gf, gfn, _ = sample_mesh(gt_verts, exposed[in_face], n, seed + 2)
    dist, nearest = cKDTree(gt_verts).query(p)
    keep = (nearest >= lo) & (nearest < hi) & (dist <= FACE_RADIUS_M)
    if not keep.any():
        raise ValueError("no predicted sample near the ground truth's face area")
    comp_f, comp_fn = pred_surface.distance(gf)
    face = _scores(acc[keep] * 1e3, comp_f * 1e3, acc_nc[keep], np.abs((gfn * comp_fn).sum(-1)))
    return {"head": head, "face": face}


def _scores(acc: np.ndarray, comp: np.ndarray, acc_nc: np.ndarray, comp_nc: np.ndarray,
            thresholds_mm: tuple[float, ...] = THRESHOLDS_MM) -> dict[str, float]:
    """Accuracy / completeness distances (mm) and normal agreements per sample -> the metrics."""
    out = {
        "accuracy": float(acc.mean()), "completeness": float(comp.mean()),
        "chamfer_l1": float(0.5 * (acc.mean() + comp.mean())),
        "chamfer_l2": float(0.5 * ((acc ** 2).mean() + (comp ** 2).mean())),
        "normal_consistency": float(0.5 * (acc_nc.mean() + comp_nc.mean())),
        "n_pred": int(len(acc)), "n_gt": int(len(comp)),
    }
    for t in thresholds_mm:
        p, r = float((acc <= t).mean()), float((comp <= t).mean())
        out[f"f_score@{t:g}mm"] = 2 * p * r / (p + r) if p + r > 0 else 0.0
    return out


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-30)


def _check_mesh(verts: np.ndarray, faces: np.ndarray, what: str) -> None:
    v, f = np.asarray(verts), np.asarray(faces)
    if v.ndim != 2 or v.shape[1] != 3 or f.ndim != 2 or f.shape[1] != 3 or len(f) == 0:
        raise ValueError(f"{what}: expected vertices (N,3) and faces (F,3), got {v.shape} and {f.shape}")
    if f.min() < 0 or f.max() >= len(v):
        raise ValueError(f"{what}: face index out of range")
    if not np.isfinite(v).all():
        raise ValueError(f"{what}: non-finite vertices")
