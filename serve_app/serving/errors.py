"""The service's own errors: an HTTP status plus an OpenAI error body (``schemas.error_body``)."""

from __future__ import annotations


class APIError(Exception):
    """An error with its HTTP status; rendered as an OpenAI error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type_, param, code, headers
