"""The client's request outcomes (client.py): `Future`, `BackendFailure`, and the checks a reply passes before
it settles its future. bpy-free, numpy only."""

from __future__ import annotations

from functools import partial
from typing import Callable, TypeAlias

import numpy as np

from .backend_modules import errors, replies, wire


class BackendFailure(Exception):
    """An error reply from the backend, or the backend died, timed out or is not running."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"BackendFailure({self.code!r}, {self.message!r})"


Handshake: TypeAlias = replies.HandshakeReply  # the handshake reply's fields; `info` holds every key sent


class Future:
    """One request's outcome. State changes only inside `pump()` (or `shutdown()`), on the caller's thread."""

    def __init__(self, request_id: int, op: str, deadline: float):
        self.request_id = request_id
        self.op = op
        self.progress = 0.0
        self.message = ""
        self._deadline = deadline
        self._outcome: tuple[dict, dict[str, np.ndarray]] | None = None
        self._failure: BackendFailure | None = None
        self._callbacks: list[Callable[[Future], None]] = []

    def done(self) -> bool:
        return self._outcome is not None or self._failure is not None

    def result(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(params, arrays) of the reply. Never blocks: raises BackendFailure("not_done") if not done."""
        if self._failure is not None:
            raise self._failure
        if self._outcome is None:
            raise BackendFailure("not_done", f"request {self.request_id} ({self.op}) has not finished; pump() "
                                             "until done() is true")
        return self._outcome

    def add_done_callback(self, fn: Callable[[Future], None]) -> None:
        """`fn(future)` runs inside the pump() that finishes it, or at once if it is already done."""
        if self.done():
            fn(self)
        else:
            self._callbacks.append(fn)

    def _settle(self, outcome=None, failure: BackendFailure | None = None) -> list[Callable[[], None]]:
        """Record the outcome; returns the callbacks to run (after all state is consistent)."""
        if self.done():
            return []
        self._outcome, self._failure = outcome, failure
        if outcome is not None:
            self.progress = 1.0
        callbacks, self._callbacks = self._callbacks, []
        return [partial(fn, self) for fn in callbacks]


def check_reply(op: str, params: dict, arrays: dict[str, np.ndarray]) -> BackendFailure | None:
    """A reply without the fields its op promises (backend/replies.py) fails its request, not the callback."""
    kind = replies.REPLIES.get(op)
    try:
        if kind is not None:
            kind.from_dict(params, arrays)
    except errors.InvalidInput as exc:
        return BackendFailure("protocol_error", f"the backend's {op} reply is malformed: {exc}")
    return None


def parse_handshake(p: dict) -> Handshake:
    if p.get("protocol") != wire.PROTOCOL_VERSION:
        raise BackendFailure("protocol_mismatch", f"the backend speaks protocol {p.get('protocol')!r}, this add-on "
                                                  f"speaks {wire.PROTOCOL_VERSION}")
    try:
        return replies.HandshakeReply.from_dict(p)
    except errors.InvalidInput as exc:
        raise BackendFailure("protocol_error", str(exc)) from None
