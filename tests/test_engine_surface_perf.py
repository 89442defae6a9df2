"""The fast paths of the surface opening and the deform op against their straightforward references: edges from
1-D integer keys (mesh_cut._edge_ids, surface_metrics.unique_edges) against np.unique on rows, and the deform
solve with path_points (only some points follow the expression path) against every point following it."""

import numpy as np
import pytest
import torch

from backend.engine import deform, mesh_cut
from backend.engine import surface_metrics as sm


def _reference_unique_edges(faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    e = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    return np.unique(e, axis=0, return_counts=True)


def _reference_edge_ids(faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pairs = np.sort(np.stack([faces, np.roll(faces, -1, axis=1)], axis=2), axis=2).reshape(-1, 2)
    edges, inverse = np.unique(pairs, axis=0, return_inverse=True)
    return edges, inverse.reshape(-1, 3)


def _random_faces(seed: int, n: int, f: int, dtype: type) -> np.ndarray:
    rng = np.random.default_rng(seed)
    faces = np.stack([rng.choice(n, 3, replace=False) for _ in range(f)])
    return np.concatenate([faces, faces[: f // 4, ::-1]]).astype(dtype)  # shared edges, both windings


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_edges_from_integer_keys_match_row_unique(seed, dtype):
    faces = _random_faces(seed, 40 + 30 * seed, 200, dtype)
    edges, count = sm.unique_edges(faces)
    ref_edges, ref_count = _reference_unique_edges(faces)
    assert edges.dtype == ref_edges.dtype and np.array_equal(edges, ref_edges) and np.array_equal(count, ref_count)
    edges, ids = mesh_cut._edge_ids(faces)
    ref_edges, ref_ids = _reference_edge_ids(np.asarray(faces, np.int64))
    assert np.array_equal(edges, ref_edges) and np.array_equal(ids, ref_ids)


def test_edges_of_no_faces():
    edges, count = sm.unique_edges(np.zeros((0, 3), np.int64))
    assert edges.shape == (0, 2) and count.shape == (0,)


def _fold_warp(t: float | torch.Tensor, e: torch.Tensor):
    """A backward warp that folds near y = 0 (two roots near the 'contact'), scaled by t (T,1) or a float."""
    def warp(x: torch.Tensor, frame: torch.Tensor) -> torch.Tensor:
        w = (e * t)[frame] if isinstance(t, torch.Tensor) else e[frame] * t
        y = x[:, 1:2]
        return torch.cat([0.01 * torch.sin(3 * x[:, :1]) * w[:, :1],
                          -0.3 * torch.tanh(40 * y) * w[:, 1:2] - 0.05 * w[:, :1] * x[:, 2:3],
                          0.02 * x[:, :1] * w[:, 1:2]], 1)
    return warp


@pytest.mark.parametrize("per_frame", [False, True])
def test_path_points_give_what_every_point_on_the_path_gives(per_frame):
    torch.manual_seed(0)
    x_c = torch.rand(400, 3) * 0.4 - 0.2
    e = torch.tensor([[1.0, 1.0], [0.2, 0.0], [0.6, 0.9], [0.0, 0.0]])
    steps = deform.frame_continuation_steps(e) if per_frame else deform.continuation_steps(e)
    zero = (e == 0).all(1)
    ref = deform.solve_continued(lambda t: _fold_warp(t, e), x_c, 4, steps, zero_frames=zero)
    path = x_c[:, 1].abs() < 0.05  # where the fold is
    out = deform.solve_continued(lambda t: _fold_warp(t, e), x_c, 4, steps, zero_frames=zero, path_points=path)
    assert out.stats is not None and 0 < out.stats["path_points"] < len(x_c)
    assert torch.allclose(out.vertices, ref.vertices, atol=1e-5)
    assert torch.equal(out.converged, ref.converged)
    assert out.root_vector is not None and ref.root_vector is not None
    assert torch.allclose(out.root_vector, ref.root_vector, atol=1e-5)
    assert torch.equal(out.vertices[3], x_c)  # the zero frame
    # the path points themselves: exactly what the whole set gives them
    assert torch.allclose(out.vertices[:, path], ref.vertices[:, path], atol=1e-6)
    # without the path the fold's points land on other roots: the test sees the path at all
    direct = deform.solve(_fold_warp(1.0, e), x_c, 4, zero_frames=zero)
    assert (direct.vertices[0, path] - ref.vertices[0, path]).norm(dim=1).max() > 1e-3
