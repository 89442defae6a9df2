"""Reconstruction metrics as NPHM's public evaluation defines them (Giebenhain et al. 2023,
src/NPHM/evaluation/metrics.py: eval_pointcloud), in millimetres at real scale.

    m = evaluate(pred_verts, pred_faces, gt_verts, gt_faces)                  # meshes in metres
    m = evaluate_ict(pred_verts, pred_faces, gt_verts, ict)                   # GT on the ICT topology:
                                                                              # "head" and "face" variants
Both meshes are sampled area-uniformly (n points each, default 200,000, face normals; seeded). With
completeness = distance from each GT sample to the nearest predicted sample and accuracy = from each
predicted sample to the nearest GT sample (point to point, Euclidean):
    accuracy, completeness        means (mm)
    chamfer_l1 = (accuracy + completeness) / 2                               (mm)
    chamfer_l2 = (mean accuracy^2 + mean completeness^2) / 2                 (mm^2)
    normal_consistency = (mean |n_pred . n_gt(nn)| + mean |n_gt . n_pred(nn)|) / 2
    f_score@t = 2 P R / (P + R), P = share of accuracy <= t, R = share of completeness <= t, t in mm
Differences from NPHM: thresholds 1, 2.5 and 5 mm (NPHM reports 1, 5, 10, 20); samples cover the whole
surface (NPHM samples the rendered visible surface), and the face region is ICT's narrow face area
(vertices [0, 6706)) instead of a FLAME region: GT samples on triangles whose corners all lie in the face
area, predicted samples whose nearest GT vertex is a face-area vertex within 10 mm (as NPHM selects points
near the registered face region).
"""

from __future__ import annotations

import numpy as np

THRESHOLDS_MM = (1.0, 2.5, 5.0)
FACE_AREA = (0, 6706)          # ICT "Narrow face area" vertex range (README, Face Area Details)
FACE_RADIUS_M = 0.01


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
    normals = cross[face] / np.maximum(np.linalg.norm(cross[face], axis=1, keepdims=True), 1e-30)
    return pts, normals, face


def eval_pointcloud(pred: np.ndarray, gt: np.ndarray, pred_normals: np.ndarray, gt_normals: np.ndarray,
                    thresholds_mm: tuple[float, ...] = THRESHOLDS_MM) -> dict[str, float]:
    """NPHM's eval_pointcloud on point clouds in metres; results in mm."""
    from scipy.spatial import cKDTree

    pred_mm, gt_mm = np.asarray(pred, np.float64) * 1e3, np.asarray(gt, np.float64) * 1e3
    if len(pred_mm) == 0 or len(gt_mm) == 0:
        raise ValueError("empty point cloud")
    comp, comp_idx = cKDTree(pred_mm).query(gt_mm)
    acc, acc_idx = cKDTree(gt_mm).query(pred_mm)
    comp_n = np.abs((gt_normals * pred_normals[comp_idx]).sum(-1))
    acc_n = np.abs((pred_normals * gt_normals[acc_idx]).sum(-1))
    out = {
        "accuracy": float(acc.mean()), "completeness": float(comp.mean()),
        "chamfer_l1": float(0.5 * (acc.mean() + comp.mean())),
        "chamfer_l2": float(0.5 * ((acc ** 2).mean() + (comp ** 2).mean())),
        "normal_consistency": float(0.5 * (acc_n.mean() + comp_n.mean())),
        "n_pred": int(len(pred_mm)), "n_gt": int(len(gt_mm)),
    }
    for t in thresholds_mm:
        p, r = float((acc <= t).mean()), float((comp <= t).mean())
        out[f"f_score@{t:g}mm"] = 2 * p * r / (p + r) if p + r > 0 else 0.0
    return out


def evaluate(pred_verts: np.ndarray, pred_faces: np.ndarray, gt_verts: np.ndarray, gt_faces: np.ndarray,
             n: int = 200_000, seed: int = 0, gt_face_weights: np.ndarray | None = None) -> dict[str, float]:
    """Full-surface metrics between two meshes given in metres."""
    _check_mesh(pred_verts, pred_faces, "prediction")
    _check_mesh(gt_verts, gt_faces, "ground truth")
    p, pn, _ = sample_mesh(pred_verts, pred_faces, n, seed)
    g, gn, _ = sample_mesh(gt_verts, gt_faces, n, seed + 1, gt_face_weights)
    return eval_pointcloud(p, g, pn, gn)


def evaluate_ict(pred_verts: np.ndarray, pred_faces: np.ndarray, gt_verts: np.ndarray, ict,
                 n: int = 200_000, seed: int = 0) -> dict[str, dict[str, float]]:
    """{"head": ..., "face": ...} against a ground-truth mesh on the converted ICT topology
    (backend.data.ict.IctModel; buried triangles are not part of the GT surface)."""
    from scipy.spatial import cKDTree

    _check_mesh(pred_verts, pred_faces, "prediction")
    gt_verts = np.asarray(gt_verts, np.float64)
    exposed = (ict.face_buried == 0).astype(np.float64)
    p, pn, _ = sample_mesh(pred_verts, pred_faces, n, seed)
    g, gn, _ = sample_mesh(gt_verts, ict.faces, n, seed + 1, exposed)
    head = eval_pointcloud(p, g, pn, gn)

    lo, hi = FACE_AREA
    in_face = ((ict.faces >= lo) & (ict.faces < hi)).all(1).astype(np.float64)
    gf, gfn, _ = sample_mesh(gt_verts, ict.faces, n, seed + 2, exposed * in_face)
    dist, nearest = cKDTree(gt_verts).query(p)
    keep = (nearest >= lo) & (nearest < hi) & (dist <= FACE_RADIUS_M)
    face = eval_pointcloud(p[keep], gf, pn[keep], gfn)
    return {"head": head, "face": face}


def _check_mesh(verts: np.ndarray, faces: np.ndarray, what: str) -> None:
    v, f = np.asarray(verts), np.asarray(faces)
    if v.ndim != 2 or v.shape[1] != 3 or f.ndim != 2 or f.shape[1] != 3 or len(f) == 0:
        raise ValueError(f"{what}: expected vertices (N,3) and faces (F,3), got {v.shape} and {f.shape}")
    if f.min() < 0 or f.max() >= len(v):
        raise ValueError(f"{what}: face index out of range")
    if not np.isfinite(v).all():
        raise ValueError(f"{what}: non-finite vertices")
