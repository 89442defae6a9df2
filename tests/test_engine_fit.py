"""Fitting: model-independent alignment checks, frame invariance of the whole fit, identity recovery (with
trained weights), mesh readers and input validation."""

import numpy as np
import numpy.typing as npt
import pytest
import torch
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from backend import errors
from backend.engine.align import UNIFORM_STARTS, Aligner, Similarity, plane_step, super_fibonacci_rotations, umeyama
from backend.engine.fit import fit_error, sample_mesh, template_surface
from backend.engine.meshio import read_mesh, read_ply, write_ply
from backend.engine.session import Session
from backend.model.inversion import CodeAdam


@pytest.fixture(scope="module")
def session():
    return Session(device="cpu")


@pytest.fixture(scope="module")
def head_points(session):
    a = session.atlas
    return sample_mesh(a.vertices.astype(np.float64), a.faces.astype(np.int64), 12000, np.random.default_rng(0))[0]


POSE_SEED = 3  # a generated head that the mean-head alignment turns by several degrees (the fit below: 6.2)


def random_similarity(seed: int) -> Similarity:
    rng = np.random.default_rng(seed)
    return Similarity(float(10 ** rng.uniform(-1, 2.5)), Rotation.random(random_state=seed).as_matrix(),
                      rng.normal(0, 3, 3))


def test_umeyama_exact():
    sim = random_similarity(1)
    x = np.random.default_rng(0).normal(size=(50, 3))
    got = umeyama(x, sim.apply(x))
    assert got.scale == pytest.approx(sim.scale) and np.allclose(got.rotation, sim.rotation)
    assert np.allclose(got.translation, sim.translation)


def test_plane_step_keeps_the_scale_positive():
    # targets through the centre: the linearised step asks for 1 + d = -0.5 (a mirrored head); it halves instead
    src = np.random.default_rng(0).normal(size=(200, 3))
    src /= np.linalg.norm(src, axis=1, keepdims=True)
    sim = plane_step(Similarity(1.0, np.eye(3), np.zeros(3)), src, -0.5 * src, src, np.ones(200), False)
    assert sim.scale == pytest.approx(0.5)


@pytest.mark.parametrize("seed", [3, 4])
def test_alignment_recovers_random_similarity(session, head_points, seed):
    # The mean head itself, moved to a random frame and unit: alignment must undo it (no model involved).
    true = random_similarity(seed)
    sim, stats = session.aligner.align(true.apply(head_points), seed=seed)
    back = sim.apply(true.apply(head_points))
    assert np.abs(back - head_points).max() < 1e-3  # 1 mm anywhere on the head
    assert sim.scale * true.scale == pytest.approx(1.0, rel=2e-3)


def test_uniform_starts_cover_every_orientation():
    rots = Rotation.from_matrix(super_fibonacci_rotations(UNIFORM_STARTS))
    assert np.allclose(np.linalg.det(rots.as_matrix()), 1.0)
    probes = Rotation.random(2000, random_state=0)
    nearest = np.array([np.degrees((rots * p.inv()).magnitude().min()) for p in probes])
    # just above the spiral's measured spread (docs/benchmarks.md, "Alignment starts"); random sets leave wider gaps
    assert nearest.max() < 28.0 and np.median(nearest) < 16.0


@pytest.mark.parametrize("seed, resolution", [(2, 64), (4, 40)])
def test_alignment_of_generated_heads_in_any_orientation(session, seed, resolution):
    """Generated heads (neck cut, no shoulders) that the principal-axis starts alone aligned far off
    (docs/benchmarks.md, "Alignment starts")."""
    _, mesh = session.generate({"seed": seed, "resolution": resolution}, {})
    turn = Rotation.random(random_state=seed * 7 + resolution).as_matrix()
    x = mesh["vertices"].astype(np.float64) * 100.0 @ turn.T + np.array([100.0, 200.0, 50.0])
    pts, nrm = sample_mesh(x, mesh["faces"].astype(np.int64), 20000, np.random.default_rng(0))
    sim, _ = session.aligner.align(pts, nrm, seed=0)
    assert np.degrees(Rotation.from_matrix(sim.rotation @ turn).magnitude()) < 10.0
    assert sim.scale == pytest.approx(0.01, rel=0.1)


