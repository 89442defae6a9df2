"""Similarity transforms x_model = s R x_input + t and their fits, the solvers of the alignment's ICP
(engine/align.py): the closed-form weighted Umeyama fit (one problem or a batch of hypotheses), one
Gauss-Newton step of point-to-plane ICP, and the 24 axis-permuting rotations its orientation hypotheses
start from."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

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
    s, rot, t = _umeyama_batch(np.asarray(src, np.float64)[None], np.asarray(dst, np.float64)[None], w[None], scale)
    return Similarity(float(s[0]), rot[0], t[0])


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
    # the linearisation allows any d; from a bad start it could reach 1 + d <= 0 (a mirrored or vanished head
    # whose score is meaningless): a step at most halves or doubles the scale (converged steps are tiny)
    d = 0.0 if fixed_scale else float(np.clip(delta[0], -0.5, 1.0))
    om, tau = delta[-6:-3], delta[-3:]
    rw = _rodrigues(om)
    return Similarity(sim.scale * (1 + d), rw @ sim.rotation, (1 + d) * rw @ sim.translation + tau)


def _umeyama_batch(src: np.ndarray, dst: np.ndarray, w: np.ndarray, scale: float | None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted Umeyama fit of H problems at once: src/dst (H,P,3), weights (H,P) -> scale (H,), rotation
    (H,3,3), translation (H,3)."""
    w = w / w.sum(1, keepdims=True)
    mu_s, mu_d = np.einsum("hp,hpi->hi", w, src), np.einsum("hp,hpi->hi", w, dst)
    a, b = src - mu_s[:, None], dst - mu_d[:, None]
    cov = np.matmul((w[:, :, None] * b).transpose(0, 2, 1), a)  # (H,3,3); faster than a 3-operand einsum
    u, sig, vt = np.linalg.svd(cov)
    d = np.ones((len(w), 3))
    sign = np.sign(np.linalg.det(u @ vt))
    d[:, 2] = np.where(sign == 0, 1.0, sign)
    rot = (u * d[:, None, :]) @ vt
    if scale is None:
        var = np.einsum("hp,hp->h", w, (a**2).sum(-1))
        s = (sig * d).sum(1) / np.maximum(var, 1e-300)
    else:
        s = np.full(len(w), float(scale))
    return s, rot, mu_d - s[:, None] * np.einsum("hij,hj->hi", rot, mu_s)


def _plane_steps(scale: np.ndarray, rot: np.ndarray, trans: np.ndarray, src: np.ndarray, dst: np.ndarray,
                 nrm: np.ndarray, w: np.ndarray, fixed_scale: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """plane_step() for each of H hypotheses (arrays with a leading H axis; a loop: each is a small solve)."""
    out = [plane_step(Similarity(float(scale[h]), rot[h], trans[h]), src[h], dst[h], nrm[h], w[h], fixed_scale)
           for h in range(len(scale))]
    return (np.array([s.scale for s in out]), np.stack([s.rotation for s in out]),
            np.stack([s.translation for s in out]))

