"""Weights I/O: checksum verification, malformed files, no unpickling, the untrained model only on request."""

import pickle
import shutil

import pytest
import torch

from backend import weights as W
from backend.errors import WeightsError


def _write(tmp_path, cfg=None):
    lm = W.load_model(tmp_path / "nothing-here", allow_untrained=True)
    meta = {"format": W.FORMAT, "config": lm.config.to_json(), "note": "test"}
    W.save_weights(tmp_path / W.WEIGHTS_FILE, W.model_tensors(lm.model, lm.extras), meta)
    return lm


def test_missing_file_is_an_error_unless_the_developer_flag_allows_the_untrained_model(tmp_path):
    with pytest.raises(WeightsError, match="weights are missing.*Reinstall"):
        W.load_model(tmp_path)
    a = W.load_model(tmp_path, allow_untrained=True)
    b = W.load_model(tmp_path, allow_untrained=True)
    assert not a.trained
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert set(W.EXTRA_KEYS) <= set(a.extras)


def test_roundtrip_fp16_and_no_pickle(tmp_path, monkeypatch):
    src = _write(tmp_path)
    digest = (tmp_path / (W.WEIGHTS_FILE + ".sha256")).read_text().split()[0]
    assert digest == W.sha256_file(tmp_path / W.WEIGHTS_FILE)

    def forbidden(*a, **k):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    lm = W.load_model(tmp_path)
    assert lm.trained and lm.meta["note"] == "test"
    for k, v in src.model.state_dict().items():
        ref = v.half().float() if v.numel() >= W.SMALL_TENSOR else v
        assert torch.equal(lm.model.state_dict()[k], ref)


def test_corrupted_copy_raises(tmp_path):
    _write(tmp_path)
    path = tmp_path / W.WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="SHA-256"):
        W.load_model(tmp_path)


def test_missing_checksum_raises(tmp_path):
    _write(tmp_path)
    (tmp_path / (W.WEIGHTS_FILE + ".sha256")).unlink()
    with pytest.raises(WeightsError, match="missing"):
        W.load_model(tmp_path)


def test_malformed_file_with_matching_checksum_raises(tmp_path):
    path = tmp_path / W.WEIGHTS_FILE
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    (tmp_path / (W.WEIGHTS_FILE + ".sha256")).write_text(W.sha256_file(path) + "  imhead.safetensors\n")
    with pytest.raises(WeightsError, match="not a readable"):
        W.load_model(tmp_path)


def test_unreadable_weights_are_a_weights_error(tmp_path):
    (tmp_path / W.WEIGHTS_FILE).mkdir()  # exists, but reading it fails (as a permission error would, also as root)
    with pytest.raises(WeightsError, match="cannot be read"):
        W.load_model(tmp_path, allow_untrained=True)


def test_wrong_parameters_raise(tmp_path):
    lm = W.load_model(tmp_path / "none", allow_untrained=True)
    tensors = W.model_tensors(lm.model, lm.extras)
    del tensors["model.anchor_bias"]
    W.save_weights(tmp_path / W.WEIGHTS_FILE, tensors, {"format": W.FORMAT, "config": lm.config.to_json()})
    with pytest.raises(WeightsError, match="do not match"):
        W.load_model(tmp_path)


def test_shipped_weights_copy_corrupted_raises(tmp_path):
    shipped = W.default_weights_dir() / W.WEIGHTS_FILE
    if not shipped.exists():
        pytest.skip("no shipped weights yet")
    shutil.copy(shipped, tmp_path / W.WEIGHTS_FILE)
    shutil.copy(shipped.with_name(W.WEIGHTS_FILE + ".sha256"), tmp_path / (W.WEIGHTS_FILE + ".sha256"))
    assert W.load_model(tmp_path).trained
    data = bytearray((tmp_path / W.WEIGHTS_FILE).read_bytes())
    data[-3] ^= 0xFF
    (tmp_path / W.WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(WeightsError):
        W.load_model(tmp_path)


def test_shipped_weights_generate_a_closed_head_sized_surface():
    from backend.engine.extract import extract_mesh

    lm = W.load_model()
    if not lm.trained:
        pytest.skip("no shipped weights yet")
    m, ex = lm.model, lm.extras
    assert (W.default_weights_dir() / W.WEIGHTS_FILE).stat().st_size <= 30 * 2**20
    zr, k = m.decode(ex["id_mean"][None])
    with torch.no_grad():
        mesh, _ = extract_mesh(lambda p: m.sdf(p[None], zr, k, topk=4)[0], 32)
    ext = mesh.vertices.max(0) - mesh.vertices.min(0)
    # ICT mean head: 0.25 x 0.34 x 0.22 m (x, y, z); allow the coarse grid and the neck cut
    assert 0.18 < ext[0] < 0.32 and 0.25 < ext[1] < 0.42 and 0.17 < ext[2] < 0.30, ext
    edges = torch.as_tensor(mesh.faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)).long()
    _, counts = torch.unique(torch.sort(edges, 1).values, dim=0, return_counts=True)
    assert (counts == 2).all()  # closed: every edge has exactly two faces
