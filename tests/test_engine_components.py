"""engine/components: torch connected components and small-piece removal, against scipy."""

import numpy as np
import pytest
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from backend.engine.components import component_labels, drop_small_pieces


def _scipy_labels(faces: np.ndarray, n: int) -> np.ndarray:
    rows = np.concatenate([faces[:, 0], faces[:, 1]])
    cols = np.concatenate([faces[:, 1], faces[:, 2]])
    return connected_components(coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n)), directed=False)[1]


@pytest.mark.parametrize("seed", range(6))
def test_labels_are_scipys_partition(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(50, 3000))
    # sparse random faces: many pieces of many sizes, long chains, isolated vertices; shuffled numbering
    faces = rng.integers(0, n, (int(rng.integers(n // 4, n)), 3))
    chain = rng.permutation(n)[: n // 3]
    faces = np.concatenate([faces, np.stack([chain[:-2], chain[1:-1], chain[2:]], 1)])
    ours = component_labels(torch.from_numpy(faces), n).numpy()
    ref = _scipy_labels(faces, n)
    # same partition: a bijection between label sets, and each label is its piece's smallest vertex
    pairs = np.unique(np.stack([ours, ref], 1), axis=0)
    assert len(pairs) == len(np.unique(ours)) == len(np.unique(ref))
    assert (ours <= np.arange(n)).all() and (ours[ours] == ours).all()


def test_drop_small_pieces_keeps_large_and_touching():
    big = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]], dtype=torch.float32)
    near = torch.tensor([[0, 0, 0.5], [1, 0, 0.5], [0, 1, 0.5]])
    v = torch.cat([near + 5, big, near])  # the floater first: labels are not in piece-size order
    f = torch.tensor([[3, 4, 5], [4, 6, 5], [3, 5, 4], [4, 5, 6], [7, 8, 9], [0, 1, 2]])
    out_v, out_f, removed = drop_small_pieces(v, f, 0.5, touch=1.0)
    assert removed == 1 and len(out_f) == 5 and len(out_v) == 7 and int(out_f.max()) == 6
    assert (out_v - 5.5).abs().min() > 1  # the floater's vertices are gone
    assert drop_small_pieces(v, f, 0.5)[2] == 2
    assert drop_small_pieces(v, f, 0.0)[2] == 0
