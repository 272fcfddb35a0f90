"""The request gate: what happens to a request before any route sees it.

In order of a request's life: a ``/v1`` request's key is checked before a
byte of its body is read (401, or 429 for an address that sent too many wrong
keys); the body is counted as it streams (413 the moment it passes
``MAX_BODY_BYTES``, chunked or not); and a refusal is answered at once while
the rest of the body is drained (boundedly), so a client that writes its
whole body before reading still reads the answer. The route's own
``RequireKey`` dependency (``serve.auth``) then checks the role and the rate.

``install_gate(app, keys)`` puts the gate in front of ``app``; ``keys``
finds the replica's ``KeyRing`` at request time.

Not here: the keys and roles themselves (``serve.auth``), the error shape
(``serve.errors``).
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.auth import AuthError, KeyRing, client_address, key_from_headers
from serve.errors import auth_error_response, error_response

MAX_BODY_BYTES = 2 * 1024 * 1024
# A request refused before its whole body arrived (over the limit, or no key) is answered at once, and
# what the client still sends is read and dropped, up to this many bytes or seconds, before the answer
# ends and the connection closes: a client that writes its whole body before reading (Python's urllib)
# then reads the answer instead of a reset connection. A body declared larger than this is not waited for.
DRAIN_MAX_BYTES = 16 * 1024 * 1024
DRAIN_MAX_S = 10.0


class BodyTooLarge(StarletteHTTPException):
    def __init__(self, seen: int):
        super().__init__(413, f"the body is over the limit of {MAX_BODY_BYTES} bytes ({seen} read before it was "
                         "refused): send less, e.g. fewer bars")


async def on_body_too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
    return error_response(413, "body too large", str(exc.detail))


class RequestBody:
    """One request's body as it streams in: counted against ``MAX_BODY_BYTES``, and drained after a refusal.

    ``receive`` raises ``BodyTooLarge`` the moment the bytes read pass the
    limit, chunked or not. ``send`` wraps the response: one that starts
    before the body has all arrived says ``Connection: close``, and before its
    last message the rest of the body is read and dropped (``drain``), so
    the client can finish writing and read the answer.
    """

    def __init__(self, scope: dict, receive: Any):
        self._receive = receive
        self.declared: int | None = None
        self.bad_length = False
        chunked = False
        for k, v in scope["headers"]:
            if k == b"content-length":
                try:
                    self.declared = int(v)
                except ValueError:
                    self.bad_length = True
                if self.declared is not None and self.declared < 0:
                    self.bad_length = True
            elif k == b"transfer-encoding" and b"chunked" in v.lower():
                chunked = True
        self.read = 0
        self.done = not (chunked or (self.declared or 0) > 0)

    def _note(self, message: dict) -> None:
        if message["type"] == "http.request":
            self.read += len(message.get("body", b""))
            if not message.get("more_body", False):
                self.done = True
        elif message["type"] == "http.disconnect":
            self.done = True

    async def receive(self) -> dict:
        message = await self._receive()
        self._note(message)
        if self.read > MAX_BODY_BYTES:
            raise BodyTooLarge(self.read)
        return message

    async def drain(self) -> None:
        if self.done or (self.declared or 0) > DRAIN_MAX_BYTES:
            return

        async def read_rest() -> None:
            while not self.done and self.read <= DRAIN_MAX_BYTES:
                self._note(await self._receive())

        try:
            await asyncio.wait_for(read_rest(), DRAIN_MAX_S)
        except asyncio.TimeoutError:
            pass

    def send(self, send: Any) -> Any:
        async def guarded(message: dict) -> None:
            if not self.done:
                if message["type"] == "http.response.start":
                    message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
                elif message["type"] == "http.response.body" and not message.get("more_body", False):
                    await send({**message, "more_body": True})
                    await self.drain()
                    message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        return guarded


def is_v1(scope: dict) -> bool:
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path == "/v1" or path.startswith("/v1/")


class RequestGate:
    """Before a route reads a byte of the body: the key of a ``/v1`` request, then the body's size.

    A ``/v1`` request with no key, a wrong key or from an address throttled
    for wrong keys is answered 401/429 here, with its body unread (only
    drained, boundedly, so the client can read the answer); the route's own
    ``RequireKey`` dependency then checks the role. A body declared over
    ``MAX_BODY_BYTES`` is a 413 before it is read; one that streams past it
    (chunked, or longer than declared) is a 413 as it crosses.

    A plain ASGI middleware: Starlette's ``BaseHTTPMiddleware`` (``@app.middleware``)
    runs every request through an extra task and memory streams, a cost each
    decision paid.
    """

    def __init__(self, app: Any, keys: Callable[[], KeyRing]):
        self.app, self.keys = app, keys

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body = RequestBody(scope, receive)
        send = body.send(send)
        refusal = self._refusal(scope, body)
        if refusal is not None:
            return await refusal(scope, body.receive, send)
        await self.app(scope, body.receive, send)

    def _refusal(self, scope: dict, body: RequestBody) -> Response | None:
        if body.bad_length:
            return error_response(400, "bad request", "Content-Length is not a whole number of bytes: send the "
                                  "body's length in bytes, or send the body chunked")
        if is_v1(scope):
            try:
                self.keys().identify(key_from_headers(Headers(scope=scope)), client_address(scope))
            except AuthError as e:
                return auth_error_response(e)
        if body.declared is not None and body.declared > MAX_BODY_BYTES:
            return error_response(413, "body too large", f"the body is {body.declared} bytes; the limit is "
                                  f"{MAX_BODY_BYTES}: send less, e.g. fewer bars")
        return None


def install_gate(app: FastAPI, keys: Callable[[], KeyRing]) -> None:
    """Screen every request to ``app`` (keys, body size) before its route runs."""
    app.add_exception_handler(BodyTooLarge, on_body_too_large)
    app.add_middleware(RequestGate, keys=keys)