# The outcome depends on the alignment's seed (its random subsamples), not on the frame (the method is frame
# invariant). Seeds that failed before the input-pair cutoff (align.INLIER_SPREAD): 202 and 207 gave a wrong
# pose (~172 mm off), 216 a 3.6 mm median error; with it, the worst of seeds 200-231 was 0.27 mm.
@pytest.mark.parametrize("seed", [202, 207, 216])
def test_alignment_ignores_shoulders(session, head_points, seed):
    # A head on a torso of 43% of the points: more clutter than the 40% each ICP direction trims.
    rng = np.random.default_rng(5)
    th, y = rng.uniform(0, 2 * np.pi, 9000), rng.uniform(-0.5, -0.17, 9000)
    w = np.where(y < -0.25, 0.2, 0.06 + (y + 0.17) / -0.08 * 0.14)
    torso = np.column_stack([w * np.cos(th), y, 0.6 * w * np.sin(th) - 0.01])
    true = random_similarity(seed)
    scan = true.apply(np.concatenate([head_points, torso]))
    sim, _ = session.aligner.align(scan, seed=seed)
    err = np.linalg.norm(sim.apply(true.apply(head_points)) - head_points, axis=1)
    assert np.median(err) < 0.5e-3 and err.max() < 1e-3


def cylinder(rng: np.random.Generator, n: int, a: npt.ArrayLike, b: npt.ArrayLike, r: float) -> np.ndarray:
    """n points on the side of the cylinder of radius r from a to b."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    axis = (b - a) / np.linalg.norm(b - a)
    u = np.cross(axis, [1.0, 0, 0] if abs(axis[0]) < 0.9 else [0, 1.0, 0])
    u /= np.linalg.norm(u)
    v = np.cross(axis, u)
    t, th = rng.uniform(0, 1, (2, n))
    th *= 2 * np.pi
    return a + t[:, None] * (b - a) + r * (np.cos(th)[:, None] * u + np.sin(th)[:, None] * v)


def ellipsoid(rng: np.random.Generator, n: int, centre: list[float], radii: list[float]) -> np.ndarray:
    d = rng.normal(size=(n, 3))
    return np.asarray(centre) + d / np.linalg.norm(d, axis=1, keepdims=True) * np.asarray(radii)


def figure_clutter(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """About n points of a body below the template head (model frame, +y up): a standing figure (neck, torso,
    arms hanging, legs; 1.9 m tall) or a bust (neck, shoulders and chest cut at y = -0.5 m)."""
    neck = cylinder(rng, n // 25, [0, -0.26, -0.01], [0, -0.15, -0.01], 0.055)
    if kind == "bust":
        chest = ellipsoid(rng, n, [0, -0.45, -0.01], [0.23, 0.17, 0.12])
        return np.concatenate([neck, chest[chest[:, 1] > -0.5]])
    k = n // 10
    return np.concatenate([neck, ellipsoid(rng, 4 * k, [0, -0.58, -0.01], [0.19, 0.32, 0.12])]
                          + [cylinder(rng, k, [s * 0.24, -0.33, -0.01], [s * 0.30, -0.95, -0.01], 0.045)
                             for s in (1, -1)]
                          + [cylinder(rng, 2 * k, [s * 0.1, -0.85, -0.01], [s * 0.12, -1.72, 0.0], 0.065)
                             for s in (1, -1)])


# A head that is a small part of the input (imported characters): every start of the whole input's principal
# axes is far off, so the alignment must find the head from crops at the ends of the input's longest axis.
@pytest.mark.parametrize("kind, clutter, frame, seed", [("body", 29000, 11, 0), ("body", 29000, "cm", 1),
                                                        ("bust", 10500, 13, 0), ("bust", 10500, "cm", 2)])
def test_alignment_finds_a_small_head(session, head_points, kind, clutter, frame, seed):
    head = head_points[:4000]
    body = figure_clutter(kind, clutter, np.random.default_rng(seed + 7))
    lo, hi = {"body": (0.1, 0.15), "bust": (0.3, 0.4)}[kind]
    assert lo < len(head) / (len(head) + len(body)) < hi
    true = (Similarity(100.0, Rotation.random(random_state=seed).as_matrix(), np.array([30.0, -120.0, 5.0]))
            if frame == "cm" else random_similarity(frame))
    sim, _ = session.aligner.align(true.apply(np.concatenate([head, body])), seed=seed)
    turn = np.degrees(Rotation.from_matrix(sim.rotation @ true.rotation).magnitude())
    err = np.linalg.norm(sim.apply(true.apply(head)) - head, axis=1)
    assert turn < 1.0 and sim.scale * true.scale == pytest.approx(1.0, rel=5e-3)
    assert np.median(err) < 0.5e-3 and err.max() < 1e-3


@pytest.mark.parametrize("frame, seed", [(300, 2), (207, 207)])
def test_alignment_of_a_face_crop(session, head_points, frame, seed):
    # A face scan (front half only, no back of the head): the coarse stages must still pick the right pose.
    face = head_points[head_points[:, 2] > np.median(head_points[:, 2])]
    true = random_similarity(frame)
    sim, _ = session.aligner.align(true.apply(face), seed=seed)
    assert np.abs(sim.apply(true.apply(face)) - face).max() < 1e-3


def test_alignment_with_landmarks_and_known_units(session, head_points):
    a = session.atlas
    ids = [int(a.anchor_vertex[a.names.index(n)]) for n in ("nose tip", "chin", "left ear", "right ear", "forehead")]
    true = Similarity(1000.0, Rotation.random(random_state=9).as_matrix(), np.array([5.0, -20.0, 300.0]))  # mm
    lm = (true.apply(a.vertices[ids].astype(np.float64)), a.vertices[ids].astype(np.float64))
    sim, stats = session.aligner.align(true.apply(head_points), fixed_scale=1e-3, landmarks=lm)
    assert stats.hypotheses == 1 and sim.scale == 1e-3
    assert np.abs(sim.apply(true.apply(head_points)) - head_points).max() < 1e-3


def test_fit_error_is_zero_on_the_surface(session):
    a = session.atlas
    pts, _ = sample_mesh(a.vertices.astype(np.float64), a.faces.astype(np.int64), 2000, np.random.default_rng(2))
    err = fit_error(pts, a.vertices, a.faces, 0.01)
    assert err.trimmed_mm < 1e-3 and err.trimmed_input_units == pytest.approx(err.trimmed_mm * 1e-3 / 0.01)
    err = fit_error(pts + 0.002 * np.array([1.0, 0, 0]), a.vertices, a.faces, 1.0)
    assert 0.1 < err.median_mm <= 2.0 + 1e-6


def test_code_adam_steps_follow_the_gradient():
    # Per-coordinate Adam's first step is lr * sign(g): a coordinate with a rounding-noise gradient moved as
    # far as one with a real gradient, which made fits frame-dependent. CodeAdam's step is parallel to g.
    p = torch.zeros(2, 3, requires_grad=True)
    p.grad = torch.tensor([[1.0, 1e-6, -1e-9], [0.0, -2e-3, 1e-3]])
    CodeAdam([p], lr=0.1).step()
    assert torch.allclose(p, -0.1 * p.grad / p.grad.square().mean(-1, keepdim=True).sqrt(), rtol=1e-4)


def test_fit_is_invariant_to_the_input_frame(session):
    a = session.atlas
    # Area-weighted sampling of float32 input coordinates puts a few samples on other triangles in another frame;
    # after a handful of steps the code still depends on the minibatches that met them, so fit long enough to settle.
    params = {"resolution": 24, "steps": 192, "samples": 4000, "fit_expression": False}
    outs = []
    for seed in (11, 12):
        sim = random_similarity(seed)
        out, mesh = session.fit(params, {"points": sim.apply(a.vertices.astype(np.float64)).astype(np.float32),
                                         "faces": a.faces})
        outs.append((sim, out, mesh))
    (s1, o1, m1), (s2, o2, m2) = outs
    # Same head, and the same surface once both outputs are mapped back to the common (atlas) frame. Compared
    # as point sets: codes 1 % apart may flip one lattice sign near the surface at 24^3, which shifts the
    # marching-cubes vertex order after it without moving the surface elsewhere.
    z1, z2 = np.array(o1["head"]["identity"]), np.array(o2["head"]["identity"])
    assert np.linalg.norm(z1 - z2) < 0.05 * np.linalg.norm(z1)
    v1, v2 = s1.inverse(m1["vertices"].astype(np.float64)), s2.inverse(m2["vertices"].astype(np.float64))
    assert abs(len(v1) - len(v2)) <= 0.01 * len(v1)
    for a, b in ((v1, v2), (v2, v1)):
        d = cKDTree(b).query(a)[0]
        assert np.percentile(d, 99) < 1e-3
    assert o1["error"]["trimmed_one_sided_cd_mm"] == pytest.approx(o2["error"]["trimmed_one_sided_cd_mm"], rel=0.05)
    # The output overlays the input: its scale is the input's.
    t = o1["transform"]
    assert t["scale"] * s1.scale == pytest.approx(1.0, rel=2e-3)


def test_fit_of_a_full_figure_measures_the_head(session, head_points):
    """A head on a standing figure (12% of the points), in centimetres: the fit finds the head and its error is
    measured on the input inside the model's box, not on the body."""
    body = figure_clutter("body", 29000, np.random.default_rng(9))
    true = Similarity(100.0, Rotation.random(random_state=5).as_matrix(), np.array([30.0, -120.0, 5.0]))
    pts = true.apply(np.concatenate([head_points[:4000], body])).astype(np.float32)
    out, fitted = session.fit({"resolution": 64, "steps": 20, "fit_expression": False}, {"points": pts})
    assert out["transform"]["scale"] * 100.0 == pytest.approx(1.0, rel=5e-3)
    assert 0.1 < out["alignment"]["in_box_fraction"] < 0.25
    assert out["error"]["trimmed_one_sided_cd_mm"] < 3.0  # a 64^3 mesh after 20 steps; ~500 mm with the body


