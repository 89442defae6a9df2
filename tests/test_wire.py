"""Frame codec (backend/wire.py) against docs/protocol.md: round trips and every refusal."""

import io
import json
import struct

import numpy as np
import pytest

from backend import wire


def frame(header: dict, payload: bytes = b"") -> bytes:
    """Hand-built frame, bypassing the encoder's own checks."""
    head = json.dumps(header).encode()
    return wire.PREFIX.pack(wire.MAGIC, len(head), len(payload)) + head + payload


def spec(name="a", dtype="float32", shape=(2,), offset=0, nbytes=8):
    return {"name": name, "dtype": dtype, "shape": list(shape), "offset": offset, "nbytes": nbytes}


def req(arrays=(), **extra):
    return {"kind": "request", "id": 7, "op": "echo", "params": {}, "arrays": list(arrays), **extra}


def test_round_trip_every_dtype_and_shape():
    rng = np.random.default_rng(0)
    arrays = {
        "f32": rng.standard_normal((5, 3)).astype(np.float32),
        "f64": rng.standard_normal(7),
        "i32": np.arange(-3, 3, dtype=np.int32).reshape(2, 3),
        "i64": np.array([2**40, -(2**40)], dtype=np.int64),
        "u1": np.array([0, 255, 7], dtype=np.uint8),
        "flag": np.array([True, False, True]),
        "empty": np.zeros((0, 3), np.float32),
        "scalar": np.float64(3.5),
        "i8": np.array([-128, 127], np.int8), "i16": np.array([-5], np.int16), "u16": np.array([9], np.uint16),
        "u32": np.array([2**32 - 1], np.uint32), "u64": np.array([2**64 - 1], np.uint64),
    }
    header = wire.request(3, "deform", {"head": {"identity": [0.5] * 4}, "name": "ü"})
    msg = wire.decode(wire.encode_bytes(header, arrays))
    assert msg.kind == "request" and msg.id == 3 and msg.header["params"] == header["params"]
    assert list(msg.arrays) == list(arrays)
    for name, value in arrays.items():
        got = msg.arrays[name]
        assert got.dtype == np.asarray(value).dtype and got.shape == np.shape(value)
        np.testing.assert_array_equal(got, value)
    assert all(s["offset"] % wire.ALIGN == 0 for s in msg.header["arrays"])


def test_big_endian_and_strided_inputs_arrive_as_little_endian_values():
    be = np.arange(6, dtype=">f8").reshape(2, 3)
    strided = np.arange(20, dtype=np.int32)[::3]
    msg = wire.decode(wire.encode_bytes(wire.reply_ok(1), {"be": be, "s": strided}))
    assert msg.arrays["be"].dtype.str == "<f8"
    np.testing.assert_array_equal(msg.arrays["be"], be)
    np.testing.assert_array_equal(msg.arrays["s"], strided)


def test_stream_of_frames_then_clean_eof():
    frames = [wire.encode_bytes(wire.progress(1, i / 4, f"step {i}")) for i in range(5)]
    frames.append(wire.encode_bytes(wire.reply_ok(1, {"n": 5}), {"x": np.ones((1000, 3), np.float32)}))
    stream = io.BytesIO(b"".join(frames))
    kinds = []
    while (msg := wire.read_frame(stream)) is not None:
        kinds.append(msg.kind)
    assert kinds == ["progress"] * 5 + ["reply"]


def test_error_reply_shape():
    msg = wire.decode(wire.encode_bytes(wire.reply_error(None, "protocol_error", "bad")))
    assert msg.header["ok"] is False and msg.id is None
    assert msg.header["error"] == {"code": "protocol_error", "message": "bad"}


@pytest.mark.parametrize("value, words", [
    (np.zeros(2, np.complex64), "complex64 is not allowed"),
    (np.array(["a"]), "is not allowed"),
    (np.array([object()], dtype=object), "is not allowed"),
    (np.zeros(2, np.float16), "float16 is not allowed"),
    (np.zeros((1,) * 9), "9 dimensions"),
])
def test_encoder_refuses_unsupported_arrays(value, words):
    with pytest.raises(wire.ProtocolError, match=words):
        wire.encode(wire.reply_ok(1), {"x": value})


def test_encoder_refuses_non_json_and_oversized_headers():
    with pytest.raises(wire.ProtocolError, match="not plain JSON"):
        wire.encode(wire.request(1, "echo", {"x": float("nan")}))
    with pytest.raises(wire.ProtocolError, match="not plain JSON"):
        wire.encode(wire.request(1, "echo", {"x": np.float32(1)}))
    with pytest.raises(wire.ProtocolError, match="header is .* bytes"):
        wire.encode(wire.request(1, "echo", {"x": "y" * wire.MAX_HEADER_BYTES}))
    with pytest.raises(wire.ProtocolError, match="at most 64"):
        wire.encode(wire.reply_ok(1), {f"a{i}": np.zeros(1) for i in range(65)})
    with pytest.raises(wire.ProtocolError, match="array name"):
        wire.encode(wire.reply_ok(1), {"bad name": np.zeros(1)})


