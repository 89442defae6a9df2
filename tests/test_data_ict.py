"""Converter, atlas rebuild, sampler and held-out split on the real ICT-FaceKit data (skipped without
../shared). The conversion runs once per module from the shared tarball (~1 min on 2 cores)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TARBALL = SHARED / "data" / "ict-facekit" / "FaceXModel.tar.xz"

pytestmark = pytest.mark.skipif(not TARBALL.is_file(), reason="ICT-FaceKit not in ../shared")


@pytest.fixture(scope="module")
def ict_path(tmp_path_factory) -> Path:
    from backend.data.ict import main

    out = tmp_path_factory.mktemp("ict") / "ict.safetensors"
    assert main(["--source", str(TARBALL), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def ict(ict_path):
    from backend.data.ict import load_ict

    return load_ict(ict_path)


def test_converter_counts_units_landmark_and_closure(ict, ict_path):
    from backend.data import topology

    assert ict.neutral.shape == (14062 + 2 * 770, 3)
    assert ict.id_basis.shape == (100, 15602, 3) and ict.exp_basis.shape == (53, 15602, 3)
    assert ict.expressions[0] == "browDown_L" and ict.expressions[26] == "jawOpen" and len(ict.expressions) == 53
    assert ict.uv.shape == (len(ict.faces), 3, 2)
    assert ict_path.stat().st_size < 40e6
    # nose tip, Multi-PIE landmark 30 = ICT vertex 4857, "v 0 0.405942 13.0691" (cm) in generic_neutral_mesh.obj
    assert ict.landmarks[30] == 4857
    np.testing.assert_allclose(ict.neutral[4857], [0.0, 0.00405942, 0.130691], atol=1e-7)
    # metres: a head is ~25 cm wide at the shoulders cut and ~34 cm tall
    extent = ict.neutral.max(0) - ict.neutral.min(0)
    assert 0.2 < extent[0] < 0.3 and 0.3 < extent[1] < 0.4
    # the capped head and each sclera are closed, outward, consistently oriented
    groups = {"head": np.isin(ict.face_part, [0, 1, 2, 3, 4, 5]),
              "eyeball_left": ict.face_part == ict.face_parts.index("eyeball_left"),
              "eyeball_right": ict.face_part == ict.face_parts.index("eyeball_right")}
    for name, sel in groups.items():
        assert topology.is_watertight(ict.faces[sel]), name
        assert topology.signed_volume(ict.neutral, ict.faces[sel]) > 0, name
    head = ict.faces[groups["head"]]
    assert topology.is_watertight(head[ict.face_part[groups["head"]] != ict.face_parts.index("neck_cap")]) is False
    assert len(ict.neck_loop) == 54
    # expression deltas are displacements: jawOpen moves the chin down by centimetres
    chin = ict.landmarks[8]
    assert -0.05 < ict.exp_basis[26, chin, 1] < -0.01


def test_atlas_rebuild_matches_shipped(ict):
    from backend.data.atlas import build_atlas, load_atlas, problems

    built = build_atlas(ict)
    shipped = load_atlas()
    assert problems(built) == []
    np.testing.assert_array_equal(built.region, shipped.region)
    np.testing.assert_array_equal(built.anchor_vertex, shipped.anchor_vertex)
    np.testing.assert_allclose(built.vertices, shipped.vertices)
    assert built.expressions == shipped.expressions == ict.expressions


def test_sampler_batch_is_exact_and_reproducible(ict_path, ict):
    from backend.data import mesh
    from backend.data.sampler import HeadSampler, SamplerConfig

    s = HeadSampler(ict_path, config=SamplerConfig(n_train=4096, n_expressions=65536))
    b = s.batch(3, 256, 128, torch.Generator().manual_seed(7))
    again = s.batch(3, 256, 128, torch.Generator().manual_seed(7))
    for k, v in b.items():
        assert torch.equal(v, again[k]), k
    assert b["surf_posed"].shape == (3, 256, 3) and b["space_sdf"].shape == (3, 128)
    assert b["anchors"].shape == (3, 39, 3) and b["surf_region"].dtype == torch.long
    assert (b["exp_weights"] >= 0).all() and (b["exp_weights"] <= 1).all()
    torch.testing.assert_close(b["surf_normal"].norm(dim=-1), torch.ones(3, 256), rtol=0, atol=1e-5)
    posed, canon = s.meshes(b["id_coeffs"], b["exp_weights"])
    # reference SDF: brute force in float64 over all unburied triangles, winding number over all
    for pts, sdf, verts in ((b["space_posed"], b["space_sdf"], posed), (b["canon_space"], b["canon_sdf"], canon)):
        p, v = pts[:1, ::3].double(), verts[:1].double()           # near (2 mm, 10 mm) and box points
        w = mesh.winding_number_brute(p, v, s.faces, chunk=16)
        d = mesh.distance_brute(p, v, s.faces, chunk=16, face_mask=s.exposed_faces(verts[:1]))
        torch.testing.assert_close(sdf[:1, ::3].double(), torch.where(w > 0.5, -d, d), rtol=0, atol=2e-6)
    # surface points lie on the posed mesh; template points on the mean head, same barycentric point
    d_surf = s.accel.query(b["surf_posed"][:1, :64], posed[:1], need_winding=False)["distance"]
    assert d_surf.max() < 1e-6
    d_tmpl = s.accel.query(b["surf_template"][:1, :64], s.neutral[None], need_winding=False)["distance"]
    assert d_tmpl.max() < 1e-6
    # anchors are the atlas anchor vertices of the identity's neutral head
    torch.testing.assert_close(b["anchors"], canon[:, s.anchor_vertex])
    # region labels come from the triangle corner nearest in barycentric terms: nearly always the region of
    # the template vertex nearest to the template point
    nearest = torch.cdist(b["surf_template"].reshape(-1, 3), s.neutral).argmin(1)
    agree = (s.region[nearest] == b["surf_region"].reshape(-1)).float().mean()
    assert agree > 0.9 and b["surf_region"].min() >= 0 and b["surf_region"].max() < 39


def test_exposure_follows_the_lids(ict_path):
    """A closed left eye buries the sclera under the lid: the per-mesh mask agrees with float64 brute-force
    winding numbers at the re-tested triangles' centroids, and the open right eye is unchanged."""
    from backend.data import mesh
    from backend.data.sampler import HeadSampler

    s = HeadSampler(ict_path)
    w = torch.zeros(1, 53)
    w[0, s.expressions.index("eyeBlink_L")] = 1.0
    posed, _ = s.meshes(torch.zeros(1, 100), w)
    exposed = s.exposed_faces(posed)[0]
    pick = torch.arange(0, len(s.eye_faces), 3)                   # a third of them keeps the test fast
    cent = posed[0].double()[s.faces[s.eye_faces[pick]]].mean(1)[None]
    head = s.faces[torch.as_tensor(ict_faces_in_group(s, 0))]
    sclera = s.faces[torch.as_tensor(ict_faces_in_group(s, 1) + ict_faces_in_group(s, 2))]
    w_head = mesh.winding_number_brute(cent, posed.double(), head, chunk=64)[0]
    w_sclera = mesh.winding_number_brute(cent, posed.double(), sclera, chunk=64)[0]
    ref = torch.where(s.eye_is_sclera[pick], w_head, w_sclera) < 0.5
    assert torch.equal(exposed[s.eye_faces[pick]], ref)
    newly_buried = s.exposed & ~exposed
    left = s.neutral[s.faces].mean(1)[:, 0] > 0
    assert newly_buried[left].sum() > 300 and newly_buried[~left].sum() == 0


