"""Errors that cross the process boundary as plain data (code + message), never as pickled objects."""


class BackendError(Exception):
    """An error the client should show to the user. `code` is stable and machine-readable."""

    code = "backend_error"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": str(self)}


class InvalidInput(BackendError):
    code = "invalid_input"


class WeightsError(BackendError):
    code = "weights_error"


class Cancelled(BackendError):
    code = "cancelled"

    def __init__(self, message: str = "cancelled by the user"):
        super().__init__(message)
