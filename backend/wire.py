"""Frame codec for the stdio protocol (docs/protocol.md is the specification).

numpy + json + struct only: the Blender add-on imports this module from the copy of `backend/` inside the
extension, where torch is not available. Nothing is pickled; arrays travel as raw little-endian bytes
described by the JSON header.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from typing import IO, Any, TypeGuard

import numpy as np

PROTOCOL_VERSION = 1

MAGIC = b"IMHF"
PREFIX = struct.Struct("<4sIQ")  # magic, header length (u32), payload length (u64)
MAX_FRAME_BYTES = 2 * 1024**3  # prefix + header + payload
MAX_HEADER_BYTES = 1024**2
MAX_ARRAYS = 64
MAX_NDIM = 8
ALIGN = 8  # every array starts at a multiple of 8 bytes inside the payload
MAX_ID = 2**53 - 1  # ids must survive a round trip through any JSON implementation
MAX_JSON_DEPTH = 32  # nesting of [ and { in a header (requests use at most 6)
MAX_ELEMENTS = 2**31  # elements of one array, zero-length axes counted as 1
READ_CHUNK = 1 << 20  # payload buffers grow from this size with the bytes that arrive
DECODER_GAP = "decoder gap:"  # marks an exception the checks should have turned into a clear refusal

DTYPES: dict[str, np.dtype] = {
    name: np.dtype(code)
    for name, code in {
        "bool": "|b1",
        "int8": "|i1",
        "uint8": "|u1",
        "int16": "<i2",
        "uint16": "<u2",
        "int32": "<i4",
        "uint32": "<u4",
        "int64": "<i8",
        "uint64": "<u8",
        "float32": "<f4",
        "float64": "<f8",
    }.items()
}
_NAME_OF = {(dt.kind, dt.itemsize): name for name, dt in DTYPES.items()}
_ARRAY_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,63}$")
_OP_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,63}$")

# Top-level header keys per message kind: (required, optional).
_KEYS = {
    "request": ({"kind", "id", "op", "params", "arrays"}, set()),
    "reply": ({"kind", "id", "ok", "arrays"}, {"params", "error"}),
    "progress": ({"kind", "id", "fraction", "message", "arrays"}, set()),
}


class ProtocolError(Exception):
    """A frame or message that breaks docs/protocol.md.

    `fatal` means the byte stream can no longer be trusted (bad magic, impossible length, truncation): the
    reader cannot know where the next frame starts. Otherwise the whole frame was consumed and the stream is
    still in sync. `request_id` is the offending message's id when the header got far enough to tell.
    """

    code = "protocol_error"

    def __init__(self, message: str, *, fatal: bool = False, request_id: int | None = None):
        super().__init__(message)
        self.fatal = fatal
        self.request_id = request_id


@dataclass
class Message:
    header: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.header["kind"]

    @property
    def id(self) -> int | None:
        return self.header["id"]


# ----------------------------------------------------------------------------------------------- building


def request(request_id: int, op: str, params: dict | None = None) -> dict[str, Any]:
    return {"kind": "request", "id": request_id, "op": op, "params": params or {}}


def reply_ok(request_id: int, params: dict | None = None) -> dict[str, Any]:
    return {"kind": "reply", "id": request_id, "ok": True, "params": params or {}}


def reply_error(request_id: int | None, code: str, message: str) -> dict[str, Any]:
    return {"kind": "reply", "id": request_id, "ok": False, "error": {"code": code, "message": message}}


def progress(request_id: int, fraction: float, message: str) -> dict[str, Any]:
    return {"kind": "progress", "id": request_id, "fraction": float(fraction), "message": message}


# ----------------------------------------------------------------------------------------------- encoding


def _wire_array(name: str, value: Any) -> tuple[str, np.ndarray]:
    if not isinstance(name, str) or not _ARRAY_NAME.match(name):
        raise ProtocolError(f"array name {name!r} is not 1-64 characters of [A-Za-z0-9_.] starting with a letter")
    arr = np.asarray(value)
    dtype_name = _NAME_OF.get((arr.dtype.kind, arr.dtype.itemsize))
    if dtype_name is None:
        raise ProtocolError(f"array {name!r}: dtype {arr.dtype} is not allowed (allowed: {', '.join(DTYPES)})")
    if arr.ndim > MAX_NDIM:
        raise ProtocolError(f"array {name!r}: {arr.ndim} dimensions, at most {MAX_NDIM} allowed")
    return dtype_name, np.asarray(arr, dtype=DTYPES[dtype_name], order="C")  # keeps 0-d shapes


def encode(header: dict[str, Any], arrays: dict[str, Any] | None = None) -> list[bytes | memoryview]:
    """Frame `header` (without "arrays") and `arrays`; returns buffers to write in order (arrays are not
    copied when already contiguous little-endian)."""
    if "arrays" in header:
        raise ProtocolError('the "arrays" header key is filled in by the codec')
    arrays = arrays or {}
    if len(arrays) > MAX_ARRAYS:
        raise ProtocolError(f"{len(arrays)} arrays in one frame, at most {MAX_ARRAYS} allowed")
    specs, offset = [], 0
    chunks: list[bytes | memoryview] = []
    for name, value in arrays.items():
        dtype_name, arr = _wire_array(name, value)
        pad = -offset % ALIGN
        if pad:
            chunks.append(bytes(pad))
            offset += pad
        specs.append({"name": name, "dtype": dtype_name, "shape": list(arr.shape), "offset": offset,
                      "nbytes": arr.nbytes})
        if arr.nbytes:
            chunks.append(arr.data.cast("B"))  # arr.data: memoryview(arr)
        offset += arr.nbytes
    full = dict(header, arrays=specs)
    _check_header(full)
    try:
        head = json.dumps(full, allow_nan=False, separators=(",", ":")).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"header is not plain JSON: {exc}") from None
    if len(head) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header is {len(head)} bytes, at most {MAX_HEADER_BYTES} allowed: send big data as arrays")
    if PREFIX.size + len(head) + offset > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame would be {PREFIX.size + len(head) + offset} bytes, at most {MAX_FRAME_BYTES} "
                            "allowed")
    return [PREFIX.pack(MAGIC, len(head), offset), head, *chunks]


def encode_bytes(header: dict[str, Any], arrays: dict[str, Any] | None = None) -> bytes:
    return b"".join(encode(header, arrays))


# ----------------------------------------------------------------------------------------------- decoding


def _read_exact(stream: IO[bytes], n: int, what: str) -> bytearray:
    """Read n bytes, growing the buffer with the bytes that actually arrived (at most twice as many), so a small
    frame that declares a huge length costs memory only for what it sends."""
    buf = bytearray(min(n, READ_CHUNK))
    got = 0
    while got < n:
        if got == len(buf):
            buf.extend(bytes(min(n, 2 * len(buf)) - len(buf)))
        with memoryview(buf) as view:
            k = stream.readinto(view[got:])  # type: ignore[attr-defined]
        if not k:
            raise ProtocolError(f"truncated frame: {what} has {got} of {n} bytes before end of stream", fatal=True)
        got += k
    return buf


def _skip(stream: IO[bytes], n: int, what: str) -> None:
    """Consume n bytes without keeping them (the payload of a refused frame), to stay in sync."""
    scratch = bytearray(min(n, READ_CHUNK))
    left = n
    with memoryview(scratch) as view:
        while left:
            k = stream.readinto(view[: min(left, len(scratch))])  # type: ignore[attr-defined]
            if not k:
                raise ProtocolError(f"truncated frame: {what} has {n - left} of {n} bytes before end of stream",
                                    fatal=True)
            left -= k


def read_prefix(stream: IO[bytes]) -> tuple[int, int] | None:
    """Header and payload lengths of the next frame; None at a clean end of stream (between frames)."""
    first = stream.read(1)
    if not first:
        return None
    raw = first + _read_exact(stream, PREFIX.size - 1, "frame prefix")
    return check_prefix(bytes(raw))


def check_prefix(raw: bytes) -> tuple[int, int]:
    magic, header_len, payload_len = PREFIX.unpack(raw)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r} (expected {MAGIC!r}): not an imhead frame or the stream is out "
                            "of sync", fatal=True)
    if not 2 <= header_len <= MAX_HEADER_BYTES:
        raise ProtocolError(f"header length {header_len} outside 2..{MAX_HEADER_BYTES}", fatal=True)
    if PREFIX.size + header_len + payload_len > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame length {PREFIX.size + header_len + payload_len} exceeds {MAX_FRAME_BYTES}",
                            fatal=True)
    return header_len, payload_len


def read_frame(stream: IO[bytes]) -> Message | None:
    """Read and validate one frame; None at a clean end of stream. Raises only ProtocolError (and the stream's
    own OSError): when not `fatal` the frame was consumed whole and the next frame can be read. The header is
    checked, array layout included, before any payload byte is stored."""
    lengths = read_prefix(stream)
    if lengths is None:
        return None
    header_len, payload_len = lengths
    head = _read_exact(stream, header_len, "header")
    try:
        header = parse_header(bytes(head), payload_len)
    except ProtocolError:
        _skip(stream, payload_len, "payload")
        raise
    payload = _read_exact(stream, payload_len, "payload")
    return Message(header, _decode_arrays(header, payload))


def decode(frame: bytes) -> Message:
    """Decode one complete frame held in memory (anything after it is an error)."""
    if len(frame) < PREFIX.size:
        raise ProtocolError(f"truncated frame: {len(frame)} bytes, the prefix alone is {PREFIX.size}", fatal=True)
    header_len, payload_len = check_prefix(bytes(frame[: PREFIX.size]))
    end = PREFIX.size + header_len + payload_len
    if len(frame) != end:
        raise ProtocolError(f"frame holds {len(frame)} bytes, its prefix says {end}", fatal=True)
    header = parse_header(bytes(frame[PREFIX.size : PREFIX.size + header_len]), payload_len)
    return Message(header, _decode_arrays(header, bytearray(frame[PREFIX.size + header_len :])))


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {_short(text)} is out of range")
    return value


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


def _json_depth(head: bytes) -> int:
    """Deepest nesting of [ and { outside strings, counted before json.loads recurses into it."""
    bare = np.frombuffer(_JSON_STRING.sub(b"", head), np.uint8)
    step = (np.isin(bare, _OPENERS).astype(np.int32) - np.isin(bare, _CLOSERS).astype(np.int32))
    return int(np.cumsum(step).max(initial=0))


_OPENERS = np.frombuffer(b"[{", np.uint8)
_CLOSERS = np.frombuffer(b"]}", np.uint8)


def parse_header(head: bytes, payload_len: int) -> dict[str, Any]:
    """The checked header of a frame whose payload has `payload_len` bytes (the arrays must fill it exactly)."""
    rid = None
    try:
        text = head.decode("utf-8")
        if _json_depth(head) > MAX_JSON_DEPTH:
            raise ProtocolError(f"header JSON nests deeper than {MAX_JSON_DEPTH} levels")
        header = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
        if not isinstance(header, dict):
            raise ProtocolError(f"header must be a JSON object, got {type(header).__name__}")
        rid = header.get("id")
        rid = rid if is_int(rid) and 0 <= rid <= MAX_ID else None
        _check_header(header)
        _check_layout(header["arrays"], payload_len)
    except ProtocolError as exc:
        exc.request_id = rid
        raise
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"header is not valid UTF-8 JSON: {exc}", request_id=rid) from None
    except Exception as exc:  # noqa: BLE001 - a gap in the checks must still leave a refused frame, not a crash
        raise ProtocolError(f"undecodable header ({DECODER_GAP} {type(exc).__name__}: {exc})",
                            request_id=rid) from None
    return header


def _check_layout(specs: list, payload_len: int) -> None:
    offset = 0
    for spec in specs:
        name = spec["name"]
        offset += -offset % ALIGN
        if spec["offset"] != offset:
            raise ProtocolError(f"array {name!r} starts at byte {spec['offset']}, expected {offset} (arrays are "
                                f"packed in header order, each aligned to {ALIGN} bytes)")
        offset += spec["nbytes"]
        if offset > payload_len:
            raise ProtocolError(f"array {name!r} ends at byte {offset}, past the {payload_len}-byte payload")
    if offset != payload_len:
        raise ProtocolError(f"payload has {payload_len} bytes, the arrays account for {offset}")


def _decode_arrays(header: dict[str, Any], payload: bytearray) -> dict[str, np.ndarray]:
    """Views of the payload for a header whose layout `_check_layout` accepted."""
    arrays: dict[str, np.ndarray] = {}
    for spec in header["arrays"]:
        name, dtype = spec["name"], DTYPES[spec["dtype"]]
        arr = np.frombuffer(payload, dtype=dtype, count=spec["nbytes"] // dtype.itemsize, offset=spec["offset"])
        if dtype.kind == "b" and arr.size and arr.view(np.uint8).max() > 1:
            raise ProtocolError(f"array {name!r}: bool bytes must be 0 or 1", request_id=header.get("id"))
        arrays[name] = arr.reshape(spec["shape"])
    return arrays


# ----------------------------------------------------------------------------------------------- validation


def is_int(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _short(v: Any, limit: int = 80) -> str:
    """repr of a (possibly huge) header value, cut for an error message."""
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_array_spec(spec: Any, seen: set[str]) -> None:
    if not isinstance(spec, dict) or set(spec) != {"name", "dtype", "shape", "offset", "nbytes"}:
        raise ProtocolError(f"array entry {_short(spec)} must have exactly name, dtype, shape, offset, nbytes")
    name = spec["name"]
    if not isinstance(name, str) or not _ARRAY_NAME.match(name):
        raise ProtocolError(f"array name {_short(name)} is not 1-64 characters of [A-Za-z0-9_.] starting with a "
                            "letter")
    if name in seen:
        raise ProtocolError(f"array name {name!r} appears twice")
    seen.add(name)
    if not isinstance(spec["dtype"], str) or spec["dtype"] not in DTYPES:
        raise ProtocolError(f"array {name!r}: unknown dtype {_short(spec['dtype'])} (allowed: {', '.join(DTYPES)})")
    shape = spec["shape"]
    if (not isinstance(shape, list) or len(shape) > MAX_NDIM
            or not all(is_int(d) and 0 <= d <= MAX_ELEMENTS for d in shape)):
        raise ProtocolError(f"array {name!r}: shape {_short(shape)} must be a list of at most {MAX_NDIM} "
                            f"non-negative integers up to {MAX_ELEMENTS}")
    if math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS:
        raise ProtocolError(f"array {name!r}: shape {shape} has more than {MAX_ELEMENTS} elements")
    for key in ("offset", "nbytes"):
        if not is_int(spec[key]) or not 0 <= spec[key] <= MAX_FRAME_BYTES:
            raise ProtocolError(f"array {name!r}: {key} {_short(spec[key])} is not an integer in "
                                f"0..{MAX_FRAME_BYTES}")
    expected = math.prod(shape) * DTYPES[spec["dtype"]].itemsize
    if spec["nbytes"] != expected:
        raise ProtocolError(f"array {name!r}: shape {shape} of {spec['dtype']} needs {expected} bytes, header "
                            f"says {spec['nbytes']}")


def _check_header(h: dict[str, Any]) -> None:
    kind = h.get("kind")
    if not isinstance(kind, str) or kind not in _KEYS:
        raise ProtocolError(f"unknown message kind {_short(kind)} (expected one of {', '.join(_KEYS)})")
    required, optional = _KEYS[kind]
    missing, unknown = required - set(h), set(h) - required - optional
    if missing or unknown:
        raise ProtocolError(f"{kind} header: missing {sorted(missing)}, unknown {sorted(unknown)}")
    rid = h["id"]
    if not (is_int(rid) and 0 <= rid <= MAX_ID) and not (kind == "reply" and rid is None):
        raise ProtocolError(f"{kind} id {_short(rid)} must be an integer in 0..2**53-1")
    specs = h["arrays"]
    if not isinstance(specs, list) or len(specs) > MAX_ARRAYS:
        raise ProtocolError(f'"arrays" must be a list of at most {MAX_ARRAYS} entries')
    seen: set[str] = set()
    for spec in specs:
        _check_array_spec(spec, seen)
    if kind == "request":
        if not isinstance(h["op"], str) or not _OP_NAME.match(h["op"]):
            raise ProtocolError(f"op {_short(h['op'])} must be a lower-case identifier")
        if not isinstance(h["params"], dict):
            raise ProtocolError("request params must be a JSON object")
    elif kind == "reply":
        _check_reply(h)
    else:
        f = h["fraction"]
        if not isinstance(f, (int, float)) or isinstance(f, bool) or not 0.0 <= f <= 1.0:
            raise ProtocolError(f"progress fraction {_short(f)} must be a number in [0, 1]")
        if not isinstance(h["message"], str):
            raise ProtocolError("progress message must be a string")


def _check_reply(h: dict[str, Any]) -> None:
    if h["ok"] is True:
        if "error" in h or not isinstance(h.get("params"), dict):
            raise ProtocolError("an ok reply carries params (a JSON object) and no error")
    elif h["ok"] is False:
        err = h.get("error")
        if ("params" in h or not isinstance(err, dict) or set(err) != {"code", "message"}
                or not all(isinstance(v, str) for v in err.values())):
            raise ProtocolError('an error reply carries error {"code": str, "message": str} and no params')
        if h["arrays"]:
            raise ProtocolError("an error reply carries no arrays")
    else:
        raise ProtocolError(f"reply ok must be true or false, got {_short(h['ok'])}")
