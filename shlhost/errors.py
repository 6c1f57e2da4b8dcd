"""Domain exceptions. They know nothing of Flask; ``shlhost.api.errors`` maps them to HTTP."""

from __future__ import annotations

from typing import Any


class ShlhostError(Exception):
    """Base of every error a client may see. ``code`` is a stable machine-readable word."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, code: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        self.extra = extra


class BadRequest(ShlhostError):
    status = 400
    code = "bad_request"


class Unauthorized(ShlhostError):
    status = 401
    code = "unauthorized"


class Forbidden(ShlhostError):
    status = 403
    code = "forbidden"


class NotFound(ShlhostError):
    status = 404
    code = "not_found"


class Conflict(ShlhostError):
    status = 409
    code = "conflict"


class PreconditionFailed(ShlhostError):
    status = 412
    code = "precondition_failed"


class PayloadTooLarge(ShlhostError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(ShlhostError):
    status = 415
    code = "unsupported_media_type"


class Unprocessable(ShlhostError):
    status = 422
    code = "unprocessable"


class DeadLink(NotFound):
    """Unknown, expired, paused, revoked, used up or locked: one answer for all."""

    code = "not_found"

    def __init__(self) -> None:
        super().__init__("No such link, or it is no longer available.")


class WrongPasscode(Unauthorized):
    code = "wrong_passcode"

    def __init__(self, remaining: int) -> None:
        super().__init__("Wrong passcode.")
        self.remaining = remaining


class DecryptionError(ShlhostError):
    status = 422
    code = "decryption_failed"
