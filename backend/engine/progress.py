"""Progress reporting and cancellation as the engine's operations see them (the server's job or the CLI)."""

from __future__ import annotations

from typing import Protocol

from .. import errors


class Progress(Protocol):
    def report(self, fraction: float, message: str) -> None: ...

    @property
    def cancelled(self) -> bool: ...


class NullProgress:
    cancelled = False

    def report(self, fraction: float, message: str) -> None:
        pass


class OffsetProgress:
    """A Progress that maps [0, 1] onto [start, start + span] of another."""

    def __init__(self, inner: Progress, start: float, span: float):
        self.inner, self.start, self.span = inner, start, span

    def report(self, fraction: float, message: str) -> None:
        self.inner.report(self.start + self.span * fraction, message)

    @property
    def cancelled(self) -> bool:
        return self.inner.cancelled


def check_cancel(progress: Progress) -> None:
    if progress.cancelled:
        raise errors.Cancelled()
