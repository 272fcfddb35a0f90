"""How the decision endpoint says no: one JSON shape for every error, and the handlers that produce it.

Every error a client sees is ``{"error", "detail", "fields"}`` with a 4xx or
5xx status: ``ApiError`` raised by a route, a body that fails its model
(422, with ``validation_detail`` saying per field what to send instead), a key
refused by ``serve.auth`` (401/403/429), an actor that died under the request
(503 with ``Retry-After``), and anything unexpected (a JSON 500, never a
plain-text one). ``install_error_handlers`` registers them on the app.

Not here: deciding *whether* a request is refused (the routes, ``serve.auth``,
``serve.gate``).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayActorError
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.logs import get_logger
from serve.auth import AuthError

log = get_logger("serve")


class ApiError(Exception):
    """A refusal a route raises: its status, a short ``error``, a ``detail`` that says what to fix."""

    def __init__(self, status: int, error: str, detail: str, fields: list[str] | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.error, self.detail, self.fields, self.headers = status, error, detail, fields or [], headers


def error_response(status: int, error: str, detail: str, fields: list[str] | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail, "fields": fields or []}, status_code=status, headers=headers)


def auth_error_response(e: AuthError) -> JSONResponse:
    return error_response(e.status, e.error, e.message, headers=e.headers())


_STRICT_TYPE = {
    "float_type": "must be a JSON number such as 10 or 10.5",
    "int_type": "must be a JSON whole number such as 3",
    "bool_type": "must be a JSON boolean, true or false",
}


def _json_kind(v: Any) -> str:
    if isinstance(v, bool):
        return f"the boolean {json.dumps(v)}"
    if isinstance(v, str):
        return f"the string {json.dumps(v[:40])}"
    if isinstance(v, (int, float)):
        return f"the number {v!r}"
    return "null" if v is None else f"a JSON {'array' if isinstance(v, list) else 'object'}"


def validation_detail(exc: RequestValidationError | ValidationError) -> tuple[str, list[str]]:
    """The first ten validation errors as one message (``field: what to send``) and the fields they name."""
    parts, fields = [], []
    for e in exc.errors()[:10]:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        msg = e.get("msg", "invalid")
        if e.get("type") == "json_invalid":
            ctx = e.get("ctx", {}).get("error", "")
            msg = f"body is not valid JSON ({ctx})" if ctx else "body is not valid JSON"
            loc = "body"
        elif e.get("type") == "finite_number":
            msg = "must be a finite number (NaN and Infinity are refused)"
        elif e.get("type") in _STRICT_TYPE:
            msg = f"{_STRICT_TYPE[e['type']]}, not {_json_kind(e.get('input'))}"
        msg = msg.removeprefix("Value error, ")
        fields.append(loc)
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts), fields


async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    detail, fields = validation_detail(exc)
    return error_response(422, "invalid request", detail, fields)


async def on_api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.error, exc.detail, exc.fields, exc.headers)


async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc.status_code, "http error", str(exc.detail))


async def on_auth(request: Request, exc: AuthError) -> JSONResponse:
    return auth_error_response(exc)


async def on_actor_died(request: Request, exc: RayActorError) -> JSONResponse:
    """503: an actor this request called died (Ray restarts it, or the system starts a new one under its name).

    The replica's cached handles are dropped (its servable object's
    ``forget_actors()``), so the next request looks them up again.
    """
    try:
        serve.get_replica_context().servable_object.forget_actors()
    except Exception as e:  # noqa: BLE001 - the answer below matters more
        log.warning("could not drop cached actor handles: %s", e)
    log.warning("%s %s: an actor died: %s", request.method, request.url.path, exc.__class__.__name__)
    return error_response(503, "component restarting", "a component this request needs (an account's risk manager, "
                          "the broker, the feed router or the registry) stopped and is being restarted; retry in a "
                          "few seconds", headers={"Retry-After": "2"})


async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Starlette logs the traceback; the client gets JSON, never a plain-text 500.
    return error_response(500, "internal error", "the request failed inside raytrade; it was logged. Retry; if it "
                          "fails again, tell the operator the time and route")


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error ``app`` raises in the one JSON shape."""
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(AuthError, on_auth)
    app.add_exception_handler(RayActorError, on_actor_died)
    app.add_exception_handler(Exception, on_unexpected)
