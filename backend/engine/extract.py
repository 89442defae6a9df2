"""Mesh extraction from any batched SDF callable on the canonical box.

Fast path (`extract_mesh`): the sparse coarse-to-fine evaluation of engine/extract_sparse.py (certified
signs, per-cell Lipschitz bound; its docstring has the method) finds the sign-changing fine cells and their
corner values; the lattices and the chunked SDF evaluation are engine/extract_grid.py.

Marching cubes runs on the sign-changing fine cells only (`mc.marching_cubes_cells`, torch, CPU or GPU).
`extract_dense` is the reference: every lattice point evaluated in float32, scikit-image marching cubes.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..payloads import check_resolution
from .components import drop_small_pieces
from .extract_grid import Grid as Grid, SdfFn, _evaluate, _unkey, make_grid
from .extract_sparse import CoarseSdf, ExtractStats, _extract_once
from .handle_repair import Parted, repair_handles, repair_radii
from .mc import marching_cubes_cells

MIN_COMPONENT = 0.01  # pieces with fewer faces than this x the largest piece's are dropped (floaters) ...
TOUCH_VOXELS = 2.0  # ... unless within this many voxels of a large piece (split off by an ambiguous cell)


@dataclass
class Mesh:
    vertices: np.ndarray  # (V,3) float32, metres
    faces: np.ndarray  # (F,3) int32, outward winding


def extract_mesh(
    sdf_fn: SdfFn,
    resolution: int,
    *,
    device: torch.device | str = "cpu",
    lipschitz: float = 2.5,
    coarse_cells: int | None = None,
    chunk: int = 1 << 18,
    min_component: float = MIN_COMPONENT,
    samples: list | None = None,
    coarse: CoarseSdf | None = None,
    repair: bool = False,
    parted: Parted | None = None,
) -> tuple[Mesh, ExtractStats]:
    """Sparse coarse-to-fine extraction (see module docstring). `lipschitz` is the floor L0 of the per-cell
    bound; pieces with fewer than `min_component` x the largest piece's faces are dropped. If `samples` is a
    list, (fine lattice index (N,3), value (N,)) pairs of every value taken as the SDF are appended to it (a
    `coarse` value only where |value| >= its exact_above). `coarse`: evaluates the levels above the last.
    `coarse_cells`: cells along the longest side of the first, dense lattice (default: 32 on CUDA, where a
    level of the descent costs more in launches and syncs than evaluating ~30k more points, else 16).
    `repair`: small handles are removed from the sign lattice before marching cubes (engine/handle_repair.py,
    on the host), with no cut where `parted` (world points (N,3) -> bool) says the surface opener parts the solid."""
    resolution = check_resolution(resolution)
    device = torch.device(device)
    if coarse_cells is None:
        coarse_cells = 32 if device.type == "cuda" else 16
    t0 = time.perf_counter()
    # inference mode, not only no_grad: less bookkeeping per torch call, and the descent is ~600 small calls
    with torch.inference_mode():
        cells, corner_values, stats, grid = _extract_once(sdf_fn, resolution, device, lipschitz, coarse_cells,
                                                          chunk, samples, coarse)
        t1 = time.perf_counter()
        if repair and repair_radii(grid.voxel):  # (a coarse lattice is not repaired: no copy to the host)
            cells, corner_values = _repair(cells, corner_values, grid, sdf_fn, chunk, stats, parted)
        t_repair = time.perf_counter()
        verts, faces = marching_cubes_cells(cells, corner_values, grid.points_shape)
        verts = grid.to_world(verts, torch.float64).float()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # stage timings, not queue depth
        t2 = time.perf_counter()
        # on the marching device: at 512^3 a host clean-up cost more than the network
        verts, faces, stats.components_removed = drop_small_pieces(verts, faces, min_component,
                                                                   TOUCH_VOXELS * grid.voxel)
        mesh = _mesh_to_host(verts, faces)
    stats.seconds = {"evaluate": t1 - t0, "marching_cubes": t2 - t_repair, "cleanup": time.perf_counter() - t2}
    if repair:
        stats.seconds["handle_repair"] = t_repair - t1
    return mesh, stats


def _repair(cells: torch.Tensor, corner_values: torch.Tensor, grid: Grid, sdf_fn: SdfFn, chunk: int,
            stats: ExtractStats, parted: Parted | None) -> tuple[torch.Tensor, torch.Tensor]:
    """handle_repair.repair_handles on the host, its result back on the cells' device."""
    device = cells.device

    def evaluate(index: np.ndarray) -> np.ndarray:
        return _evaluate(sdf_fn, grid.to_world(torch.as_tensor(index, device=device)), chunk).cpu().numpy()

    new_cells, new_values, repaired = repair_handles(cells.cpu().numpy(), corner_values.cpu().numpy(),
                                                     grid.points_shape, grid.voxel, evaluate,
                                                     None if parted is None else _on_lattice(parted, grid))
    stats.handle_repair = repaired.to_dict()
    stats.points_evaluated += repaired.points_evaluated
    return (torch.as_tensor(new_cells, device=device),
            torch.as_tensor(new_values, device=device, dtype=corner_values.dtype))


