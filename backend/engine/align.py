"""Robust similarity alignment of an arbitrary head scan (any units, position, orientation; shoulders, holes,
hair caps) to the model frame, against the mean head surface.

Method: orientation hypotheses from the input's principal axes (all 24 proper rotations that map them onto
the template's principal axes) x scale hypotheses around the RMS-radius ratio x head positions along the
longest axis, each run through three iterations of symmetric trimmed ICP on a small subsample; the best 24 get
8 more iterations, the best 3 are refined on 4000 points, first point-to-point, then point-to-plane
(Gauss-Newton on scale, rotation, translation) for fast convergence. Symmetric
trimmed ICP pairs every input point with its nearest template point and every template point with its
nearest input point, keeps the closest `keep` fraction of each direction (clutter such as shoulders drops out
of the first, holes and missing backs out of the second), and solves the similarity in closed form (Umeyama).
Pairing both ways stops the scale from collapsing onto a patch. With user landmarks (>= 3 pairs) the
hypotheses are replaced by their Umeyama fit, and the landmark pairs stay in every ICP solve.
With known units the scale is fixed (rigid ICP): the head's true size is then left to the identity code.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from .. import errors


@dataclass
class Similarity:
    """x_model = scale * rotation @ x_input + translation."""

    scale: float
    rotation: np.ndarray  # (3,3), det +1
    translation: np.ndarray  # (3,)

    def apply(self, x: np.ndarray) -> np.ndarray:
        return self.scale * x @ self.rotation.T + self.translation

    def inverse(self, y: np.ndarray) -> np.ndarray:
        return (y - self.translation) @ self.rotation / self.scale

    def to_dict(self) -> dict:
        return {"scale": float(self.scale), "rotation": self.rotation.tolist(),
                "translation": self.translation.tolist()}


def umeyama(src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None = None, scale: float | None = None
            ) -> Similarity:
    """Least-squares similarity dst ~ s R src + t (s fixed when `scale` is given)."""
    w = np.ones(len(src)) if weights is None else np.asarray(weights, np.float64)
    w = w / w.sum()
    mu_s, mu_d = w @ src, w @ dst
    a, b = src - mu_s, dst - mu_d
    cov = (b * w[:, None]).T @ a
    u, sig, vt = np.linalg.svd(cov)
    d = np.ones(3)
    d[2] = np.sign(np.linalg.det(u @ vt)) or 1.0
    rot = u @ np.diag(d) @ vt
    if scale is None:
        var = (w * (a**2).sum(1)).sum()
        scale = float((sig * d).sum() / max(var, 1e-300))
    return Similarity(scale, rot, mu_d - scale * rot @ mu_s)


def axis_rotations() -> np.ndarray:
    """The 24 proper rotations that permute and flip the coordinate axes, (24,3,3)."""
    out = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            m = np.zeros((3, 3))
            m[range(3), perm] = signs
            if np.linalg.det(m) > 0:
                out.append(m)
    return np.array(out)


def _principal_axes(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c = x.mean(0)
    _, vecs = np.linalg.eigh(np.cov((x - c).T))
    vecs = vecs[:, ::-1]
    if np.linalg.det(vecs) < 0:
        vecs[:, 2] *= -1
    return c, vecs


@dataclass
class AlignStats:
    score: float  # symmetric trimmed mean distance (model metres)
    forward_median: float  # median input -> template distance after alignment (model metres)
    hypotheses: int


def _rodrigues(w: np.ndarray) -> np.ndarray:
    theta = float(np.linalg.norm(w))
    if theta < 1e-12:
        return np.eye(3)
    k = w / theta
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(theta) * kx + (1 - np.cos(theta)) * kx @ kx


def plane_step(sim: Similarity, src: np.ndarray, dst: np.ndarray, nrm: np.ndarray, w: np.ndarray,
               fixed_scale: bool) -> Similarity:
    """One Gauss-Newton step of point-to-plane ICP for a similarity: minimise
    sum w (n . ((1+d) R_w y + tau - q))^2 over (d, w, tau), y = sim(src), linearised in (d, w)."""
    y = sim.apply(src)
    r = ((y - dst) * nrm).sum(1)
    jac = np.column_stack([(nrm * y).sum(1), np.cross(y, nrm), nrm])  # d, omega, tau
    if fixed_scale:
        jac = jac[:, 1:]
    a = (jac * w[:, None]).T @ jac + 1e-9 * np.eye(jac.shape[1])
    delta = -np.linalg.solve(a, (jac * w[:, None]).T @ r)
    d = 0.0 if fixed_scale else delta[0]
    om, tau = delta[-6:-3], delta[-3:]
    rw = _rodrigues(om)
    return Similarity(sim.scale * (1 + d), rw @ sim.rotation, (1 + d) * rw @ sim.translation + tau)


NORMAL_PENALTY = 0.01  # metres of pair cost for perpendicular normals


def estimate_normals(x: np.ndarray, tree: cKDTree, points: np.ndarray, k: int = 12) -> np.ndarray:
    """Unoriented normals at `points` from the local PCA of their k nearest neighbours in x."""
    _, idx = tree.query(points, k=min(k, len(x)))
    nb = x[idx] - x[idx].mean(1, keepdims=True)
    _, vecs = np.linalg.eigh(np.einsum("nki,nkj->nij", nb, nb))
    return vecs[:, :, 0]


class Aligner:
    def __init__(self, template_points: np.ndarray, template_normals: np.ndarray, reliable: np.ndarray | None = None,
                 keep: float = 0.6):
        """template_points/normals (M,3); reliable (M,) bool: the template points that scans usually show
        as they are (the face), the only ones paired template -> input (hair, hats and missing backs of
        heads would bias those pairs). keep: fraction of pairs kept in each direction."""
        self.target = np.asarray(template_points, np.float64)
        self.normals = np.asarray(template_normals, np.float64)
        self.reliable = np.flatnonzero(np.ones(len(self.target), bool) if reliable is None else reliable)
        self.tree = cKDTree(self.target)
        self.keep = keep
        self.t_center, self.t_axes = _principal_axes(self.target)
        self.t_radius = float(np.sqrt(((self.target - self.t_center) ** 2).sum(1).mean()))

    def _icp(self, sim: Similarity, x: np.ndarray, x_normals: np.ndarray, x_tree: cKDTree, t_idx: np.ndarray,
             iters: int, fixed_scale: float | None, landmarks: tuple[np.ndarray, np.ndarray] | None,
             plane: bool = False) -> tuple[Similarity, float]:
        """Symmetric trimmed ICP; point-to-point (robust far from the solution) or point-to-plane (fast
        near it). Pairs are ranked by distance + NORMAL_PENALTY * (1 - |cos| of the normals' angle), which
        keeps clutter from matching the face sideways. Returns the similarity and the mean kept pair cost."""
        target = self.target[t_idx]
        score = np.inf
        for _ in range(iters):
            y = sim.apply(x)
            d_f, j = self.tree.query(y)
            d_b, i = x_tree.query(sim.inverse(target))
            n_x = x_normals @ sim.rotation.T
            c_f = d_f + NORMAL_PENALTY * (1 - np.abs((n_x * self.normals[j]).sum(1)))
            c_b = d_b * sim.scale + NORMAL_PENALTY * (1 - np.abs((n_x[i] * self.normals[t_idx]).sum(1)))
            kf = c_f <= np.quantile(c_f, self.keep)
            kb = c_b <= np.quantile(c_b, self.keep)
            score = float(c_f[kf].mean() + c_b[kb].mean())
            src = np.concatenate([x[kf], x[i[kb]]])
            dst = np.concatenate([self.target[j[kf]], target[kb]])
            w = np.ones(len(src))
            if plane:
                nrm = np.concatenate([self.normals[j[kf]], self.normals[t_idx][kb]])
            if landmarks is not None:  # each landmark pair weighs as much as 2% of the ICP pairs
                src = np.concatenate([src, landmarks[0]])
                dst = np.concatenate([dst, landmarks[1]])
                w = np.concatenate([w, np.full(len(landmarks[0]), 0.02 * len(w))])
            if plane:
                if landmarks is not None:  # point-to-point for landmarks: three planes, one per axis
                    lm_src, lm_dst, lm_w = src[-len(landmarks[0]):], dst[-len(landmarks[0]):], w[-len(landmarks[0]):]
                    src = np.concatenate([src[: len(nrm)]] + [lm_src] * 3)
                    dst = np.concatenate([dst[: len(nrm)]] + [lm_dst] * 3)
                    w = np.concatenate([w[: len(nrm)]] + [lm_w] * 3)
                    nrm = np.concatenate([nrm] + [np.tile(e, (len(lm_src), 1)) for e in np.eye(3)])
                sim = plane_step(sim, src, dst, nrm, w, fixed_scale is not None)
            else:
                sim = umeyama(src, dst, w, fixed_scale)
        return sim, score

    def align(self, points: np.ndarray, normals: np.ndarray | None = None, *, fixed_scale: float | None = None,
              landmarks: tuple[np.ndarray, np.ndarray] | None = None, seed: int = 0) -> tuple[Similarity, AlignStats]:
        """points (N,3) in the input frame, normals (N,3) or None (then estimated, unoriented).
        landmarks: (input points (L,3), template points (L,3)), L >= 3."""
        x_all = np.asarray(points, np.float64)
        if len(x_all) < 10:
            raise errors.InvalidInput(f"need at least 10 input points to align, got {len(x_all)}")
        rng = np.random.default_rng(seed)
        c, axes = _principal_axes(x_all)
        radius = float(np.sqrt(((x_all - c) ** 2).sum(1).mean()))
        if radius <= 0 or np.linalg.eigvalsh(np.cov((x_all - c).T))[1] <= 1e-12 * radius**2:
            raise errors.InvalidInput("the input is degenerate (all points on a line or a single point)")
        all_tree = cKDTree(x_all) if normals is None else None

        def sub(n: int) -> tuple[np.ndarray, np.ndarray]:
            idx = rng.choice(len(x_all), min(n, len(x_all)), replace=False)
            if normals is not None:
                nrm = np.asarray(normals[idx], np.float64)
                return x_all[idx], nrm / np.maximum(np.linalg.norm(nrm, axis=1, keepdims=True), 1e-300)
            return x_all[idx], estimate_normals(x_all, all_tree, x_all[idx])

        if landmarks is not None:
            lm_in, lm_t = (np.asarray(a, np.float64) for a in landmarks)
            starts = [umeyama(lm_in, lm_t, scale=fixed_scale)]
        else:
            s0 = fixed_scale if fixed_scale is not None else self.t_radius / radius
            # Clutter (shoulders, torso) inflates the radius and pulls the centroid away from the head:
            # larger scales and head positions shifted along the input's longest axis are tried as well.
            scales = [s0] if fixed_scale is not None else [s0 * f for f in (0.8, 1.15, 1.6, 2.2)]
            shifts = [c + f * radius * axes[:, 0] for f in (0.0, 0.6, -0.6)]
            starts = []
            for rot_axes in axis_rotations():
                rot = self.t_axes @ rot_axes @ axes.T  # input principal axes -> template principal axes
                for s in scales:
                    for centre in shifts:
                        starts.append(Similarity(s, rot, self.t_center - s * rot @ centre))
        stages = [(250, 3, len(starts)), (500, 8, 24), (4000, 10, 3)]  # (points, iterations, survivors)
        pool = [(s, np.inf) for s in starts]
        for n_points, iters, survivors in stages:
            x, xn = sub(n_points)
            tree = cKDTree(x)
            t_idx = rng.choice(self.reliable, min(n_points, len(self.reliable)), replace=False)
            pool = sorted(pool, key=lambda r: r[1])[:survivors]
            pool = [self._icp(s, x, xn, tree, t_idx, iters, fixed_scale, landmarks) for s, _ in pool]
        refined = [self._icp(s, x, xn, tree, t_idx, 15, fixed_scale, landmarks, plane=True) for s, _ in pool]
        sim, score = min(refined, key=lambda r: r[1])
        d_f, _ = self.tree.query(sim.apply(x))
        return sim, AlignStats(score, float(np.median(d_f)), len(starts))
