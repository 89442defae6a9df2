"""Seeded mutations of valid frames, shared by the decoder's and the server's fuzz tests (issue 17); the kinds
of mutation are listed in docs/reliability.md."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from backend import wire

WELL_FRAMED = (3, 5, 6, 7)  # mutation kinds that keep the prefix's lengths true: the stream stays in sync


def valid_frames() -> list[bytes]:
    rng = np.random.default_rng(1)
    return [
        wire.encode_bytes(wire.request(1, "generate", {"seed": 3, "resolution": 64})),
        wire.encode_bytes(wire.request(2, "edit", {"head": {"identity": [0.1] * 8}, "ops": [{"op": "reset"}]})),
        wire.encode_bytes(wire.request(3, "fit", {"steps": 10}), {"points": rng.random((50, 3), np.float32)}),
        wire.encode_bytes(wire.reply_ok(4, {"n": 2}), {"v": rng.random((20, 3), np.float32),
                                                       "f": np.arange(30, dtype=np.int32).reshape(10, 3),
                                                       "b": np.array([True, False])}),
        wire.encode_bytes(wire.progress(5, 0.5, "half")),
        wire.encode_bytes(wire.reply_error(None, "protocol_error", "x")),
    ]


def mutate(frame: bytes, rng: np.random.Generator) -> bytes:
    """One random or structured mutation of a valid frame (see docs/reliability.md)."""
    return mutate_kind(frame, int(rng.integers(8)), rng)


def mutate_kind(frame: bytes, kind: int, rng: np.random.Generator) -> bytes:
    b = bytearray(frame)
    if kind == 0:  # flip random bytes anywhere
        for i in rng.integers(0, len(b), rng.integers(1, 8)):
            b[i] = rng.integers(256)
    elif kind == 1:  # truncate
        b = b[: rng.integers(0, len(b))]
    elif kind == 2:  # random bytes
        b = bytearray(rng.integers(0, 256, rng.integers(1, 200), dtype=np.uint8).tobytes())
    elif kind == 3:  # rewrite a header value with a value of another type
        hlen = wire.PREFIX.unpack(bytes(b[:16]))[1]
        header = json.loads(bytes(b[16 : 16 + hlen]))
        header = _replace_somewhere(header, rng)
        head = json.dumps(header).encode()
        b = bytearray(wire.PREFIX.pack(wire.MAGIC, len(head), len(b) - 16 - hlen) + head + b[16 + hlen :])
    elif kind == 4:  # lie about the lengths
        magic, hlen, plen = wire.PREFIX.unpack(bytes(b[:16]))
        b[:16] = wire.PREFIX.pack(magic, int(rng.choice([hlen, hlen + 1, hlen - 1, 2**20])),
                                  int(rng.choice([plen, plen + 8, max(plen - 8, 0), 2**31 - 4096])))
    elif kind == 5:  # flip bytes inside the header only (stays well framed)
        hlen = wire.PREFIX.unpack(bytes(b[:16]))[1]
        for i in rng.integers(16, 16 + hlen, rng.integers(1, 4)):
            b[i] = rng.integers(32, 127)
    elif kind == 7:  # arrays that claim more than the payload holds, or a huge shape
        hlen = wire.PREFIX.unpack(bytes(b[:16]))[1]
        header = json.loads(bytes(b[16 : 16 + hlen]))
        header["arrays"] = [{"name": "a", "dtype": str(rng.choice(["float32", "uint8", "bool", "float16"])),
                             "shape": [int(rng.integers(0, 2**31)) for _ in range(int(rng.integers(1, 4)))],
                             "offset": 0, "nbytes": int(rng.integers(0, 64))}]
        head = json.dumps(header).encode()
        payload = bytes(int(rng.integers(0, 64)))
        b = bytearray(wire.PREFIX.pack(wire.MAGIC, len(head), len(payload)) + head + payload)
    else:  # deep nesting in the params
        depth = int(rng.integers(10, 5000))
        head = (b'{"kind":"request","id":9,"op":"echo","arrays":[],"params":{"x":' + b"[" * depth + b"]" * depth
                + b"}}")
        b = bytearray(wire.PREFIX.pack(wire.MAGIC, len(head), 0) + head)
    return bytes(b)


ODD_VALUES: tuple[Any, ...] = ([], {}, "x", None, -1, 2**64, 1.5, True, [[[]]], {"a": []}, "float32", [2**31, 2**31])


def _replace_somewhere(node, rng):
    if isinstance(node, dict) and node and rng.random() < 0.7:
        key = list(node)[rng.integers(len(node))]
        node[key] = _replace_somewhere(node[key], rng)
        return node
    if isinstance(node, list) and node and rng.random() < 0.7:
        i = int(rng.integers(len(node)))
        node[i] = _replace_somewhere(node[i], rng)
        return node
    return ODD_VALUES[rng.integers(len(ODD_VALUES))]