def test_held_out_identity_recovered(session):
    if not session.loaded.trained:
        pytest.skip("needs trained weights (weights/imhead.safetensors)")
    target = session.sample_identity(123456)  # a random identity, not a training code
    session.open_surfaces = False  # the target as extracted (an opened target fits to 2.3 mm: docs/surface.md)
    try:
        _, mesh = session.generate({"head": {"format": "imhead-head/1", "identity": target.tolist()},
                                    "resolution": 128}, {})
    finally:
        session.open_surfaces = True
    sim = random_similarity(21)
    out, fitted = session.fit({"resolution": 128, "fit_expression": False},
                              {"points": sim.apply(mesh["vertices"].astype(np.float64)).astype(np.float32),
                               "faces": mesh["faces"]})
    assert out["error"]["trimmed_one_sided_cd_mm"] < 1.0


def test_fit_refines_the_pose_of_an_input_in_the_model_frame(session):
    """A generated head given in the model frame, in metres: aligned to the mean head it sits degrees off (its
    identity is not the mean), and codes fitted there bent the head to that pose; the pose fitted with the codes
    brings it back near the true one (the identity transform)."""
    if not session.loaded.trained:
        pytest.skip("needs trained weights (weights/imhead.safetensors)")
    session.open_surfaces = False  # the target as extracted: every point on the head's zero level set
    try:
        _, mesh = session.generate({"seed": POSE_SEED, "resolution": 64}, {})
    finally:
        session.open_surfaces = True
    out, _ = session.fit({"units": "m", "resolution": 24, "steps": 100, "fit_expression": False},
                         {"points": mesh["vertices"], "faces": mesh["faces"]})
    rot, t = np.array(out["transform"]["rotation"]), np.array(out["transform"]["translation"])
    align = out["alignment"]
    moved = align["pose_refinement"]
    turn = np.degrees(Rotation.from_matrix(rot).magnitude())
    assert moved["rotation_deg"] > 3.0 and turn < 2.0, (turn, moved)  # the mean head's pose: turned by 5 to 7 deg
    assert np.linalg.norm(t) < 5e-3 and align["inlier_fraction"] > align["mean_head_inlier_fraction"]