def ict_faces_in_group(s, group: int) -> list[int]:
    lo, hi = s.accel.group_bounds[group], s.accel.group_bounds[group + 1]
    return sorted(set(s.accel.cluster_faces[lo:hi].flatten().tolist()))


def test_metrics_on_ict_heads(ict):
    from backend.data import metrics, splits

    ids, exps = splits.heldout_identities(1), splits.heldout_expressions(ict.expressions, 2)
    gt = [v for _, _, v in splits.heldout_meshes(ict, ids, exps)]
    outer = ict.faces[ict.face_buried == 0]        # a prediction has no buried triangles
    n = 100_000
    same = metrics.evaluate_ict(gt[1], outer, gt[1], ict, n=n)
    # point to surface: a head against itself is ~0 (the sampled point-to-point metric gave 0.5 / sqrt(density))
    for part in ("head", "face"):
        assert same[part]["chamfer_l1"] < 1e-4 and same[part]["f_score@1mm"] == 1.0
        assert same[part]["normal_consistency"] > 1 - 1e-4
    assert same["face"]["n_pred"] < 0.5 * same["head"]["n_pred"]              # the face is a part of the head
    # the neutral vs the expressive head of the same identity differ mostly in the face
    diff = metrics.evaluate_ict(gt[0], outer, gt[1], ict, n=n)
    assert diff["face"]["chamfer_l1"] > diff["head"]["chamfer_l1"] > 0.1


