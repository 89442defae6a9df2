"""Read a safetensors file with numpy alone (the add-on has no safetensors package): an 8-byte little-endian
header length, a JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {...}}, then raw bytes.
The file's SHA-256 side file (`<name>.sha256`, written with every shipped file) is checked first."""

import hashlib
import json
from pathlib import Path

import numpy as np

_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I32": np.int32, "I64": np.int64,
           "U8": np.uint8, "I8": np.int8, "I16": np.int16, "BOOL": np.bool_}
MAX_HEADER = 100 * 1024 * 1024


def read(path: Path, names: set[str] | None = None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(arrays, metadata) of the file; `names` limits which arrays are copied out. Raises ValueError."""
    data = Path(path).read_bytes()
    side = Path(str(path) + ".sha256")
    if side.is_file():
        expected = (side.read_text().split() or [""])[0].lower()
        if hashlib.sha256(data).hexdigest() != expected:
            raise ValueError(f"{path} does not match its SHA-256 in {side.name}")
    if len(data) < 8:
        raise ValueError(f"{path} is too short for a safetensors file")
    n = int.from_bytes(data[:8], "little")
    if not 2 <= n <= min(MAX_HEADER, len(data) - 8):
        raise ValueError(f"{path}: bad safetensors header length {n}")
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", {}) or {}
    body = memoryview(data)[8 + n:]
    arrays = {}
    for name, info in header.items():
        if names is not None and name not in names:
            continue
        dtype = _DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise ValueError(f"{path}: array {name!r} has unsupported dtype {info.get('dtype')!r}")
        start, end = (int(v) for v in info["data_offsets"])
        shape = tuple(int(s) for s in info["shape"])
        if not 0 <= start <= end <= len(body) or end - start != int(np.prod(shape)) * np.dtype(dtype).itemsize:
            raise ValueError(f"{path}: array {name!r} has inconsistent offsets")
        arrays[name] = np.frombuffer(body[start:end], dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape).copy()
    return arrays, {str(k): str(v) for k, v in meta.items()}
