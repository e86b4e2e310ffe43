"""The ONE place typed exceptions become HTTP statuses and each dialect's error body.

Statuses come from a table keyed by exception type (most specific first), never
from message text. The body follows the dialect of the route that failed, so
each client library parses our errors as its own server's:
  OpenAI     {"error": {"message", "type", "code"}}
  Ollama     {"error": "message"}
  llama.cpp  {"error": {"code", "message", "type"}}   (also /control and /metrics)
"""
from __future__ import annotations

import enum
import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from app.pull import errors as pull_errors
from engines import errors as engine_errors
from engines.remote.errors import RemoteUnavailable
from kvcached import errors as kv_errors

log = logging.getLogger(__name__)


class Dialect(enum.Enum):
    OPENAI = "openai"
    OLLAMA = "ollama"
    LLAMACPP = "llamacpp"


class Unauthorized(Exception):
    """The control API was called without a valid token."""


class BadRequest(Exception):
    """The HTTP layer itself found the request unusable (a value out of range...)."""


# (exception type, HTTP status, OpenAI/llama.cpp error type); first match wins.
STATUS_TABLE: tuple[tuple[type[BaseException], int, str], ...] = (
    (Unauthorized, 401, "authentication_error"),
    (BadRequest, 400, "invalid_request_error"),
    (engine_errors.ModelNotFound, 404, "not_found_error"),
    (pull_errors.BadModelName, 400, "invalid_request_error"),
    (pull_errors.NothingToPull, 404, "not_found_error"),
    (pull_errors.NotOurs, 403, "permission_error"),
    (pull_errors.NotEnoughDisk, 507, "insufficient_storage"),
    (pull_errors.ChecksumMismatch, 502, "upstream_error"),
    (pull_errors.HubUnavailable, 502, "upstream_error"),
    (pull_errors.PullCancelled, 499, "cancelled"),
    (engine_errors.InvalidRequest, 400, "invalid_request_error"),
    (engine_errors.EngineBusy, 503, "unavailable_error"),
    # Out of GPU memory in a load or a step, a load past its deadline: temporary,
    # so 503 with Retry-After, never a 500 (issue 15).
    (engine_errors.OutOfMemory, 503, "unavailable_error"),
    (engine_errors.LoadTimeout, 503, "unavailable_error"),
    (RemoteUnavailable, 502, "upstream_error"),
    (engine_errors.ModelLoadError, 500, "server_error"),
    (kv_errors.TemporaryError, 503, "unavailable_error"),
    # A model larger than the memory budget could ever hold (issue 19): refused before
    # anything is allocated; the message names the budget to raise.
    (kv_errors.DoesNotFit, 507, "insufficient_storage"),
    (kv_errors.ConfigError, 500, "server_error"),
    (kv_errors.KvcachedError, 500, "server_error"),
)

RETRY_AFTER_S = 1

# Path prefix -> dialect; the longest prefix that matches wins.
DIALECT_PREFIXES: tuple[tuple[str, Dialect], ...] = (
    ("/v1/", Dialect.OPENAI),
    ("/api/", Dialect.OLLAMA),
)


def dialect_of(path: str) -> Dialect:
    for prefix, dialect in DIALECT_PREFIXES:
        if path.startswith(prefix):
            return dialect
    return Dialect.LLAMACPP


def classify(exc: BaseException) -> tuple[int, str]:
    """HTTP status and error type for an exception; unknown ones are server errors."""
    for exc_type, status, kind in STATUS_TABLE:
        if isinstance(exc, exc_type):
            return status, kind
    return 500, "server_error"


def error_body(dialect: Dialect, status: int, kind: str, message: str) -> dict:
    """The error JSON in the dialect's own shape."""
    shapes = {
        Dialect.OPENAI: lambda: {"error": {"message": message, "type": kind, "param": None, "code": status}},
        Dialect.OLLAMA: lambda: {"error": message},
        Dialect.LLAMACPP: lambda: {"error": {"code": status, "message": message, "type": kind}},
    }
    return shapes[dialect]()


def error_for(exc: BaseException, dialect: Dialect) -> tuple[int, dict]:
    """Status and body for an exception: used by handlers and by streams that fail midway."""
    status, kind = classify(exc)
    message = str(exc) or type(exc).__name__
    if status == 500:  # our fault: keep the traceback
        log.error("%s: %s", type(exc).__name__, message, exc_info=exc)
    elif status > 500:  # temporary (busy, reclaiming): expected under load
        log.warning("%s: %s", type(exc).__name__, message)
    return status, error_body(dialect, status, kind, message)


def stream_error_line(exc: BaseException, dialect: Dialect) -> bytes:
    """The error as one line in a stream already under way (Ollama: an {"error":...} line)."""
    _, body = error_for(exc, dialect)
    return json.dumps(body).encode()


def _validation_message(exc: RequestValidationError) -> str:
    problems = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            return f"malformed JSON body: {err.get('msg', '')}"
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        problems.append(f"{where or 'body'}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(problems[:5])


# Request models are strict (pydantic strict=True): "stream": "yes" or "n_predict": "5" is a
# field of the wrong type, refused with its name, never coerced into a guess.
# One status per kind of bad input, on every route: a body that is not what the route takes
# (malformed JSON, a missing field, a field of the wrong type) is 400, as OpenAI, Ollama and
# llama.cpp's server all answer; FastAPI's own 422 is never sent.
VALIDATION_STATUS = 400


def install(app: FastAPI) -> None:
    """Registers the handlers on the app: the only exception-to-HTTP mapping there is."""

    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        dialect = dialect_of(request.url.path)
        message = _validation_message(exc)
        return JSONResponse(error_body(dialect, VALIDATION_STATUS, "invalid_request_error", message),
                            status_code=VALIDATION_STATUS)

    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        dialect = dialect_of(request.url.path)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        body = error_body(dialect, exc.status_code, kind, str(exc.detail))
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        status, body = error_for(exc, dialect_of(request.url.path))
        # Temporary conditions (a full queue, a reclaim under way): tell clients when to retry.
        headers = {"Retry-After": str(RETRY_AFTER_S)} if isinstance(exc, kv_errors.TemporaryError) else None
        return JSONResponse(body, status_code=status, headers=headers)

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    for exc_type, _, _ in STATUS_TABLE:
        app.add_exception_handler(exc_type, on_error)
    app.add_exception_handler(Exception, on_error)