@pytest.mark.parametrize("raw, words", [
    (b"XXXX" + bytes(12), "bad magic"),
    (wire.PREFIX.pack(wire.MAGIC, 0, 0), "header length 0"),
    (wire.PREFIX.pack(wire.MAGIC, wire.MAX_HEADER_BYTES + 1, 0), "header length"),
    (wire.PREFIX.pack(wire.MAGIC, 10, wire.MAX_FRAME_BYTES), "exceeds"),
    (wire.PREFIX.pack(wire.MAGIC, 10, 0)[:9], "truncated"),
    (frame(req([spec()]), bytes(8))[:-3], "truncated"),
])
def test_broken_streams_are_fatal(raw, words):
    with pytest.raises(wire.ProtocolError, match=words) as info:
        wire.read_frame(io.BytesIO(raw))
    assert info.value.fatal


@pytest.mark.parametrize("header, payload, words", [
    (b"{not json", b"", "not valid UTF-8 JSON"),
    (b"\xff\xfe{}", b"", "not valid UTF-8 JSON"),
    (b'{"kind":"request","id":1,"op":"echo","params":{"x":NaN},"arrays":[]}', b"", "NaN is not JSON"),
    (b"[1, 2]", b"", "must be a JSON object"),
])
def test_bad_json_is_a_recoverable_error(header, payload, words):
    raw = wire.PREFIX.pack(wire.MAGIC, len(header), len(payload)) + header + payload
    stream = io.BytesIO(raw + wire.encode_bytes(wire.request(2, "echo")))
    with pytest.raises(wire.ProtocolError, match=words) as info:
        wire.read_frame(stream)
    assert not info.value.fatal
    assert wire.read_frame(stream).id == 2  # the stream stayed in sync


@pytest.mark.parametrize("header, payload, words", [
    (req([spec(dtype="complex64", nbytes=16)]), bytes(16), "unknown dtype 'complex64'"),
    (req([spec(dtype="object")]), bytes(8), "unknown dtype"),
    (req([spec(nbytes=12)]), bytes(12), "needs 8 bytes"),
    (req([spec(shape=(2, -1))]), bytes(8), "non-negative integers"),
    (req([spec(shape=(2.0,))]), bytes(8), "non-negative integers"),
    (req([spec()]), bytes(4), "past the 4-byte payload"),
    (req([spec()]), bytes(16), "payload has 16 bytes"),
    (req([spec(offset=8)]), bytes(16), "starts at byte 8, expected 0"),
    (req([spec("a", "uint8", (3,), 0, 3), spec("b", "uint8", (1,), 3, 1)]), bytes(9), "expected 8"),
    (req([spec(), spec()]), bytes(16), "appears twice"),
    (req([{**spec(), "extra": 1}]), bytes(8), "exactly name"),
    (req([spec("a", "bool", (2,), 0, 2)]), b"\x01\x02", "bool bytes"),
    (req([spec(name="../x")]), bytes(8), "array name"),
    (req(extra_key=1), b"", "unknown \\['extra_key'\\]"),
    ({"kind": "request", "id": 7, "params": {}, "arrays": []}, b"", "missing \\['op'\\]"),
    (req(op="Rm -rf"), b"", "lower-case identifier"),
    (req(params=[1]), b"", "params must be a JSON object"),
    ({**req(), "kind": "pickle"}, b"", "unknown message kind"),
    ({"kind": "reply", "id": 7, "ok": True, "arrays": []}, b"", "carries params"),
    ({"kind": "reply", "id": 7, "ok": False, "error": {"code": 1, "message": "m"}, "arrays": []}, b"",
     "error reply carries"),
    ({"kind": "reply", "id": 7, "ok": "yes", "params": {}, "arrays": []}, b"", "true or false"),
    ({"kind": "progress", "id": 7, "fraction": 1.5, "message": "", "arrays": []}, b"", "fraction"),
])
def test_invalid_headers_are_refused_with_the_request_id(header, payload, words):
    with pytest.raises(wire.ProtocolError, match=words) as info:
        wire.decode(frame(header, payload))
    assert not info.value.fatal
    assert info.value.request_id == 7


@pytest.mark.parametrize("rid", [-1, True, 2**53, "7", 1.0, None])
def test_request_ids_must_be_plain_integers(rid):
    with pytest.raises(wire.ProtocolError, match="id") as info:
        wire.decode(frame(req(id=rid)))
    assert info.value.request_id is None


def test_decode_refuses_trailing_bytes():
    raw = wire.encode_bytes(wire.request(1, "echo"))
    with pytest.raises(wire.ProtocolError, match="prefix says"):
        wire.decode(raw + b"\0")


def test_prefix_layout_is_little_endian():
    raw = wire.encode_bytes(wire.request(1, "echo"), {"x": np.zeros(3, np.float32)})
    magic, hlen, plen = struct.unpack("<4sIQ", raw[:16])
    assert magic == b"IMHF" and plen == 12 and len(raw) == 16 + hlen + plen
    assert json.loads(raw[16 : 16 + hlen])["arrays"][0]["nbytes"] == 12


def test_the_example_in_docs_protocol_md_is_what_the_encoder_writes(repo_root):
    raw = wire.encode_bytes(wire.request(1, "echo", {"note": "hi"}), {"p": np.array([[0.0, 0.1, 0.2]], np.float32)})
    doc = (repo_root / "docs" / "protocol.md").read_text()
    assert f"a {len(raw)}-byte `echo` request" in doc
    compact = "".join(doc.split())
    assert raw[:16].hex() in compact and raw[-12:].hex() in compact
    assert '{"name":"p","dtype":"float32","shape":[1,3],"offset":0,"nbytes":12}' in compact
