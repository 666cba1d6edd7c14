"""The control API checks its token before it reads a request's body."""

import asyncio
import json
from types import SimpleNamespace

from collm_fl.replica.control import create_control_app

TOKEN = "secret"


def call(app, method: str, path: str, headers: list[tuple[bytes, bytes]]) -> tuple[dict, int]:
    """Send one request straight to the ASGI app: (the response, body messages it read).

    The body is an adapter's worth of chunks (announced by Content-Length, within the limit);
    ``receive`` counts how many of them the app asked for."""
    chunks = 64
    read = 0
    sent: list[dict] = []

    async def receive() -> dict:
        nonlocal read
        read += 1
        return {"type": "http.request", "body": b"x" * 1024, "more_body": read < chunks}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-length", str(chunks * 1024).encode()), *headers],
        "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 8001),
    }
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return {
        "status": start["status"],
        "headers": dict(start["headers"]),
        "json": json.loads(body),
    }, read


def test_a_push_without_the_token_is_refused_before_its_body_is_read():
    # The token was a route dependency: the body-size middleware buffered up to 512 MiB of any
    # caller's body before the 401.
    app = create_control_app(SimpleNamespace(), TOKEN)
    for headers in ([], [(b"authorization", b"Bearer wrong")], [(b"authorization", b"secret")]):
        response, read = call(app, "PUT", "/control/adapters/1", headers)
        assert response["status"] == 401 and read == 0
        error = response["json"]["error"]
        assert error["code"] == "invalid_control_token" and error["type"] == "authentication_error"
        assert "--control-token" in error["message"]
        assert response["headers"][b"www-authenticate"] == b"Bearer"


def test_a_call_with_the_token_reaches_its_route():
    # (An unknown path: the token let through, the app answers it, having read the body.)
    app = create_control_app(SimpleNamespace(), TOKEN)
    response, read = call(
        app, "PUT", "/control/nothing-here", [(b"authorization", f"Bearer {TOKEN}".encode())]
    )
    assert response["status"] == 404 and read > 0
