"""Identity and expression tables for training and the fixed held-out split.

Every table is a pure function of (seed, size) drawn from its own numpy SeedSequence stream, so training
and evaluation agree without shipping files, and the held-out streams never touch the training ones:

    train_identities(n=4096)     (n,100) f32 ICT identity coefficients ~ N(0, I)      stream (seed, 1)
    train_expressions(n=65536)   (n,53)  f32 sparse expression weights in [0,1]       stream (seed, 2)
    heldout_identities(n=50)     (n,100)                                               stream (seed, 3)
    heldout_expressions(n=200)   (n,53)  (row 0 is neutral)                            stream (seed, 4)
    heldout_meshes(ict, ids, exps)  yields (i, j, vertices (V,3) float64 metres) per identity i, expression j;
                                    faces: ict.faces (buried triangles: ict.face_buried, see metrics.evaluate_ict)

Expression recipe (both splits): 1..max_active distinct shapes chosen uniformly with weights U(0,1);
with p_symmetric each chosen _L/_R shape also drives its partner (weight x U(0.7,1)); with p_jaw jawOpen is
set to a weight drawn from U(0,1) (so about half of all samples open the jaw, at every opening).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

N_ID = 100
DEFAULT_SEED = 20251015


@dataclass(frozen=True)
class ExpressionRecipe:
    max_active: int = 4
    p_symmetric: float = 0.5
    p_jaw: float = 0.5


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream,)))


def train_identities(n: int = 4096, seed: int = DEFAULT_SEED) -> np.ndarray:
    return _rng(seed, 1).standard_normal((n, N_ID)).astype(np.float32)


def heldout_identities(n: int = 50, seed: int = DEFAULT_SEED) -> np.ndarray:
    return _rng(seed, 3).standard_normal((n, N_ID)).astype(np.float32)


def mirror_partners(names: list[str]) -> np.ndarray:
    """Index of each shape's _L/_R partner (itself for unpaired shapes)."""
    return np.array([names.index(s[:-1] + ("R" if s.endswith("_L") else "L")) if s[-2:] in ("_L", "_R") else i
                     for i, s in enumerate(names)])


def random_expressions(rng: np.random.Generator, n: int, names: list[str],
                       recipe: ExpressionRecipe = ExpressionRecipe()) -> np.ndarray:
    m = len(names)
    k = rng.integers(1, recipe.max_active + 1, size=n)
    rank = np.argsort(rng.random((n, m)), axis=1).argsort(axis=1)     # random permutation per row
    w = np.where(rank < k[:, None], rng.random((n, m)), 0.0)
    partner = mirror_partners(names)
    sym = rng.random(n) < recipe.p_symmetric
    mirrored = w[:, partner] * rng.uniform(0.7, 1.0, size=(n, m))
    w = np.where(sym[:, None], np.maximum(w, mirrored), w)
    jaw = names.index("jawOpen")
    open_jaw = rng.random(n) < recipe.p_jaw
    w[open_jaw, jaw] = rng.random(int(open_jaw.sum()))
    return np.clip(w, 0.0, 1.0).astype(np.float32)


def train_expressions(names: list[str], n: int = 65536, seed: int = DEFAULT_SEED) -> np.ndarray:
    return random_expressions(_rng(seed, 2), n, names)


def heldout_expressions(names: list[str], n: int = 200, seed: int = DEFAULT_SEED) -> np.ndarray:
    w = random_expressions(_rng(seed, 4), n, names)
    w[0] = 0.0
    return w


def heldout_meshes(ict, id_coeffs: np.ndarray, exp_weights: np.ndarray) -> Iterator[tuple[int, int, np.ndarray]]:
    """Ground-truth vertices for every (identity, expression) pair, identity-major, float64 metres. A
    generator: all 50 x 200 held-out meshes would take 3.7 GB at once."""
    for i, c in enumerate(id_coeffs):
        for j, w in enumerate(exp_weights):
            yield i, j, ict.vertices(c, w)
