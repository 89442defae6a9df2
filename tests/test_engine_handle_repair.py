"""Handle removal on the extraction's sign lattice (engine/handle_repair.py): thin tunnels and thin bridges go,
holes and handles wider than the repair's reach stay, pockets are not sealed, and vertices away from a plug
are the unrepaired extraction's."""

import numpy as np
import torch

from backend.engine import handle_repair
from backend.engine import surface_metrics as sm
from backend.engine.extract import extract_mesh
from backend.engine.extract_grid import make_grid
from backend.engine.mc import CORNERS, marching_cubes_cells

RES = 64
H = make_grid(RES).voxel  # 6.25 mm
# a lattice column (x, y) for the thin tunnel's axis: its points are air, their neighbours solid
THIN_X, AXIS_Y = -0.16 + 16 * H, -0.22 + 32 * H
CENTRE_Z = -0.13 + 24 * H


def _slab(x: torch.Tensor, holes: list[tuple[float, float]]) -> torch.Tensor:
    """A slab 6 voxels thick with cylindrical holes (axis x, radius) along z through it."""
    q = (x - torch.tensor([0.0, AXIS_Y, CENTRE_Z])).abs() - torch.tensor([0.12, 0.15, 3 * H])
    d = q.clamp_min(0).norm(dim=1) + q.amax(dim=1).clamp_max(0)
    for cx, r in holes:
        d = torch.maximum(d, r - torch.hypot(x[:, 0] - cx, x[:, 1] - AXIS_Y))
    return d


def _extract(fn, repair: bool):
    mesh, stats = extract_mesh(fn, RES, repair=repair, min_component=0.0)
    return mesh, sm.topology(mesh.faces), stats


def test_a_thin_tunnel_is_filled_and_a_wide_hole_stays():
    fn = lambda x: _slab(x, [(THIN_X, 0.6 * H), (0.05, 6 * H)])  # noqa: E731
    plain, before, _ = _extract(fn, False)
    mesh, after, stats = _extract(fn, True)
    assert before.genus == 2 and after.genus == 1
    assert len(after.pieces) == 1 and stats.handle_repair["handles_removed"] == 1
    # every vertex more than 3 voxels from the tunnel's axis is bitwise one of the unrepaired mesh's
    far = np.hypot(mesh.vertices[:, 0] - THIN_X, mesh.vertices[:, 1] - AXIS_Y) > 3 * H
    old = {tuple(v) for v in plain.vertices.tolist()}
    assert far.sum() > 0.95 * len(mesh.vertices)
    assert all(tuple(v) in old for v in mesh.vertices[far].tolist())
    # the plug lies within a voxel of the slab's faces around the tunnel
    near = ~far
    assert np.abs(mesh.vertices[near, 2] - CENTRE_Z).max() <= 3 * H + 1e-6


def test_a_thin_bridge_is_cut_and_a_thick_one_stays():
    centre = torch.tensor([0.0, AXIS_Y, CENTRE_Z])

    def fn(x: torch.Tensor) -> torch.Tensor:
        p = x - centre
        ball = p.norm(dim=1) - 0.06
        d = ball
        for side, tube in ((1.0, 1.0 * H), (-1.0, 4 * H)):  # a ring through the ball on each side: a handle
            q = p - torch.tensor([side * 0.07, 0.0, 0.0])
            ring = torch.hypot(torch.hypot(q[:, 0], q[:, 1]) - 0.05, q[:, 2]) - tube
            d = torch.minimum(d, ring)
        return d

    _, before, _ = _extract(fn, False)
    _, after, stats = _extract(fn, True)
    assert before.genus == 2 and after.genus == 1
    assert len(after.pieces) == 1 and stats.handle_repair["points_cut"] >= 1


def test_a_pocket_is_not_sealed():
    """A hollow ball whose cavity opens through a thin channel: closing the channel raises the Euler
    characteristic too (a new inner sphere), but encloses air: it is not a handle and stays open."""
    centre = torch.tensor([THIN_X, AXIS_Y, CENTRE_Z])

    def fn(x: torch.Tensor) -> torch.Tensor:
        p = x - centre
        shell = torch.maximum(p.norm(dim=1) - 0.09, 0.05 - p.norm(dim=1))
        channel = 0.6 * H - torch.hypot(x[:, 0] - THIN_X, x[:, 1] - AXIS_Y)
        return torch.maximum(shell, torch.where(p[:, 2] > 0, channel, torch.full_like(channel, -1.0)))

    plain, before, _ = _extract(fn, False)
    mesh, after, stats = _extract(fn, True)
    assert before.genus == 0 and len(before.pieces) == 1
    assert after.genus == 0 and len(after.pieces) == 1
    assert len(mesh.vertices) == len(plain.vertices)


def test_the_chi_table_gives_marching_cubes_euler_characteristic():
    rng = np.random.default_rng(3)
    for _ in range(3):
        field = rng.normal(size=(9, 10, 11)).astype(np.float32)
        field[[0, -1]] = field[:, [0, -1]] = field[:, :, [0, -1]] = 1.0  # closed surfaces
        cells = np.argwhere(np.ones(tuple(s - 1 for s in field.shape), bool))
        values = field[tuple((cells[:, None, :] + CORNERS[None]).reshape(-1, 3).T)].reshape(-1, 8)
        _, faces = marching_cubes_cells(torch.from_numpy(cells), torch.from_numpy(values), field.shape)
        f = faces.numpy()
        edges, _ = sm.unique_edges(f)
        chi = len(np.unique(f)) - len(edges) + len(f)
        table = handle_repair._chi_table()[handle_repair._cases(field < 0)].sum()
        assert table == chi


def test_dense_signs_follow_the_sparse_band():
    fn = lambda x: _slab(x, [(0.05, 6 * H)])  # noqa: E731
    grid = make_grid(RES)
    idx = np.argwhere(np.ones(grid.points_shape, bool))
    field = fn(grid.to_world(torch.from_numpy(idx))).numpy().reshape(grid.points_shape)
    case = handle_repair._cases(field < 0)
    cells = np.argwhere((case > 0) & (case < 255))
    values = field[tuple((cells[:, None, :] + CORNERS[None]).reshape(-1, 3).T)].reshape(-1, 8)
    inside, _ = handle_repair.dense_signs(cells, values, grid.points_shape)
    assert np.array_equal(inside, field < 0)