def bad_fit_inputs(a):
    pts = a.vertices.astype(np.float32)
    yield {"points": pts[:0]}
    yield {"points": np.full((100, 3), np.nan, np.float32)}
    yield {"points": pts[:, :2]}
    yield {"points": pts.astype(np.int64)}
    yield {"points": np.broadcast_to(np.float32(0), (5_000_001, 3))}
    yield {"points": np.zeros((100, 3), np.float32)}  # degenerate: one point
    yield {"points": np.outer(np.arange(100), [1, 2, 3]).astype(np.float32)}  # collinear
    yield {"points": pts, "faces": np.array([[0, 1, len(pts)]], np.int32)}
    yield {"points": pts, "faces": np.zeros((10, 3), np.int32)}  # faces with no area
    yield {"points": pts, "normals": pts[:10]}


def test_fit_rejects_bad_input(session):
    for arrays in bad_fit_inputs(session.atlas):
        with pytest.raises(errors.InvalidInput):
            session.fit({"steps": 0}, arrays)
    pts = session.atlas.vertices.astype(np.float32)
    for params in ({"units": "furlong"}, {"units": -1.0}, {"steps": -1}, {"resolution": 4096}, {"nope": 1},
                   {"landmark_regions": ["nose tip"]}, {"landmark_regions": ["nose", "chin", "forehead"]}):
        arrays = {"points": pts}
        if "landmark_regions" in params:
            arrays["landmarks"] = pts[:3]
        with pytest.raises(errors.InvalidInput):
            session.fit(params, arrays)


