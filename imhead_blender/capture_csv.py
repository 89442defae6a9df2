"""Live Link Face / ARKit face capture CSV: read (with errors naming line and column), resample, write.

Blender-free (numpy + csv). The layout, as Live Link Face writes it:

    Timecode,BlendShapeCount,EyeBlinkLeft,...,TongueOut,HeadYaw,HeadPitch,HeadRoll,LeftEyeYaw,...,RightEyeRoll

- column names are ARKit's in PascalCase and are matched case-insensitively, in any order; Timecode and the 52
  blendshape columns are required, BlendShapeCount (an integer, ignored), the three head and six eye rotation
  columns are optional (all three / all six);
- Timecode is HH:MM:SS:FF or HH:MM:SS:FF.fff (FF a frame number at the timecode rate, .fff a fraction of a
  frame); times must not go backwards;
- values are finite numbers; blendshape weights are ARKit's 0..1 (clamped to it on import), rotations radians.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass

import numpy as np

from .arkit import ARKIT_NAMES

HEAD_COLUMNS = ("HeadYaw", "HeadPitch", "HeadRoll")
EYE_COLUMNS = ("LeftEyeYaw", "LeftEyePitch", "LeftEyeRoll", "RightEyeYaw", "RightEyePitch", "RightEyeRoll")
TIMECODE_RATES = (24, 25, 30, 48, 50, 60, 120)  # candidates when the timecode rate is detected
MAX_BYTES = 256 * 1024 * 1024
_TIMECODE = re.compile(r"^(\d{1,2}):(\d{2}):(\d{2})[:;](\d{1,3})(\.\d+)?$")


def pascal(name: str) -> str:
    return name[0].upper() + name[1:]


class CaptureError(ValueError):
    """A malformed capture file; the message names the line (1-based) and column where it can."""

    def __init__(self, message: str, line: int | None = None, column: int | None = None, name: str = ""):
        where = []
        if line is not None:
            where.append(f"line {line}")
        if column is not None:
            where.append(f"column {column}" + (f" ({name})" if name else ""))
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
        self.line, self.column = line, column


@dataclass
class Capture:
    frames: np.ndarray       # (T,) timecode frame positions (FF + fraction, plus whole seconds x rate)
    seconds: np.ndarray      # (T,) seconds from the first row, at `rate`
    weights: np.ndarray      # (T,52) ARKit weights in ARKIT_NAMES order, clamped to [0, 1]
    head: np.ndarray | None  # (T,3) yaw, pitch, roll in radians
    eyes: np.ndarray | None  # (T,6) left yaw, pitch, roll, right yaw, pitch, roll in radians
    rate: float              # timecode frames per second

    @property
    def duration(self) -> float:
        return float(self.seconds[-1]) if len(self.seconds) else 0.0


def _decode(data: bytes) -> str:
    if not data.strip():
        raise CaptureError("the file is empty")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise CaptureError(f"not UTF-8 text (byte 0x{data[exc.start]:02x}); save the CSV as UTF-8",
                           line, column) from None


def _timecode(text: str, line: int) -> tuple[int, float]:
    """(whole seconds, frame position within the second) of one timecode."""
    m = _TIMECODE.match(text.strip())
    if m is None:
        raise CaptureError(f"timecode {text!r} is not HH:MM:SS:FF or HH:MM:SS:FF.fff", line, 1, "Timecode")
    h, mi, s, ff = (int(g) for g in m.groups()[:4])
    if mi >= 60 or s >= 60:
        raise CaptureError(f"timecode {text!r} has minutes or seconds over 59", line, 1, "Timecode")
    return h * 3600 + mi * 60 + s, ff + (float(m.group(5)) if m.group(5) else 0.0)


def parse(data: bytes, rate: float = 0.0, short_rate: float = 0.0) -> Capture:
    """Read a capture file's bytes. `rate`: timecode frames per second; 0 detects it as the smallest of
    TIMECODE_RATES above every frame number seen, or `short_rate` (e.g. the scene's fps) when the capture
    stays within one second and its frame numbers fit below it. Raises CaptureError."""
    if len(data) > MAX_BYTES:
        raise CaptureError(f"the file is larger than {MAX_BYTES // (1024 * 1024)} MB")
    rows = csv.reader(io.StringIO(_decode(data), newline=""))
    try:
        header = next(rows)
    except StopIteration:
        raise CaptureError("the file is empty") from None
    except csv.Error as exc:
        raise CaptureError(f"not a CSV file ({exc})", 1) from None
    columns = {name.strip().lower(): i for i, name in enumerate(header)}
    if len(columns) != len(header):
        raise CaptureError("a column name appears twice", 1)
    if "timecode" not in columns:
        raise CaptureError("no 'Timecode' column; is this a Live Link Face CSV?", 1)
    missing = [pascal(n) for n in ARKIT_NAMES if n.lower() not in columns]
    if missing:
        raise CaptureError(f"missing blendshape column(s): {', '.join(missing)}", 1)
    optional = {}
    for group in (HEAD_COLUMNS, EYE_COLUMNS):
        present = [n for n in group if n.lower() in columns]
        if present and len(present) != len(group):
            absent = [n for n in group if n.lower() not in columns]
            raise CaptureError(f"has {', '.join(present)} but not {', '.join(absent)}", 1)
        optional[group] = bool(present)
    value_columns = [columns[n.lower()] for n in ARKIT_NAMES]
    value_columns += [columns[n.lower()] for g in (HEAD_COLUMNS, EYE_COLUMNS) if optional[g] for n in g]
    count_column = columns.get("blendshapecount")

    seconds, frames, values = [], [], []
    line = 1
    try:
        for row in rows:
            line = rows.line_num
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise CaptureError(f"{len(row)} fields, the header has {len(header)}", line)
            sec, frame = _timecode(row[columns["timecode"]], line)
            if count_column is not None and not row[count_column].strip().isdigit():
                raise CaptureError(f"{row[count_column]!r} is not a whole number", line, count_column + 1,
                                   header[count_column])
            out = []
            for c in value_columns:
                try:
                    v = float(row[c])
                except ValueError:
                    raise CaptureError(f"{row[c]!r} is not a number", line, c + 1, header[c].strip()) from None
                if not math.isfinite(v):
                    raise CaptureError(f"{row[c]!r} is not a finite number", line, c + 1, header[c].strip())
                out.append(v)
            seconds.append(sec)
            frames.append(frame)
            values.append(out)
    except csv.Error as exc:
        raise CaptureError(f"malformed CSV ({exc})", rows.line_num) from None
    if not values:
        raise CaptureError("no data rows under the header", 1)
    if rate <= 0.0:
        top = max(frames)
        rate = float(next((r for r in TIMECODE_RATES if r > top), 0))
        if len(set(seconds)) == 1 and short_rate > top:
            rate = float(short_rate)
        if rate == 0.0:
            raise CaptureError(f"timecode frame numbers up to {top:.0f}: give the timecode rate")
    elif max(frames) >= rate:
        raise CaptureError(f"timecode frame {max(frames):.3f} is not below the timecode rate {rate:g}")
    whole = np.asarray(seconds, dtype=np.float64)
    position = (whole - whole[0]) * rate + np.asarray(frames, dtype=np.float64)
    steps = np.diff(position)
    if (steps < 0).any():
        bad = int(np.flatnonzero(steps < 0)[0]) + 1
        raise CaptureError("the timecode goes back in time", _data_line(data, bad), 1, "Timecode")
    table = np.asarray(values, dtype=np.float64)
    n = len(ARKIT_NAMES)
    head = table[:, n:n + 3] if optional[HEAD_COLUMNS] else None
    eyes = table[:, n + (3 if head is not None else 0):] if optional[EYE_COLUMNS] else None
    return Capture(frames=position, seconds=(position - position[0]) / rate,
                   weights=np.clip(table[:, :n], 0.0, 1.0).astype(np.float32), head=head, eyes=eyes, rate=rate)


def _data_line(data: bytes, index: int) -> int:
    """The file line of the index-th data row (0-based), for errors found after reading."""
    text = _decode(data)
    rows = csv.reader(io.StringIO(text, newline=""))
    next(rows)
    k = -1
    for row in rows:
        if row and any(c.strip() for c in row):
            k += 1
            if k == index:
                return rows.line_num
    return rows.line_num


def resample(capture: Capture, fps: float) -> tuple[np.ndarray, dict[str, np.ndarray | None]]:
    """The capture at `fps` (the scene's rate), linearly interpolated: (frame offsets 0..F-1, arrays with
    'weights' (F,52), 'head' (F,3) or None, 'eyes' (F,6) or None)."""
    if fps <= 0:
        raise ValueError("fps must be positive")
    count = int(math.floor(capture.duration * fps + 1e-6)) + 1
    t = np.arange(count) / fps

    def at(values: np.ndarray | None) -> np.ndarray | None:
        if values is None:
            return None
        return np.stack([np.interp(t, capture.seconds, values[:, j]) for j in range(values.shape[1])], axis=1)

    return np.arange(count), {"weights": at(capture.weights).astype(np.float32), "head": at(capture.head),
                              "eyes": at(capture.eyes)}


def timecode(frame: int, fps: float) -> str:
    """Frame index from 0 at `fps` -> HH:MM:SS:FF.fff (integer timecode rate round(fps))."""
    rate = max(1, round(fps))
    seconds, rest = divmod(frame / fps, 1.0)
    ff = rest * rate
    whole = int(seconds)
    return f"{whole // 3600:02d}:{whole // 60 % 60:02d}:{whole % 60:02d}:{ff:06.3f}"


def write(weights: np.ndarray, fps: float, head: np.ndarray | None = None) -> str:
    """CSV text in Live Link Face's layout: one row per frame at `fps`, weights (F,52), head (F,3) radians
    (zeros when None), eye rotations zero."""
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 2 or weights.shape[1] != len(ARKIT_NAMES):
        raise ValueError(f"weights must be (F,{len(ARKIT_NAMES)}), got {weights.shape}")
    head = np.zeros((len(weights), 3)) if head is None else np.asarray(head, dtype=np.float64)
    out = io.StringIO(newline="")
    w = csv.writer(out, lineterminator="\n")
    rotation_columns = HEAD_COLUMNS + EYE_COLUMNS
    w.writerow(["Timecode", "BlendShapeCount", *(pascal(n) for n in ARKIT_NAMES), *rotation_columns])
    count = len(ARKIT_NAMES) + len(rotation_columns)
    for f in range(len(weights)):
        values = [*weights[f], *head[f], *([0.0] * len(EYE_COLUMNS))]
        w.writerow([timecode(f, fps), count, *(f"{v:.6g}" for v in values)])
    return out.getvalue()