def test_detail_weight_spends_samples_on_thin_parts(ict_path):
    """detail_weight w multiplies the sampling density on DETAIL_REGIONS: a share f of surface samples there at
    w = 1 becomes w f / (w f + 1 - f); a non-positive weight is refused."""
    from backend.data.sampler import DETAIL_REGIONS, HeadSampler, SamplerConfig

    shares = []
    for w in (1.0, 4.0):
        s = HeadSampler(ict_path, config=SamplerConfig(detail_weight=w))
        detail = torch.as_tensor([s.atlas.names.index(n) for n in DETAIL_REGIONS])
        b = s.batch(4, 4000, 16, torch.Generator().manual_seed(11))
        shares.append(float(torch.isin(b["surf_region"], detail).float().mean()))
    f = shares[0]
    assert 0.03 < f < 0.3, f
    assert abs(shares[1] - 4 * f / (4 * f + 1 - f)) < 0.03, shares
    with pytest.raises(ValueError, match="detail_weight"):
        HeadSampler(ict_path, config=SamplerConfig(detail_weight=0.0))


def test_named_expressions_put_single_shapes_at_full_weight(ict_path):
    """p_named: that share of the non-neutral samples is one named shape at weight 1 (and half the time its
    _L/_R partner); p_named = 0 leaves the batches as they were; out of [0, 1]
    is refused."""
    from backend.data import splits
    from backend.data.sampler import HeadSampler, SamplerConfig

    plain = HeadSampler(ict_path).batch(64, 8, 8, torch.Generator().manual_seed(3))["exp_weights"]
    again = HeadSampler(ict_path, config=SamplerConfig(p_named=0.0)).batch(64, 8, 8, torch.Generator().manual_seed(3))
    assert torch.equal(plain, again["exp_weights"])
    s = HeadSampler(ict_path, config=SamplerConfig(p_named=1.0, p_neutral=0.0))
    b = s.batch(256, 8, 8, torch.Generator().manual_seed(3))
    w = b["exp_weights"]
    assert set(w.unique().tolist()) == {0.0, 1.0}
    partner = splits.mirror_partners(s.expressions)
    paired = torch.as_tensor(partner != range(len(partner)))
    for row in w:
        on = row.nonzero().flatten().tolist()
        assert len(on) in (1, 2), on
        if len(on) == 2:
            assert partner[on[0]] == on[1]
    two = (w.sum(1) == 2).float().sum() / (w[:, paired].sum(1) > 0).float().sum()
    assert 0.35 < float(two) < 0.65, float(two)                   # partner half the time, for paired shapes
    assert len(w.argmax(1).unique()) > 40                          # every shape comes up
    with pytest.raises(ValueError, match="p_named"):
        HeadSampler(ict_path, config=SamplerConfig(p_named=1.5))


