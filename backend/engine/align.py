"""Robust similarity alignment of an arbitrary head scan (any units, position, orientation; shoulders, holes,
hair caps; a whole figure or a bust of which the head is a small part) to the model frame, against the mean
head surface.

Method: orientation hypotheses from the input's principal axes (all 24 proper rotations that map them onto
the template's principal axes) x scale hypotheses around the RMS-radius ratio x head positions along the
longest axis, plus UNIFORM_STARTS rotations spread evenly over all orientations; each runs through three
iterations of symmetric trimmed ICP on a small subsample; the best 24 get 8 more iterations (both stages
against a 2000-point subset of the template), the best 3 are refined on 4000 points, first 5 point-to-point
iterations, then point-to-plane (Gauss-Newton on scale, rotation, translation, until converged) for fast
convergence. Symmetric trimmed ICP pairs every input point with its nearest template point and every template
point with its nearest input point, keeps the closest `keep` fraction of each direction (clutter such as
shoulders drops out of the first, holes and missing backs out of the second; input pairs also beyond
INLIER_SPREAD times the INLIER_QUANTILE pair cost, as clutter can be more than 1 - keep of the input), and
solves the similarity in closed form (Umeyama).
Pairing both ways stops the scale from collapsing onto a patch. With user landmarks (>= 3 pairs) the
hypotheses are replaced by their Umeyama fit, and the landmark pairs stay in every ICP solve.
With known units the scale is fixed (rigid ICP): the head's true size is then left to the identity code.
All hypotheses of a stage run together (one batched nearest-neighbour query per tree and iteration, on
every core): the same math as one ICP run per hypothesis, without 1,312 x 3 small queries from Python.

Beyond ~60% clutter no whole-input hypothesis starts near the head and trimming cannot recover, so a
result whose coverage (median distance from the template's face to the input surface, blind to whatever
else the input holds) is poor triggers a crop search: the points near each end of the input's longest axis
(20, 35 and 50% of its extent) give hypotheses of their own (their centroid, radius and principal axes),
whose coarse ICP runs on the crop alone; the best-covering two are refined on the input points inside the
template's box under them (the whole head, whatever the crop cut), and coverage picks the result among these
and the whole-input one.

The similarity type and its solvers (Umeyama, point-to-plane steps) are in engine/similarity.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from .. import errors
from .similarity import Similarity, _plane_steps, _umeyama_batch, axis_rotations, plane_step as plane_step, umeyama


def _principal_axes(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c = x.mean(0)
    _, vecs = np.linalg.eigh(np.cov((x - c).T))
    vecs = vecs[:, ::-1]
    if np.linalg.det(vecs) < 0:
        vecs[:, 2] *= -1
    return c, vecs


def super_fibonacci_rotations(n: int) -> np.ndarray:
    """n rotations (n,3,3) spread evenly over SO(3): the super-Fibonacci spiral of unit quaternions (Alexa,
    CVPR 2022)."""
    s = np.arange(n) + 0.5
    r, big_r = np.sqrt(s / n), np.sqrt(1.0 - s / n)
    alpha, beta = 2.0 * np.pi * s / np.sqrt(2.0), 2.0 * np.pi * s / 1.533751168755204288118041
    xyzw = np.stack([r * np.sin(alpha), r * np.cos(alpha), big_r * np.sin(beta), big_r * np.cos(beta)], 1)
    return Rotation.from_quat(xyzw).as_matrix()


def _flat(x: np.ndarray) -> bool:
    """All points on a line or a single point: no principal axes to start from."""
    c = x.mean(0)
    return bool(np.linalg.eigvalsh(np.cov((x - c).T))[1] <= 1e-12 * ((x - c) ** 2).sum(1).mean())


@dataclass
class AlignStats:
    score: float  # symmetric trimmed mean distance (model metres)
    forward_median: float  # median input -> template distance after alignment (model metres)
    hypotheses: int
    coverage: float  # Aligner.coverage of the result (model metres)


NORMAL_PENALTY = 0.01  # metres of pair cost for perpendicular normals
COARSE_POINTS = 2000  # template points of the first two alignment stages
# Point-to-plane iterations stop for a hypothesis once an update moves points at the template radius by less
# than this (metres): Gauss-Newton then sits on a fixed point of its pairs (later moves measured 0).
PLANE_TOL = 1e-9
# Input -> template pairs kept: at most the `keep` fraction, and none costing more than INLIER_SPREAD times the
# INLIER_QUANTILE cost (a head pair while the head is over 30% of the input): with the `keep` fraction alone a
# head with a torso kept torso pairs that pulled the pose off and let wrong poses win; on clean heads and face
# crops the spread changes nothing (docs/benchmarks.md, "Engine tuning").
INLIER_QUANTILE, INLIER_SPREAD = 0.3, 3.0
# (input points, iterations, survivors (None: all), coarse template) of the stages before the fine ones
COARSE_STAGES = [(250, 3, None, True), (500, 8, 24, True)]
CROP_STAGES = [(250, 3, None, True), (500, 8, 8, True)]
# Coverage (Aligner.coverage) is a median: face crops and holes leave up to half the face uncovered.
COVER_QUANTILE, COVER_NEIGHBOURS = 0.5, 6
# The crop search (seconds on a CPU) runs only when the whole-input result covers the face worse than this
# (model metres): between the coverage of right poses and of wrong ones (docs/benchmarks.md, "Engine tuning").
# A real head above it only costs the crop search: the whole-input result still competes.
COVER_OK = 0.0025
# Crops: these fractions of the input's extent along its longest axis, at both ends. A head is ~0.33 m of a
# ~1.8 m standing figure (under 20%) and about half of a bust; larger crops bring the shoulders.
CROP_FRACTIONS = (0.2, 0.35, 0.5)
CROP_KEEP = 2  # crop results refined on the re-cropped input
# Principal axes fix a head's orientation only roughly (the mean head's two shorter axes are about equally
# long; a scan's longest axis tilts with its neck cut), so every axis-map start can be too far off for the
# coarse ICP (docs/benchmarks.md, "Alignment starts"): UNIFORM_STARTS rotations spread evenly over all
# orientations (super-Fibonacci spiral) start as well, on whole inputs.
UNIFORM_STARTS = 512
# The mean head reaches further down the neck than most scans, so the RMS-radius scale is too large and the
# centroid lands above the template's: the uniform starts use UNIFORM_SCALE times that scale and put the
# centroid at the template centre raised by these factors of its RMS radius (model +Y).
UNIFORM_SCALE = 0.85
UNIFORM_RAISE = (0.0, 0.5)
BOX_MARGIN = 0.03  # metres around the template's box: the input points the re-cropped refinement sees

Pairing = tuple[np.ndarray, np.ndarray, cKDTree, np.ndarray]
Sampler = Callable[[int], tuple[np.ndarray, np.ndarray]]  # n -> (n input points, their unit normals)


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
        # The coarse stages (hypotheses mostly far off) pair with a random subset: a query far from the
        # surface visits many leaves, and ICP on 250-500 input points does not need a denser target.
        self.coarse = np.sort(np.random.default_rng(0).permutation(len(self.target))[:COARSE_POINTS])
        self.coarse_tree = cKDTree(self.target[self.coarse])
        self.keep = keep
        self.t_center, self.t_axes = _principal_axes(self.target)
        self.t_radius = float(np.sqrt(((self.target - self.t_center) ** 2).sum(1).mean()))
        self.uniform = super_fibonacci_rotations(UNIFORM_STARTS)
        self.cover = np.random.default_rng(1).permutation(self.reliable)[:COARSE_POINTS]
        self.box = (self.target.min(0) - BOX_MARGIN, self.target.max(0) + BOX_MARGIN)

    def _icp(self, sims: list[Similarity], x: np.ndarray, x_normals: np.ndarray, x_tree: cKDTree,
             t_idx: np.ndarray, iters: int, fixed_scale: float | None,
             landmarks: tuple[np.ndarray, np.ndarray] | None, plane: bool = False, coarse: bool = False
             ) -> list[tuple[Similarity, float]]:
        """Symmetric trimmed ICP of every hypothesis in `sims` at once (the same math per hypothesis as one
        run each; the nearest-neighbour queries of all hypotheses go to the trees in one call);
        point-to-point (robust far from the solution) or point-to-plane (fast near it; a hypothesis stops
        once converged, PLANE_TOL). Pairs are ranked by distance + NORMAL_PENALTY * (1 - |cos| of the
        normals' angle), which keeps clutter from matching the face sideways. coarse: input points pair with
        the template subset `self.coarse` only. Returns (similarity, mean kept pair cost) per hypothesis."""
        H, n, m = len(sims), len(x), len(t_idx)
        scale = np.array([s.scale for s in sims], np.float64)
        rot = np.stack([s.rotation for s in sims])
        trans = np.stack([s.translation for s in sims])
        target = self.target[t_idx]
        t_normals = self.normals[t_idx]
        tree, tree_idx = (self.coarse_tree, self.coarse) if coarse else (self.tree, None)
        score = np.full(H, np.inf)
        active = np.arange(H)
        for _ in range(iters):
            if not len(active):
                break
            A = len(active)
            sc, ro, tr = scale[active], rot[active], trans[active]
            y = sc[:, None, None] * np.einsum("nj,hij->hni", x, ro) + tr[:, None]  # (A,n,3)
            d_f, j = tree.query(y.reshape(-1, 3), workers=-1)
            d_f, j = d_f.reshape(A, n), j.reshape(A, n)
            if tree_idx is not None:
                j = tree_idx[j]
            back = np.einsum("hmj,hji->hmi", target[None] - tr[:, None], ro) / sc[:, None, None]
            d_b, i = x_tree.query(back.reshape(-1, 3), workers=-1)
            d_b, i = d_b.reshape(A, m), i.reshape(A, m)
            n_x = np.einsum("nj,hij->hni", x_normals, ro)  # (A,n,3)
            c_f = d_f + NORMAL_PENALTY * (1 - np.abs((n_x * self.normals[j]).sum(-1)))
            rows = np.arange(A)[:, None]
            c_b = d_b * sc[:, None] + NORMAL_PENALTY * (1 - np.abs((n_x[rows, i] * t_normals[None]).sum(-1)))
            q_lo, q_keep = np.quantile(c_f, [INLIER_QUANTILE, self.keep], axis=1)
            kf = c_f <= np.minimum(q_keep, INLIER_SPREAD * q_lo)[:, None]
            kb = c_b <= np.quantile(c_b, self.keep, axis=1)[:, None]
            score[active] = (c_f * kf).sum(1) / kf.sum(1) + (c_b * kb).sum(1) / kb.sum(1)
            # Pairs of every hypothesis: (A, n + m) with weight 0 for the trimmed ones.
            src = np.concatenate([np.broadcast_to(x, (A, n, 3)), x[i]], 1)
            dst = np.concatenate([self.target[j], np.broadcast_to(target, (A, m, 3))], 1)
            w = np.concatenate([kf, kb], 1).astype(np.float64)
            nrm = np.concatenate([self.normals[j], np.broadcast_to(t_normals, (A, m, 3))], 1) if plane else None
            if landmarks is not None:  # each landmark pair weighs as much as 2% of the ICP pairs
                L = len(landmarks[0])
                lm_w = np.repeat((0.02 * w.sum(1))[:, None], L, 1)
                copies = 3 if plane else 1  # point-to-plane: three planes per landmark, one per axis
                src = np.concatenate([src] + [np.broadcast_to(landmarks[0], (A, L, 3))] * copies, 1)
                dst = np.concatenate([dst] + [np.broadcast_to(landmarks[1], (A, L, 3))] * copies, 1)
                w = np.concatenate([w] + [lm_w] * copies, 1)
                if plane:
                    nrm = np.concatenate([nrm] + [np.broadcast_to(e, (A, L, 3)) for e in np.eye(3)], 1)
            if plane:
                assert nrm is not None  # set above whenever plane is
                sc2, ro2, tr2 = _plane_steps(sc, ro, tr, src, dst, nrm, w, fixed_scale is not None)
                move = (np.linalg.norm(sc2[:, None, None] * ro2 - sc[:, None, None] * ro, axis=(1, 2)) * self.t_radius
                        + np.linalg.norm(tr2 - tr, axis=1))
            else:
                sc2, ro2, tr2 = _umeyama_batch(src, dst, w, fixed_scale)
                move = np.full(A, np.inf)
            scale[active], rot[active], trans[active] = sc2, ro2, tr2
            active = active[move >= PLANE_TOL]
        return [(Similarity(float(scale[h]), rot[h], trans[h]), float(score[h])) for h in range(H)]

    def _starts(self, x: np.ndarray, fixed_scale: float | None, scale_factors: tuple[float, ...],
                shift_factors: tuple[float, ...], uniform: bool = False) -> list[Similarity]:
        """Hypotheses mapping x's principal axes onto the template's (24 ways) x scales around the RMS-radius
        ratio x centres shifted along x's longest axis (factors of its RMS radius); with `uniform`, also the
        UNIFORM_STARTS rotations."""
        c, axes = _principal_axes(x)
        radius = float(np.sqrt(((x - c) ** 2).sum(1).mean()))
        s0 = fixed_scale if fixed_scale is not None else self.t_radius / radius
        scales = [s0] if fixed_scale is not None else [s0 * f for f in scale_factors]
        centres = [c + f * radius * axes[:, 0] for f in shift_factors]
        starts = []
        for rot_axes in axis_rotations():
            rot = self.t_axes @ rot_axes @ axes.T
            starts += [Similarity(s, rot, self.t_center - s * rot @ centre) for s in scales for centre in centres]
        if not uniform:
            return starts
        s1 = fixed_scale if fixed_scale is not None else UNIFORM_SCALE * s0
        targets = [self.t_center + np.array([0.0, f * self.t_radius, 0.0]) for f in UNIFORM_RAISE]
        return starts + [Similarity(s1, rot, t - s1 * rot @ c) for rot in self.uniform for t in targets]

    def _stages(self, pool: list[tuple[Similarity, float]], sample: Sampler,
                stages: list[tuple[int, int, int | None, bool]],
                fixed_scale: float | None, landmarks: tuple[np.ndarray, np.ndarray] | None, rng: np.random.Generator
                ) -> tuple[list[tuple[Similarity, float]], Pairing]:
        """Point-to-point ICP stages (points, iterations, survivors, coarse template); returns the survivors of
        the last stage and its points (input points, their normals, their tree, template indices)."""
        for n_points, iters, survivors, coarse in stages:
            x, xn = sample(n_points)
            tree = cKDTree(x)
            t_idx = rng.choice(self.reliable, min(n_points, len(self.reliable)), replace=False)
            pool = sorted(pool, key=lambda r: r[1])[:survivors]
            pool = self._icp([s for s, _ in pool], x, xn, tree, t_idx, iters, fixed_scale, landmarks, coarse=coarse)
        return pool, (x, xn, tree, t_idx)

    def _refine(self, pool: list[tuple[Similarity, float]], sample: Sampler, fixed_scale: float | None,
                landmarks: tuple[np.ndarray, np.ndarray] | None, rng: np.random.Generator
                ) -> tuple[Similarity, float, np.ndarray]:
        """The fine stages: point-to-point on 4000 input and template points, then point-to-plane; the best."""
        pool, pairing = self._stages(pool, sample, [(4000, 5, 3, False)], fixed_scale, landmarks, rng)
        refined = self._icp([s for s, _ in pool], *pairing, 15, fixed_scale, landmarks, plane=True)
        sim, score = min(refined, key=lambda r: r[1])
        return sim, score, pairing[0]

    def coverage(self, sim: Similarity, x_tree: cKDTree) -> float:
        """COVER_QUANTILE of the distances (model metres) from the reliable template points, under `sim`, to
        the input surface: the plane of their COVER_NEIGHBOURS nearest input points, plus how far they lie
        beyond those points' spread (so that sparse inputs are not penalised between their samples, while
        template points off the input still are). Small when input surface lies over most of the face,
        whatever else the input holds; one measure for every candidate, wherever its ICP ran."""
        y = sim.inverse(self.target[self.cover])
        _, idx = x_tree.query(y, k=min(COVER_NEIGHBOURS, x_tree.n), workers=-1)
        nb = x_tree.data[idx]
        mid = nb.mean(1)
        _, vecs = np.linalg.eigh(np.einsum("nki,nkj->nij", nb - mid[:, None], nb - mid[:, None]))
        off = y - mid
        reach = np.linalg.norm(nb - mid[:, None], axis=2).max(1)
        d = np.abs((off * vecs[:, :, 0]).sum(1)) + np.maximum(np.linalg.norm(off, axis=1) - reach, 0)
        return float(np.quantile(d, COVER_QUANTILE) * sim.scale)

    def _crop_search(self, x_all: np.ndarray, sampler: Callable[[np.ndarray], Sampler], x_tree: cKDTree,
                     fixed_scale: float | None, rng: np.random.Generator
                     ) -> tuple[list[tuple[Similarity, float, np.ndarray, float]], int]:
        """Hypotheses from each end of the input's longest axis (the head of a bust or a standing figure is
        one of them; which one is unknown): each crop's own centroid, radius and principal axes, its ICP on
        its own points so that the body does not outweigh the head. The CROP_KEEP crop results that cover
        the face best are refined on the input points in and around the template's box under each, which
        restores the parts of the head that a crop cut off. Returns (similarity, ICP score, last input points,
        coverage) per refined result and the number of hypotheses."""
        c, axes = _principal_axes(x_all)
        t = (x_all - c) @ axes[:, 0]
        lo, hi = t.min(), t.max()
        found, count = [], 0
        for frac in CROP_FRACTIONS:
            for crop in (t >= hi - frac * (hi - lo), t <= lo + frac * (hi - lo)):
                idx = np.flatnonzero(crop)
                if len(idx) < 10 or _flat(x_all[idx]):
                    continue
                starts = self._starts(x_all[idx], fixed_scale, (0.8, 1.0, 1.25), (0.0,))
                count += len(starts)
                pool, _ = self._stages([(s, np.inf) for s in starts], sampler(idx), CROP_STAGES, fixed_scale, None,
                                       rng)
                sim = min(pool, key=lambda r: r[1])[0]
                found.append((sim, self.coverage(sim, x_tree)))
        out = []
        for sim, _ in sorted(found, key=lambda r: r[1])[:CROP_KEEP]:
            y = sim.apply(x_all)
            near = np.flatnonzero(((y > self.box[0]) & (y < self.box[1])).all(1))
            if len(near) < 10:
                continue
            sim, score, x = self._refine([(sim, np.inf)], sampler(near), fixed_scale, None, rng)
            out.append((sim, score, x, self.coverage(sim, x_tree)))
        return out, count

    def align(self, points: np.ndarray, normals: np.ndarray | None = None, *, fixed_scale: float | None = None,
              landmarks: tuple[np.ndarray, np.ndarray] | None = None, seed: int = 0) -> tuple[Similarity, AlignStats]:
        """points (N,3) in the input frame, normals (N,3) or None (then estimated, unoriented).
        landmarks: (input points (L,3), template points (L,3)), L >= 3."""
        x_all = np.asarray(points, np.float64)
        if len(x_all) < 10:
            raise errors.InvalidInput(f"need at least 10 input points to align, got {len(x_all)}")
        rng = np.random.default_rng(seed)
        radius = float(np.sqrt(((x_all - x_all.mean(0)) ** 2).sum(1).mean()))
        if radius <= 0 or _flat(x_all):
            raise errors.InvalidInput("the input is degenerate (all points on a line or a single point)")
        x_tree = cKDTree(x_all)
        if normals is not None:
            unit = np.asarray(normals, np.float64)
            unit = unit / np.maximum(np.linalg.norm(unit, axis=1, keepdims=True), 1e-300)

        def sampler(pool: np.ndarray) -> Sampler:
            def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
                idx = pool[rng.choice(len(pool), min(n, len(pool)), replace=False)]
                if normals is not None:
                    return x_all[idx], unit[idx]
                return x_all[idx], estimate_normals(x_all, x_tree, x_all[idx])
            return sample

        everything = sampler(np.arange(len(x_all)))
        if landmarks is not None:
            lm_in, lm_t = (np.asarray(a, np.float64) for a in landmarks)
            starts = [umeyama(lm_in, lm_t, scale=fixed_scale)]
        else:
            # Clutter (shoulders, torso) inflates the radius and pulls the centroid away from the head:
            # larger scales and head positions shifted along the input's longest axis are tried as well.
            starts = self._starts(x_all, fixed_scale, (0.8, 1.15, 1.6, 2.2), (0.0, 0.6, -0.6), uniform=True)
        pool, _ = self._stages([(s, np.inf) for s in starts], everything, COARSE_STAGES, fixed_scale, landmarks, rng)
        sim, score, x = self._refine(pool, everything, fixed_scale, landmarks, rng)
        hypotheses = len(starts)
        cover = self.coverage(sim, x_tree)
        if landmarks is None and cover > COVER_OK:
            crops, count = self._crop_search(x_all, sampler, x_tree, fixed_scale, rng)
            hypotheses += count
            sim, score, x, cover = min([(sim, score, x, cover)] + crops, key=lambda r: r[3])
        d_f, _ = self.tree.query(sim.apply(x))
        return sim, AlignStats(score, float(np.median(d_f)), hypotheses, cover)
