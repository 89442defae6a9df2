"""The eval command's table, model-card block and surface extraction (the metrics themselves are tested with the
data code)."""

import torch

from backend.commands import eval as ev

SUMMARY = {"identities": 2, "expressions_per_identity": 1, "points": 10000, "steps": 60, "resolution": 96,
           "samples": 100000, "topk": 8, "device": "cpu", "seconds": 1.0, "cd_l1_mm": 0.25, "nc": 0.95,
           "f1mm": 0.96, "exp_cd_l1_mm": 0.5, "corr_mm": 1.2}


def test_table_marks_targets_met_and_missed():
    lines = ev.format_table(SUMMARY).splitlines()
    row = {ln.split("|")[1].strip(): ln.split("|")[4].strip()
           for ln in lines if ln.startswith("| ") and "---" not in ln}
    assert row["CD-L1 neutral (mm)"] == "yes"  # 0.25 <= 0.30
    assert row["normal consistency"] == "NO"  # 0.95 < 0.99
    assert row["F-score @1 mm"] == "yes"
    assert row["CD-L1 held-out expressions (mm)"] == "NO"
    assert row["correspondence error, neutral (mm)"] == "yes"
    assert row["locality: p95 movement outside 1 cm margin (mm)"] == "n/a"  # not measured


def test_card_block_is_replaced_not_duplicated(tmp_path):
    card = tmp_path / "card.md"
    card.write_text("# card\nintro\n")
    ev.write_card(card, "first table")
    ev.write_card(card, "second table")
    text = card.read_text()
    assert text.startswith("# card\nintro\n")
    assert "second table" in text and "first table" not in text
    assert text.count(ev.CARD_BEGIN) == 1 and text.count(ev.CARD_END) == 1


def test_surface_extraction_runs_in_bounded_chunks_without_autograd(monkeypatch):
    """The eval's extraction evaluates the model in the engine's chunks and, on the worker threads too, records no
    graph (the model's parameters require grad): either one unbounded took the CPU eval at 256 past 20 GB."""
    from backend.engine import tuning
    from backend.weights import load_model

    loaded = load_model(None, "cpu")
    model = loaded.model
    calls: list[tuple[int, bool]] = []
    sdf = model.sdf

    def spy(x: torch.Tensor, *rest, **kw) -> torch.Tensor:
        out = sdf(x, *rest, **kw)
        calls.append((x.shape[1], out.requires_grad))
        return out

    monkeypatch.setattr(model, "sdf", spy)
    monkeypatch.setitem(tuning.CHUNKS, "cpu", 512)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the chunks on worker threads
    try:
        with torch.no_grad():
            zr = model.region_codes(loaded.extras["id_mean"][None].float())
        mesh = ev.surface_of(model, zr, None, None, resolution=24, topk=None, device=torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    assert len(mesh.faces) > 100
    assert sum(n for n, _ in calls) > 4 * 512
    assert max(n for n, _ in calls) <= 512
    assert not any(graph for _, graph in calls)


class _LinearRegionsModel:
    """A stand-in model whose SDF is x times the sum of the region codes' first entries (swapping one region's
    code changes it everywhere), recording the topk of every point it evaluates."""

    def __init__(self, n_regions: int):
        from types import SimpleNamespace

        self.cfg = SimpleNamespace(n_regions=n_regions)
        self.calls: list = []

    def anchors(self, zr):
        return None

    def sdf(self, x, zr, k, topk=None):
        self.calls.extend([topk] * x.shape[1])  # one entry per point: chunks and threads split a call's points
        return x[..., 0] * zr[:, :, 0].sum(-1, keepdim=True)


def test_locality_scores_a_dense_eval_once_and_a_pruned_one_both_ways():
    from types import SimpleNamespace

    import numpy as np

    from backend.data.atlas import load_atlas
    from backend.engine.extract import Mesh

    atlas = load_atlas()
    verts = atlas.vertices.astype(np.float32)
    za = torch.zeros(1, len(atlas.names), 4)
    zb = za.clone()
    zb[:, :, 0] = torch.linspace(0.1, 0.5, za.shape[1])
    fits = [(SimpleNamespace(zr=za, z_id=None), verts.astype(np.float64)), (SimpleNamespace(zr=zb, z_id=None), None)]
    args = SimpleNamespace(locality_regions=2)
    regions, mesh = 2, Mesh(verts[::10], np.zeros((0, 3), np.int32))
    for topk, evaluations in ((None, [None] * (1 + regions)), (8, [8, None] + [8, None] * regions)):
        model = _LinearRegionsModel(za.shape[1])
        out = ev.locality(model, fits, atlas, lambda *a: mesh, args, topk, torch.device("cpu"))
        # A's own field once per setting, then once per region and setting, each at every vertex
        assert model.calls == [tk for tk in evaluations for _ in range(len(mesh.vertices))]
        assert out["locality_regions"] == [0, za.shape[1] - 1]
        assert out["locality_p95_mm"] > 0 and out["locality_p95_dense_mm"] == out["locality_p95_mm"]
        assert out["locality_inside_p95_mm"] > 0 and out["locality_p95_vertex_margin_mm"] > 0