def test_named_expression_errors_score_a_still_warp_at_ict_motion(ict):
    """The eval's named-expression check: a warp that moves nothing scores exactly ICT's own motion on the
    moving skin, and the shipped warp does far better on jawOpen (it learned the jaw)."""
    from types import SimpleNamespace

    from backend.commands.eval import MOTION_MIN, named_expression_errors, skin_vertices
    from backend.weights import load_model

    lm = load_model(None)
    verts = skin_vertices(ict)
    neutral = ict.vertices(np.zeros(ict.id_basis.shape[0]), None)
    z = lm.extras["id_mean"][None].float()

    def tens(a):
        return torch.as_tensor(np.asarray(a, np.float32))

    still = SimpleNamespace(warp=lambda x, w, z_id: torch.zeros_like(x))
    zero = named_expression_errors(still, z, ict, neutral, verts, tens)
    for e, name in enumerate(ict.expressions):
        m = np.linalg.norm(ict.exp_basis[e][verts].astype(np.float64), axis=1)
        if (m > MOTION_MIN).any():
            assert zero[name] == pytest.approx(m[m > MOTION_MIN].mean() * 1e3, rel=1e-5)
    real = named_expression_errors(lm.model, z, ict, neutral, verts, tens)
    assert real.keys() == zero.keys()
    assert real["jawOpen"] < 0.1 * zero["jawOpen"]


def test_motion_weight_spends_samples_where_the_expression_moves_the_skin(ict_path):
    """motion_weight F scales each triangle's density by 1 + F x its motion in cm: with eyeBlink_L at weight 1
    the moving upper-lid skin gets its expected share of surface samples (from the weights, not assumed);
    F = 0 leaves batches bit for bit as they were; a negative F is refused."""
    from backend.data import mesh
    from backend.data.sampler import MOTION_UNIT, HeadSampler, SamplerConfig

    plain = HeadSampler(ict_path).batch(8, 64, 64, torch.Generator().manual_seed(5))
    again = HeadSampler(ict_path, config=SamplerConfig(motion_weight=0.0)).batch(8, 64, 64,
                                                                                 torch.Generator().manual_seed(5))
    for key in plain:
        assert torch.equal(plain[key], again[key]), key

    s = HeadSampler(ict_path, config=SamplerConfig(motion_weight=4.0, p_neutral=0.0))
    w = torch.zeros(1, len(s.expressions), dtype=torch.float64)
    w[0, s.expressions.index("eyeBlink_L")] = 1.0
    posed, canon = s.meshes(torch.zeros(1, s.train_ids.shape[1], dtype=torch.float64), w)
    moved = s.face_motion(posed, canon)[0]
    motion_cm = (posed - canon).norm(dim=-1)[0, s.faces].mean(-1) / MOTION_UNIT
    assert torch.allclose(moved, 1 + 4.0 * motion_cm)
    lid = motion_cm > 0.5                                       # triangles the blink moves more than 5 mm
    assert 0 < int(lid.sum()) < 0.05 * len(lid)
    area, _ = mesh.face_area_normals(posed, s.faces)
    density = s.exposed_faces(posed)[0].to(area.dtype) * s.face_weight.to(area.dtype)
    base = area[0] * density
    expected = float((base * moved)[lid].sum() / (base * moved).sum())
    uniform = float(base[lid].sum() / base.sum())
    assert expected > 3 * uniform                               # the lid gets several times its area's share
    gen = torch.Generator().manual_seed(0)
    face, _ = mesh.sample_surface(posed, s.faces, 20000, gen, (density * moved)[None])
    share = float(lid[face[0]].float().mean())
    assert abs(share - expected) < 4 * (expected * (1 - expected) / 20000) ** 0.5 + 1e-3, (share, expected)
    with pytest.raises(ValueError, match="motion_weight"):
        HeadSampler(ict_path, config=SamplerConfig(motion_weight=-1.0))
