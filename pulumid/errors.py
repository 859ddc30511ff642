"""The one error type of pulumid: every layer raises it, the API maps it to HTTP in one place."""

from __future__ import annotations


class PulumidError(Exception):
    """A failure a client can act on: an HTTP status and a message safe to show."""

    status = 500
    reason = "Internal Server Error"

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
        self.message = message

    def body(self) -> dict[str, object]:
        return {"code": self.status, "message": self.message}


class BadRequest(PulumidError):
    status = 400


class Unauthorized(PulumidError):
    status = 401


class Forbidden(PulumidError):
    status = 403


class NotFound(PulumidError):
    status = 404


class Conflict(PulumidError):
    status = 409


class Stale(Conflict):
    """A conditional write found that another writer (another node) got there first."""


class TooLarge(PulumidError):
    status = 413


class Unavailable(PulumidError):
    """The server could not do it now (storage failed); the same request may succeed later."""

    status = 503


class ShuttingDown(Unavailable):
    """The daemon is stopping: its thread pools take no more work, so retrying is pointless."""