def test_mesh_files_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    v = rng.normal(size=(20, 3)).astype(np.float32)
    f = rng.integers(0, 20, (30, 3)).astype(np.int32)
    region = rng.integers(0, 39, 20).astype(np.int32)
    write_ply(tmp_path / "m.ply", v, f, {"canonical": v * 2, "region": region, "uv": v[:, :2], "normals": v})
    m = read_ply(tmp_path / "m.ply")
    assert np.array_equal(m.vertices, v) and np.array_equal(m.faces, f) and np.array_equal(m.normals, v)
    assert np.array_equal(m.attributes["canonical"], v * 2) and np.array_equal(m.attributes["region"], region)
    assert np.array_equal(m.attributes["uv"], v[:, :2])
    (tmp_path / "q.obj").write_text("v 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\nvn 0 0 1\nf 1//1 2//1 3//1 4//1\n")
    assert read_mesh(tmp_path / "q.obj").faces.tolist() == [[0, 1, 2], [0, 2, 3]]
    (tmp_path / "a.ply").write_text("ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\n"
                                    "property float z\nelement face 1\nproperty list uchar int vertex_indices\n"
                                    "end_header\n0 0 0\n1 0 0\n0 1 0\n3 0 1 2\n")
    m = read_mesh(tmp_path / "a.ply")
    assert m.vertices.shape == (3, 3) and m.faces.tolist() == [[0, 1, 2]]
    for name, text in (("bad.obj", "v 0 0 x\n"), ("bad.ply", "not a ply"), ("bad.stl", "solid"), ("e.obj", "")):
        (tmp_path / name).write_text(text)
        with pytest.raises(errors.InvalidInput):
            read_mesh(tmp_path / name)


def test_template_surface_samples(session):
    pts, nrm, reliable = template_surface(session.atlas, 3000)
    assert pts.shape == (3000, 3) and np.allclose(np.linalg.norm(nrm, axis=1), 1.0)
    assert 0.3 < reliable.mean() < 0.9
    assert isinstance(Aligner(pts, nrm, reliable).t_radius, float)
