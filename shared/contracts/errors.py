"""Errors that travel as data: named codes, shared by every reply on the bus."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict


class ErrorCode(StrEnum):
    BAD_REQUEST = "bad_request"
    UNKNOWN_TYPE = "unknown_type"
    NOT_FOUND = "not_found"
    EXPIRED = "expired"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class ErrorInfo(BaseModel):
    model_config = ConfigDict(extra="ignore")

    code: ErrorCode
    message: str


class DeadLetterReason(StrEnum):
    """Why a message was dead-lettered (finer than the reply's error code)."""

    INVALID_JSON = "invalid_json"
    INVALID = "invalid"
    TOO_LARGE = "too_large"
    UNKNOWN_TYPE = "unknown_type"
    MAX_RETRIES = "max_retries"
    HANDLER_ERROR = "handler_error"

    @property
    def code(self) -> ErrorCode:
        if self is DeadLetterReason.UNKNOWN_TYPE:
            return ErrorCode.UNKNOWN_TYPE
        if self in (DeadLetterReason.MAX_RETRIES, DeadLetterReason.HANDLER_ERROR):
            return ErrorCode.INTERNAL
        return ErrorCode.BAD_REQUEST


class MeshError(Exception):
    """The one error type of the mesh: a wire code and a message safe to send back. Raised anywhere in a handler;
    mapped to the wire in one place each: the request server answers with it (shared/runtime/requests.py), the
    stream consumer dead-letters the entry at once with ``reason`` (shared/runtime/streams.py): the same message
    fails the same way every time, so it is never retried. Anything else a handler raises is a passing failure
    (shared/runtime/errors.py) or ``internal``."""

    code: ErrorCode = ErrorCode.INTERNAL
    reason: DeadLetterReason = DeadLetterReason.HANDLER_ERROR

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def info(self) -> ErrorInfo:
        return ErrorInfo(code=self.code, message=self.message)


class BadRequest(MeshError):
    """The request or message cannot be served as it is (a limit, a conflict, another user's id)."""

    code = ErrorCode.BAD_REQUEST
    reason = DeadLetterReason.INVALID


class NotFound(MeshError):
    """Nothing of that id for this user (another user's data looks exactly like missing data)."""

    code = ErrorCode.NOT_FOUND
    reason = DeadLetterReason.INVALID


class Unsupported(MeshError):
    """This service or backend has no such operation."""

    code = ErrorCode.UNKNOWN_TYPE
    reason = DeadLetterReason.UNKNOWN_TYPE


class DecodeError(MeshError):
    """Bad input, turned into data: a reason, a safe message, and the request id if one was readable."""

    def __init__(self, reason: DeadLetterReason, message: str, request_id: str | None = None,
                 reply_to: str | None = None, user_id: str | None = None) -> None:
        super().__init__(message, reason.code)
        self.reason = reason
        self.request_id = request_id
        self.reply_to = reply_to
        self.user_id = user_id
