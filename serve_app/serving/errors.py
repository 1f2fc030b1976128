"""The service's own errors: an HTTP status plus an OpenAI error body (``schemas.error_body``)."""

from __future__ import annotations


class APIError(Exception):
    """An error with its HTTP status; rendered as an OpenAI error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type_, param, code, headers


def overloaded(exc: Exception) -> APIError:
    return APIError(503, f"the service is at capacity, retry shortly ({type(exc).__name__})", "overloaded_error",
                    code="overloaded", headers={"Retry-After": "1"})


def replica_failed(what: str, exc: Exception, retried: bool) -> APIError:
    again = "; it was retried once on another replica, which failed too" if retried else ""
    return APIError(503, f"the {what} replica serving this request failed ({type(exc).__name__}){again}. Nothing was "
                    "streamed; retry shortly (Serve is replacing the replica)", "server_error", code="replica_failed",
                    headers={"Retry-After": "1"})


def timed_out(limit: float) -> APIError:
    return APIError(504, f"the request did not finish within the service's {limit:g} s timeout; its generation was cancelled",
                    "timeout_error", code="request_timeout")


def generation_failed(request_id: str) -> APIError:
    """A generation failed inside the service: the client learns the request id, the log the details."""
    return APIError(500, f"generation failed (request {request_id}); the details are in the service's logs", "server_error",
                    code="generation_failed")