def _on_lattice(parted: Parted, grid: Grid) -> Parted:
    """`parted` of world points as one of the lattice's indices (on the host), out of the extraction's inference
    mode: the expressions' root finder differentiates the warp."""
    def at(index: np.ndarray) -> bool:
        with torch.inference_mode(False):
            return parted(grid.to_world(torch.as_tensor(index), torch.float64).numpy())

    return at


_PINNED: dict[torch.device, torch.Tensor] = {}
_PINNED_LOCK = threading.Lock()


def _mesh_to_host(verts: torch.Tensor, faces: torch.Tensor) -> Mesh:
    """The mesh as numpy arrays. From a GPU in one copy through a reused page-locked buffer: the two pageable
    copies of a 256^3 mesh (4.5 MB) took 0.8-2.9 ms on the H100 host."""
    if verts.device.type != "cuda":
        return Mesh(verts.numpy(), faces.int().numpy())
    flat = torch.cat([verts.float().reshape(-1), faces.int().reshape(-1).view(torch.float32)])
    with _PINNED_LOCK:
        buf = _PINNED.get(verts.device)
        if buf is None or buf.numel() < flat.numel():
            buf = torch.empty(flat.numel() + flat.numel() // 4, dtype=torch.float32, pin_memory=True)
            _PINNED[verts.device] = buf
        host = buf[: flat.numel()]
        host.copy_(flat, non_blocking=True)
        torch.cuda.current_stream(verts.device).synchronize()
        arr = host.numpy()
        nv = verts.numel()
        return Mesh(arr[:nv].reshape(-1, 3).copy(), arr[nv:].view(np.int32).reshape(-1, 3).copy())



def extract_dense(
    sdf_fn: SdfFn,
    resolution: int,
    *,
    device: torch.device | str = "cpu",
    chunk: int = 1 << 18,
    method: str = "lorensen",
    min_component: float = MIN_COMPONENT,
) -> tuple[Mesh, np.ndarray]:
    """Reference: every lattice point through `sdf_fn` in float32, scikit-image marching cubes on the full
    volume. Returns the mesh and the (nx+1, ny+1, nz+1) volume."""
    from skimage.measure import marching_cubes

    resolution = check_resolution(resolution)
    grid = make_grid(resolution)
    shape = grid.points_shape
    with torch.no_grad():
        idx = _unkey(torch.arange(math.prod(shape), device=torch.device(device)), shape)
        volume = _evaluate(sdf_fn, grid.to_world(idx), chunk).view(shape).cpu().numpy()
    if not (volume.min() < 0 < volume.max()):
        return Mesh(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32)), volume
    verts, faces, _, _ = marching_cubes(volume, 0.0, method=method)  # "descent" default = outward here
    verts = np.asarray(grid.origin) + verts.astype(np.float64) * grid.voxel
    mesh = Mesh(verts.astype(np.float32), faces.astype(np.int32))
    return remove_small_components(mesh, min_component, TOUCH_VOXELS * grid.voxel)[0], volume


def remove_small_components(mesh: Mesh, min_fraction: float, touch: float = 0.0) -> tuple[Mesh, int]:
    """components.drop_small_pieces on a host mesh: returns the mesh re-indexed and the pieces removed."""
    v, f, removed = drop_small_pieces(torch.from_numpy(mesh.vertices), torch.from_numpy(mesh.faces).long(),
                                      min_fraction, touch)
    return Mesh(v.numpy(), f.numpy().astype(np.int32)), removed
