"""HTTP errors in OpenAI's shape, mapped from exception types in one place.

Every error a client can cause is a 4xx (or a 503 with Retry-After under overload) with a body
``{"error": {"message", "type", "param", "code"}}``; nothing a client sends yields a 500.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from collm_fl.api.limits import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES

log = logging.getLogger(__name__)

Scope = MutableMapping[str, object]
Message = MutableMapping[str, object]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class APIError(Exception):
    """An error with its HTTP status and OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}


def error_response(
    status: int,
    message: str,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(status_code=status, content=body, headers=headers)


def overloaded(
    retry_after_s: int,
    message: str = "server is overloaded; retry later",
    code: str = "overloaded",
) -> APIError:
    return APIError(
        503,
        message,
        "server_overloaded",
        code=code,
        headers={"Retry-After": str(retry_after_s)},
    )


def install_error_handlers(app: FastAPI) -> None:
    """Map every exception type to its status and an OpenAI-style body."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return error_response(400, "request body is not valid JSON", code="invalid_json")
        content_type = request.headers.get("content-type", "")
        if not loc and "json" not in content_type.lower():  # (curl -d sends a form type)
            msg = (
                "the body must be a JSON object sent with 'Content-Type: application/json'"
                f" (got {content_type or 'no Content-Type'})"
            )
            return error_response(400, msg, code="invalid_json")
        if first.get("type") == "unsupported_parameter":
            name = str(first.get("ctx", {}).get("name", "")) or None
            msg = str(first.get("msg"))
            return error_response(400, msg, param=name, code="unsupported_parameter")
        if first.get("type") == "extra_forbidden":
            msg = f"unrecognized request argument supplied: {'.'.join(loc)}"
            return error_response(400, msg, param=".".join(loc) or None, code="unknown_parameter")
        msg = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
            for e in errors[:5]
        )
        return error_response(400, msg, param=".".join(loc) or None, code="invalid_parameter")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers) if exc.headers else None
        # The default type, invalid_request_error, is what OpenAI answers a 404 with too.
        return error_response(exc.status_code, str(exc.detail), headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error while serving a request")
        return error_response(500, "internal server error", "server_error")


def check_bearer(
    authorization: str | None,
    expected: str | None,
    what: str = "API key",
    code: str = "invalid_api_key",
) -> None:
    """Constant-time check of an ``Authorization: Bearer <key>`` header (no key = open);
    ``what`` names the secret in the 401 (the control API's is its control token)."""
    if not expected:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), expected.encode()):
        raise APIError(
            401,
            f"missing or invalid {what} (send 'Authorization: Bearer <key>')",
            "authentication_error",
            code=code,
            headers={"WWW-Authenticate": "Bearer"},
        )


class BearerAuth:
    """ASGI middleware: check ``Authorization: Bearer <token>`` (as :func:`check_bearer`) before
    anything reads the request's body.

    Placed outside :class:`BodySizeLimit`, a request without the token is answered 401 having
    read none of its body: a caller without it cannot make the server buffer a large body (a
    route's dependency runs only after the body was read). Every HTTP request needs the token.
    """

    def __init__(
        self, app: ASGIApp, token: str, what: str = "API key", code: str = "invalid_api_key"
    ) -> None:
        self.app = app
        self.token = token
        self.what = what
        self.code = code

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") == "http":
            headers = dict(scope.get("headers", []))  # type: ignore[call-overload]
            authorization = headers.get(b"authorization")
            try:
                check_bearer(
                    None if authorization is None else authorization.decode("latin-1"),
                    self.token,
                    self.what,
                    self.code,
                )
            except APIError as e:
                await _send_error(send, e)
                return
        await self.app(scope, receive, send)


class BodySizeLimit:
    """ASGI middleware: read the whole request body first, bounded in size and in time.

    Over ``max_bytes`` (by Content-Length, or counted when chunked) → 413; a body not all
    received within ``read_timeout_s`` of the request's start → 408 (a slow client cannot hold a
    connection and a server task forever: the deadline is for the whole body, not per read, so
    a byte now and then does not renew it). The app then reads the buffered body as usual.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int = DEFAULT_MAX_BODY_BYTES,
        read_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout_s = read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))  # type: ignore[call-overload]
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await _reject(
                send, 413, f"request body larger than {self.max_bytes} bytes", "body_too_large"
            )
            return
        chunks: list[bytes] = []
        seen = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.read_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                msg = f"request body not received within {self.read_timeout_s:g} s"
                await _reject(send, 408, msg, "body_timeout")
                return
            if message.get("type") == "http.disconnect":
                return  # the client left: nobody to answer
            body = message.get("body", b"")
            seen += len(body)  # type: ignore[arg-type]
            if seen > self.max_bytes:
                await _reject(
                    send, 413, f"request body larger than {self.max_bytes} bytes", "body_too_large"
                )
                return
            chunks.append(body)  # type: ignore[arg-type]
            if not message.get("more_body", False):
                break
        buffered = b"".join(chunks)
        del chunks  # (held while the app runs, the body would take twice its size)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered, buffered
            if not delivered:
                delivered = True
                body, buffered = buffered, b""  # (the app holds it now)
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: disconnect notifications, as usual

        await self.app(scope, replay, send)


async def _reject(send: Send, status: int, message: str, code: str) -> None:
    await _send_error(send, APIError(status, message, code=code))


async def _send_error(send: Send, error: APIError) -> None:
    """Answer ``error`` from an ASGI middleware, the body unread (so the connection closes)."""
    body = json.dumps(
        {
            "error": {
                "message": error.message,
                "type": error.type,
                "param": error.param,
                "code": error.code,
            }
        }
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
    headers += [
        (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in error.headers.items()
    ]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
