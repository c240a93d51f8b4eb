"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Every refusal the server makes is an :class:`APIError`; the app turns it into that body with its
HTTP status (and, once a stream has started, into an error event). Messages name the culprit
(a field, a message index) and never a server path or a stack trace.
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An HTTP error the client should see as OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 for a request the server will not run."""
    return APIError(400, message, param=param, code=code)


def overloaded(message: str = "the server is at capacity; retry later") -> APIError:
    return APIError(503, message, type="server_error", code="server_overloaded")


def timed_out(seconds: float) -> APIError:
    return APIError(
        504, f"the request ran past the {seconds:g} s limit", type="server_error", code="timeout"
    )


def internal() -> APIError:
    return APIError(500, "internal server error", type="server_error", code="internal_error")
