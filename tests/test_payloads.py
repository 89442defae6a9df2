"""The typed op payloads (backend/payloads.py, backend/replies.py): wire form, validation, and docs/protocol.md."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from backend import errors, payloads, replies

REPO = Path(__file__).resolve().parent.parent


def _protocol_table():
    spec = importlib.util.spec_from_file_location("protocol_table", REPO / "tools" / "protocol_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_protocol_doc_table_is_generated_from_the_payloads():
    text = (REPO / "docs" / "protocol.md").read_text(encoding="utf-8")
    assert _protocol_table().render(text, replies.markdown_table()) == text, \
        "docs/protocol.md's op table is out of date: run python tools/protocol_table.py"


def test_table_lists_every_served_op_and_field():
    from backend.server import CONTROL_OPS, SESSION_OPS

    table = replies.markdown_table()
    rows = {line.split("|")[1].strip(" `"): line for line in table.splitlines()[2:]}
    assert set(rows) == (set(SESSION_OPS) | set(CONTROL_OPS)) - {"echo"}
    for cls in payloads.REQUESTS:
        assert len(rows[cls.OP].split("|")) == 7, f"a '|' in {cls.OP}'s docs breaks the table"
        for name in cls.param_names() + cls.array_names():
            assert f"`{name}`" in rows[cls.OP]


def test_payload_modules_import_without_torch():
    """The add-on imports them from the extension's backend/ copy: numpy only, never torch."""
    code = "import sys, backend.payloads, backend.replies; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_requests_keep_the_wire_format():
    """What the add-on sends is what it sent as plain dicts; unset fields are left to the server's defaults."""
    assert payloads.GenerateRequest(seed=3, resolution=64).to_dict() == {"seed": 3, "resolution": 64}
    head = {"format": "imhead-head/1", "identity": [0.0] * 256}
    assert payloads.GenerateRequest(head=head, resolution=96).to_dict() == {"head": head, "resolution": 96}
    assert payloads.HandshakeRequest(1).to_dict() == {"protocol": 1}
    assert payloads.CancelRequest(7).to_dict() == {"target": 7}
    assert payloads.ShutdownRequest().to_dict() == {}
    canonical, expr = np.zeros((4, 3), np.float32), np.zeros((2, 53), np.float32)
    deform = payloads.DeformRequest(head, canonical, expr)
    assert deform.to_dict() == {"head": head}
    assert set(deform.to_arrays()) == {"canonical", "expressions"}
    fit = payloads.FitRequest(canonical, faces=np.array([[0, 1, 2]], np.int32), landmark_regions=None,
                              resolution=128, fit_expression=True)
    assert fit.to_dict() == {"resolution": 128, "fit_expression": True}
    assert set(fit.to_arrays()) == {"points", "faces"}
    capture = payloads.FitCaptureRequest("/x.png", resolution=64)
    assert capture.to_dict() == {"path": "/x.png", "resolution": 64}


def test_from_dict_round_trips_and_fills_defaults():
    head = {"format": "imhead-head/1", "identity": [0.0] * 256}
    gen = payloads.GenerateRequest.from_dict({"head": head})
    assert gen.head == head and gen.resolution == 256
    assert payloads.GenerateRequest.from_dict({}).seed == 0
    edit = payloads.EditRequest(head, [{"op": "reset", "regions": "all"}], 64)
    assert payloads.EditRequest.from_dict(edit.to_dict()) == edit
    pts = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
    fit = payloads.FitRequest.from_dict({"units": "cm", "steps": 5}, {"points": pts})
    assert fit.fixed_scale == 0.01 and fit.steps == 5 and fit.batch_points is None and fit.use_normals is None
    capture = payloads.FitCaptureRequest.from_dict({"path": "/a.mp4"})
    assert capture.resolution == 128 and capture.max_frames == payloads.MAX_FOOTAGE_FRAMES


@pytest.mark.parametrize("cls, params, arrays, message", [
    (payloads.GenerateRequest, {"colour": 1}, None, "generate: unknown parameters ['colour']"),
    (payloads.GenerateRequest, {"resolution": 8}, None, "resolution must be between 16 and"),
    (payloads.GenerateRequest, {"seed": -1}, None, "seed must be between"),
    (payloads.GenerateRequest, {"head": [1]}, None, "head must be a JSON object"),
    (payloads.EditRequest, {"head": {}, "ops": []}, None, "ops must be a non-empty list"),
    (payloads.DeformRequest, {"head": {}, "exact_residual": 1}, None, "exact_residual must be true or false"),
    (payloads.DeformRequest, {"head": {}}, {"canonical": np.zeros((2, 3), np.float32)}, "missing array 'expressions'"),
    (payloads.DeformRequest, {"head": {}}, {"canonical": np.zeros((2, 3), np.float32),
                                            "expressions": np.full((1, 53), 5, np.float32)}, "must lie in"),
    (payloads.FitRequest, {"units": "furlong"}, None, "units must be 'auto'"),
    (payloads.FitRequest, {"batch_points": 1}, None, "batch_points must be between 64 and 65536"),
    (payloads.FitRequest, {"use_normals": "yes"}, None, "fit_expression and use_normals must be true or false"),
    (payloads.FitRequest, {}, None, "missing array 'points'"),
    (payloads.FitRequest, {"landmark_regions": ["chin"]}, {"points": np.zeros((5, 3), np.float32)},
     "landmarks need the 'landmarks' array"),
    (payloads.FitCaptureRequest, {"path": ""}, None, "fit_capture: 'path' must be the footage's file path"),
    (payloads.FitCaptureRequest, {"path": "a", "max_frames": 0}, None, "fit_capture: 'max_frames' must be"),
    (payloads.CancelRequest, {"target": "x"}, None, "cancel needs params"),
])
def test_from_dict_names_the_bad_field(cls, params, arrays, message):
    with pytest.raises(errors.InvalidInput) as info:
        cls.from_dict(params, arrays)
    assert message in str(info.value)


def test_every_reply_field_has_a_json_type():
    for cls in set(replies.REPLIES.values()):
        for f in cls.fields():
            assert f.metadata.get("extra") or str(f.type).replace(" | None", "") in replies.JSON_TYPES, (cls, f.name)


def test_replies_check_their_fields():
    info = {"protocol": 1, "backend_version": "0.1.0", "torch_device": "cpu", "model_name": "m", "trained": True,
            "regions": [], "expressions": [], "extra": 3}
    hs = replies.HandshakeReply.from_dict(info)
    assert hs.torch_device == "cpu" and hs.info["extra"] == 3 and hs.to_dict() == info
    with pytest.raises(errors.InvalidInput, match="'trained' must be bool"):
        replies.HandshakeReply.from_dict(info | {"trained": 1})
    assert replies.CancelReply.from_dict({"target": 4, "state": "queued"}).to_dict() == {"target": 4, "state": "queued"}
    arrays = {name: np.zeros((1, 3), np.float32) for name in ("vertices", "residual", "converged")}
    replies.DeformReply.from_dict({"non_converged": 0, "residual_p99_m": 1, "iterations": 3}, arrays)
    with pytest.raises(errors.InvalidInput, match="'vertices' must be np.ndarray"):
        replies.DeformReply.from_dict({"non_converged": 0, "residual_p99_m": 0.1}, {})
