"""The HTTP surface without Ray: the FastAPI app with OpenAI-style error handling and its ``Guard``
(API keys, body-size limit). Response bodies are built in ``serving.responses``;
``deployments/router.py`` adds the routes."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app.config import AppConfig
from serve_app.serving.errors import APIError
from serve_app.serving.schemas import error_body


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(error_body(err.message, err.type, err.param, err.code), status_code=err.status, headers=err.headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    return (f"{param}: {msg}" if param else msg), param


# ------------------------------------------------------------------------------ the request guard

OPEN_PATHS = frozenset({"/health"})
"""Routes that answer without an API key (load balancers and Kubernetes probes call them)."""

logger = logging.getLogger("kvswitch.api")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


@dataclass
class GuardSettings:
    """What the guard enforces; the router replica fills it from ``AppConfig`` when it starts.
    Keys are kept only as SHA-256 digests, so a presented key is compared in constant time
    (``hmac.compare_digest`` on equal-length digests, against every configured key)."""

    max_body_bytes: int = 1 << 20
    key_digests: tuple[bytes, ...] = field(default=(), repr=False)
    on_error: Callable[[int], None] | None = field(default=None, repr=False)
    """Called with the status of every error response (the router counts them in a metric)."""

    def count_error(self, status: int) -> None:
        if self.on_error is not None:
            try:
                self.on_error(status)
            except Exception:  # noqa: BLE001 — a metric must never fail a response
                logger.debug("error metric failed", exc_info=True)

    def set_keys(self, keys: Iterable[str]) -> None:
        self.key_digests = tuple(_digest(k) for k in keys if k)

    @property
    def auth_enabled(self) -> bool:
        return bool(self.key_digests)

    def authorized(self, presented: str | None) -> bool:
        if not presented:
            return False
        got, ok = _digest(presented), False
        for want in self.key_digests:  # no early exit: the time taken does not say which key matched
            ok |= hmac.compare_digest(got, want)
        return ok


def _header(scope: dict, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


def _bearer(scope: dict) -> str | None:
    value = _header(scope, b"authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


async def _send_error(settings: GuardSettings, send, status: int, message: str, type_: str, code: str,
                      headers: dict[str, str] | None = None) -> None:
    settings.count_error(status)
    body = json.dumps(error_body(message, type_, None, code)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware in front of every route: the optional API key (401) and the body-size limit
    (413), both answered before any JSON is parsed. Keys are never logged."""

    def __init__(self, app, settings: GuardSettings):
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        s = self.settings
        root, path = scope.get("root_path", ""), scope.get("path", "")
        route = path[len(root):] if root and path.startswith(root) else path
        if s.auth_enabled and route not in OPEN_PATHS and not s.authorized(_bearer(scope)):
            return await _send_error(s, send, 401, "missing or invalid API key: send `Authorization: Bearer <key>`",
                                     "authentication_error", "invalid_api_key", {"WWW-Authenticate": "Bearer"})
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit = s.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _send_error(s, send, 413, f"request body of {declared} bytes exceeds the limit of {limit} bytes",
                                     "invalid_request_error", "request_too_large")
        chunks, size, more = [], 0, True
        while more:  # read (at most limit + one chunk of) the body, then replay it to the app
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk_ = message.get("body", b"")
            size += len(chunk_)
            if size > limit:
                return await _send_error(s, send, 413, f"request body exceeds the limit of {limit} bytes", "invalid_request_error",
                                         "request_too_large")
            chunks.append(chunk_)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls wait for the client's disconnect, as before

        return await self.app(scope, replay, send)


_STATUS_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 405: "invalid_request_error",
                 408: "timeout_error", 413: "invalid_request_error", 429: "rate_limit_error"}


def create_app() -> FastAPI:
    """The FastAPI app with OpenAI-style JSON errors for every failure (validation, unknown route,
    unparsable or too deeply nested JSON, and, should one escape, an internal error), behind
    ``Guard``; its settings are at ``app.state.guard``."""
    app = FastAPI(title="kvswitch", description="OpenAI-compatible LLM service with KV-cache fast/slow routing", version="0.1.0")
    app.state.guard = GuardSettings()
    app.add_middleware(Guard, settings=app.state.guard)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if detail == "There was an error parsing the body":
            detail = "request body is not valid JSON (or is nested too deeply)"
        type_ = _STATUS_TYPES.get(exc.status_code, "invalid_request_error" if exc.status_code < 500 else "server_error")
        app.state.guard.count_error(exc.status_code)
        return JSONResponse(error_body(detail, type_), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        app.state.guard.count_error(500)
        return JSONResponse(error_body(f"internal error ({type(exc).__name__}); the request was not completed", "server_error"),
                            status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        app.state.guard.count_error(400)
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        app.state.guard.count_error(exc.status)
        return error_response(exc)

    return app


# ----------------------------------------------------------------------------- API keys, exposure

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def api_keys(cfg: AppConfig) -> list[str]:
    """The configured keys plus the comma-separated keys in ``$<auth.api_keys_env>`` (read here, in
    the router replica, so keys can stay out of config files)."""
    keys = [k.get_secret_value() for k in cfg.auth.api_keys]
    keys += [k.strip() for k in os.environ.get(cfg.auth.api_keys_env, "").split(",") if k.strip()]
    return keys


def check_exposure(cfg: AppConfig, auth_enabled: bool, host: str | None) -> None:
    """Refuse to serve without API keys on a non-loopback interface (unless explicitly allowed).
    Fails closed: a host that could not be determined (``None``) counts as exposed."""
    if auth_enabled or cfg.auth.allow_unauthenticated_remote or (host is not None and host in LOOPBACK):
        return
    if host is None:
        raise RuntimeError("could not determine the interface Serve's HTTP proxy listens on, and no API key is configured: "
                           f"set ${cfg.auth.api_keys_env} (or auth.api_keys), or, if the service is only reachable from a "
                           "trusted network, set auth.allow_unauthenticated_remote: true")
    raise RuntimeError(f"Serve's HTTP proxy listens on {host!r} but no API key is configured: set ${cfg.auth.api_keys_env} "
                       "(or auth.api_keys), bind http_options.host to 127.0.0.1, or set auth.allow_unauthenticated_remote: true")
