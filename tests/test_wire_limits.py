"""The decoder is total (issue 17): any byte sequence gives a Message or a ProtocolError, and the limits are
checked before memory is allocated for what a frame merely declares."""

from __future__ import annotations

import io
import json
import resource

import numpy as np
import pytest

from backend import wire
from fuzz_frames import mutate, valid_frames


def raw_frame(header: dict | bytes, payload: bytes = b"", payload_len: int | None = None) -> bytes:
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(payload) if payload_len is None else payload_len
    return wire.PREFIX.pack(wire.MAGIC, len(head), n) + head + payload


def req(**extra) -> dict:
    return {"kind": "request", "id": 7, "op": "echo", "params": {}, "arrays": [], **extra}


def spec(**extra) -> dict:
    return {"name": "a", "dtype": "float32", "shape": [2], "offset": 0, "nbytes": 8, **extra}


# The four classes of well-framed input that used to raise TypeError, RecursionError or numpy errors.
@pytest.mark.parametrize("head, payload, words", [
    (b'{"kind": []}', b"", "unknown message kind"),
    (b"{}", b"", "unknown message kind"),
    (json.dumps(req(arrays=[spec(dtype=[])])).encode(), bytes(8), "unknown dtype"),
    (json.dumps(req(arrays=[spec(dtype={})])).encode(), bytes(8), "unknown dtype"),
    (b'{"kind":"request","id":7,"op":"echo","arrays":[],"params":' + b"[" * 100000 + b"]" * 100000 + b"}", b"",
     "nests deeper"),
    (json.dumps(req(arrays=[spec(shape=[0, 2**31, 2**31], nbytes=0)])).encode(), b"", "elements"),
    (json.dumps(req(arrays=[spec(shape=[2**40], nbytes=2**42)])).encode(), b"", "non-negative integers"),
    (b'{"kind":"request","id":7,"op":"echo","arrays":[],"params":{"x":1e999}}', b"", "out of range"),
    (b'{"kind":"request","id":7,"op":"echo","arrays":[],"params":{"x":' + b"9" * 5000 + b"}}", b"", "JSON"),
    (json.dumps(req(op=[])).encode(), b"", "lower-case identifier"),
])
def test_malformed_headers_are_protocol_errors_and_the_stream_stays_in_sync(head, payload, words):
    stream = io.BytesIO(raw_frame(head, payload) + wire.encode_bytes(wire.request(2, "echo")))
    with pytest.raises(wire.ProtocolError, match=words) as info:
        wire.read_frame(stream)
    assert not info.value.fatal and wire.DECODER_GAP not in str(info.value)
    assert wire.read_frame(stream).id == 2


def peak_rss_growth_mb(fn) -> float:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def test_a_small_frame_declaring_gigabytes_allocates_only_what_arrives():
    # A valid header for a ~2 GiB array, then 79 bytes: the reader must fail on truncation, not allocate 2 GiB.
    n = (wire.MAX_FRAME_BYTES - 4096) // 4
    head = json.dumps(req(arrays=[spec(shape=[n], nbytes=4 * n)])).encode()
    raw = raw_frame(head, bytes(79), payload_len=4 * n)

    def read():
        with pytest.raises(wire.ProtocolError, match="truncated") as info:
            wire.read_frame(io.BytesIO(raw))
        assert info.value.fatal

    assert peak_rss_growth_mb(read) < 20


def test_a_refused_header_skips_its_payload_without_storing_it():
    # An unknown dtype over a 64 MiB payload: consumed in 1 MiB pieces, the stream stays usable.
    n = 64 << 20
    head = json.dumps(req(arrays=[spec(dtype="complex64", shape=[n // 8], nbytes=n)])).encode()
    stream = io.BytesIO(raw_frame(head, bytes(n)) + wire.encode_bytes(wire.request(2, "echo")))
    with pytest.raises(wire.ProtocolError, match="unknown dtype"):
        wire.read_frame(stream)
    assert wire.read_frame(stream).id == 2


def test_layout_is_checked_before_the_payload_is_read():
    # The arrays claim 8 bytes, the prefix 16: refused from the header alone, the payload is skipped.
    head = json.dumps(req(arrays=[spec()])).encode()
    stream = io.BytesIO(raw_frame(head, bytes(16)))
    with pytest.raises(wire.ProtocolError, match="payload has 16 bytes, the arrays account for 8"):
        wire.read_frame(stream)
    assert stream.tell() == len(stream.getvalue())


# ------------------------------------------------------------------------------------------- seeded fuzzing


def test_fuzzed_streams_give_messages_or_protocol_errors_only():
    """The client's reader loop (and the server's) over 3,000 mutated frames: nothing but ProtocolError."""
    rng = np.random.default_rng(17)
    frames = valid_frames()
    outcomes = {"decoded": 0, "refused": 0, "fatal": 0}
    for _ in range(3000):
        data = mutate(frames[rng.integers(len(frames))], rng)
        stream = io.BytesIO(data + frames[0])
        while True:  # the readers' loop: go on after a refused frame, stop at the end or a broken stream
            try:
                if wire.read_frame(stream) is None:
                    break
                outcomes["decoded"] += 1
            except wire.ProtocolError as exc:
                assert wire.DECODER_GAP not in str(exc), str(exc)
                outcomes["fatal" if exc.fatal else "refused"] += 1
                if exc.fatal:
                    break
    assert outcomes["refused"] > 500 and outcomes["fatal"] > 500, outcomes
