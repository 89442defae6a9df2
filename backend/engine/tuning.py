"""The engine's tuning: request defaults, per-device evaluation modes, tolerances and chunk sizes.

Per-device tables are keyed by torch device type; any other type takes the "cpu" entry (`for_device`). The
measurements behind these values are in docs/benchmarks.md ("Engine tuning")."""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")

DEFAULT_RESOLUTION = 256
# warm_up's head: on CUDA fine enough that every kernel of the descent runs (coarse lattice of 32 cells)
WARM_UP_RESOLUTION = {"cpu": 32, "cuda": 128}
WARM_UP_POSE_VERTICES = 256
TOPK = 16  # nearest local networks per point in the CPU latent fit (FIT_TOPK)
# Point evaluations outside extraction: each point through its heaviest local networks until at most this blend
# mass is left out (renormalised over the kept ones, as sdf_eval.HeadSdf's sparse mode); None: all 39.
POINT_DROP_TOL = {"cpu": 1e-4, "cuda": None}
# The canonical SDF in deform residuals (its p99 is the reported residual's p99: a tighter tolerance)
RESIDUAL_DROP_TOL = {"cpu": 1e-6, "cuda": None}
CHUNKS = {"cpu": 1 << 13, "cuda": 1 << 18}  # points per network call: bounds (points x regions x hidden) activations
# ... where the attribute pass keeps every region's activations for its reverse pass
GRAD_CHUNKS = {"cpu": 1 << 13, "cuda": 1 << 15}
# Points per warp-network call in deform: on CPU small enough that the (points x 256) activations stay in cache
WARP_CHUNKS = {"cpu": 1 << 12, "cuda": 1 << 18}
# Deform: only the vertices near the lips and lids follow the expression path (deform.solve_continued's
# path_points), the others are solved once at the full weights (docs/surface.md); CUDA: not measured, all follow it
PATH_POINTS = {"cpu": True, "cuda": False}
# Deform one frame at a time: a frame's pose is then bitwise the pose of a one-frame request (a bake equals live
# poses, ARKit keys equal single deforms). Batched, the warp network's rounding depends on the other points
# evaluated with a point, and at a lip fold that can send a vertex to the other root (docs/surface.md). CUDA keeps
# its batches for throughput.
FRAME_AT_A_TIME = {"cpu": True, "cuda": False}
LIPSCHITZ = 2.5  # assumed |grad sdf| bound of the trained SDF (above the observed one; docs/benchmarks.md)
# Extraction: floor of the per-cell Lipschitz bound (each cell uses max(floor, 1.25 x its own finite-difference
# gradient norm), extract_sparse.py); it gives the same meshes as LIPSCHITZ on the trained heads with fewer points.
EXTRACT_LIPSCHITZ = 1.5
# Extraction's network evaluation (engine/sdf_eval.py): on CUDA all 39 regions at every point (exact, one
# batched product per layer); on CPU each point's heaviest regions up to EXTRACT_DROP_TOL left-out mass.
EXTRACT_MODE = {"cpu": "sparse", "cuda": "dense"}
# "sparse" extraction: left-out blend mass allowed per point, and |sdf| (m) below which a point is evaluated
# again with all 39 regions.
EXTRACT_DROP_TOL = 1e-4
EXTRACT_EXACT_BELOW = 2e-4
EXTRACT_CHUNKS = {"cpu": 1 << 13, "cuda": 1 << 19}
# CUDA: the local networks in float16 (the fused kernel of engine/fused_sdf.py); every point whose value is
# within EXTRACT_HALF_EXACT_BELOW of zero is evaluated again at float32 accuracy, so signs are exact.
EXTRACT_HALF = {"cpu": False, "cuda": True}
EXTRACT_HALF_EXACT_BELOW = 2e-4
# The levels above the last take HeadSdf.approximate (no exact pass near zero) with this error margin in their
# sign certificates: more than twice the largest float16 and left-out-mass errors measured.
EXTRACT_COARSE_ERROR = 1e-4
MAX_DEFORM_POINTS = 20_000_000  # frames x vertices per deform request (output memory)
FIT_RESOLUTION = 128
FIT_SAMPLES = 20_000  # input surface samples a fit aligns and fits to (request default)
ALIGN_TEMPLATE_SAMPLES = 20_000  # samples of the mean head's surface the aligner matches the input against
FIT_MIN_WEIGHT = 0.02  # fitted expression weights below this are noise (the fit starts every weight at ~0.007)
# Latent-fit budget per device: (steps of each of the fit's rounds, points per step, use normals). The normal
# term needs a double backward pass and did not pay for it, nor did the eval's budget on CPU (weights/MODEL_CARD.md,
# "The fit CLI against the eval"); a caller may still ask for normals.
FIT_BUDGET = {"cuda": (300, 4096, False), "cpu": (100, 1024, False)}
# Local networks evaluated per point in the latent fit: on CUDA all 39 (exact, and a few batched kernels per
# layer instead of a loop over regions with a host sync); on CPU the nearest TOPK (fewer FLOPs).
FIT_TOPK = {"cuda": None, "cpu": TOPK}
# Input points kept for a latent fit's round: within this multiple of the median distance to the mean head (the
# first round) or to the head fitted so far (|SDF|, the next), or FIT_INLIER_FLOOR_M, whichever is larger; a fit
# needs at least FIT_MIN_INLIERS of them.
FIT_INLIER_MEDIANS = 2.5
FIT_INLIER_FLOOR_M = 0.003
FIT_MIN_INLIERS = 50
EXPRESSION_RANGE = (-1.0, 2.0)  # accepted expression weights (ICT uses [0, 1]; a little over/undershoot is art)
VERTEX_SDF_CACHE_SIZE = 4  # (mesh, head) pairs whose vertex SDF a session remembers (Session.cached_vertex_sdf)
QUANTILE_MAX_VALUES = 16_000_000  # torch.quantile takes at most 16M values


def for_device(table: dict[str, T], device_type: str) -> T:
    """A per-device table's entry for a torch device type (unknown types take the CPU's)."""
    return table.get(device_type, table["cpu"])
