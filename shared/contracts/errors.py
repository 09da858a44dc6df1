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


class DecodeError(Exception):
    """Bad input, turned into data: a reason, a safe message, and the request id if one was readable."""

    def __init__(self, reason: DeadLetterReason, message: str, request_id: str | None = None,
                 reply_to: str | None = None, user_id: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.request_id = request_id
        self.reply_to = reply_to
        self.user_id = user_id

    @property
    def code(self) -> ErrorCode:
        return self.reason.code

    def info(self) -> ErrorInfo:
        return ErrorInfo(code=self.code, message=self.message)
