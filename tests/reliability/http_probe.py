"""What the HTTP fuzzing tests share: the property every response must meet, the hostile inputs,
and the schema-driven fuzzing loop. Used against a replica (``test_http_fuzz.py``) and against the
gateway in front of replicas (``test_gateway_fuzz.py``); a "server" is anything with ``url`` and
``port``.

The property: a 2xx, or a 4xx/503 whose body is exactly an OpenAI error object
``{"error": {"message", "type", "param", "code"}}`` (a 503 with Retry-After); never another 5xx.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Protocol

import httpx

if TYPE_CHECKING:  # schemathesis is in the dev extra: imported where it is used
    from schemathesis import APIOperation

API_KEY = "fuzz-key"
REQUEST_TIMEOUT_S = 30.0  # a request slower than this counts as a hang
# Hypothesis max_examples per operation and mode; COLLM_FUZZ_EXAMPLES=500 for a deeper search.
FUZZ_EXAMPLES = int(os.environ.get("COLLM_FUZZ_EXAMPLES", "50"))

# The operations a replica and the gateway serve (both test modules check the served schema).
OPERATIONS = [
    "GET /health",
    "GET /metrics",
    "GET /v1/models",
    "POST /v1/completions",
    "POST /v1/chat/completions",
]
FUZZ_CASES = (
    [(op, "positive") for op in OPERATIONS]
    # Negative cases need a parameter to violate: only the POST bodies have one.
    + [(op, "negative") for op in OPERATIONS if op.startswith("POST")]
)


class Server(Protocol):
    @property
    def url(self) -> str: ...

    @property
    def port(self) -> int: ...


def auth(key: str = API_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> None:
    assert r.status_code == status, r.text
    if code is not None:
        assert r.json()["error"]["code"] == code, r.text


class Probe:
    """Sends requests to a server under test, checks every response, counts both for the report."""

    def __init__(self) -> None:
        self.sent: Counter[str] = Counter()  # requests sent, by kind
        self.statuses: Counter[int] = Counter()  # responses checked, by status

    def assert_well_formed(self, status: int, headers: httpx.Headers, content: bytes) -> None:
        """2xx, or a 4xx/503 whose body is exactly an OpenAI error object."""
        self.statuses[status] += 1
        assert status < 500 or status == 503, f"server error {status}: {content[:500]!r}"
        if status < 400:
            return
        body = json.loads(content)
        assert set(body) == {"error"}, body
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        assert isinstance(err["message"], str) and err["message"], err
        assert isinstance(err["type"], str) and err["type"], err
        assert err["param"] is None or isinstance(err["param"], str), err
        assert err["code"] is None or isinstance(err["code"], str), err
        if status == 503:
            assert int(headers["retry-after"]) >= 1

    def check_raw(self, s: socket.socket) -> tuple[int, bytes]:
        """Read one response from a raw socket and check it; its status and body."""
        status, headers, body = read_response(s)
        self.assert_well_formed(status, httpx.Headers(dict(headers)), body)
        return status, body

    def check(self, r: httpx.Response) -> httpx.Response:
        self.assert_well_formed(r.status_code, r.headers, r.content)
        return r

    def post_raw(
        self,
        server: Server,
        path: str,
        content: bytes,
        content_type: str | None = "application/json",
        **kw: object,
    ) -> httpx.Response:
        headers = {**auth(), **({"Content-Type": content_type} if content_type else {})}
        self.sent["hand-written"] += 1
        return self.check(
            httpx.post(
                server.url + path,
                content=content,
                headers=headers,
                timeout=REQUEST_TIMEOUT_S,
                **kw,  # type: ignore[arg-type]
            )
        )

    def timed_completion(self, server: Server, max_tokens: int = 4) -> tuple[int, float]:
        body = {"model": "tiny", "prompt": "KING:", "max_tokens": max_tokens, "temperature": 0}
        started = time.monotonic()
        r = self.check(
            httpx.post(
                server.url + "/v1/completions", json=body, headers=auth(), timeout=REQUEST_TIMEOUT_S
            )
        )
        self.sent["hand-written"] += 1
        return r.status_code, time.monotonic() - started

    def report(self) -> str:
        return (
            f"checked {self.statuses.total()} responses: {dict(sorted(self.statuses.items()))}\n"
            f"requests by kind: {dict(self.sent)}"
        )


def fuzz_operation(probe: Probe, operation: APIOperation, mode: str) -> None:
    """Schemathesis cases for one operation of a served /openapi.json, each checked by ``probe``.

    Every POST body is sent twice: as generated (random auth header, random model name: mostly
    401/404/400), then with a valid key and model (reaching validation, the engine, generation).
    """
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode

    # The names below are the ones the inner function has always used: Hypothesis seeds a
    # derandomized run from that function's source, so its examples stay the same.
    STATS, assert_well_formed = probe.sent, probe.assert_well_formed

    @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
        derandomize=True,
    )
    def fuzz(case) -> None:
        # As generated (random auth header, random model name): mostly 401/404/400.
        started = time.monotonic()
        r = case.call(timeout=REQUEST_TIMEOUT_S)
        STATS[f"fuzz {mode}"] += 1
        assert_well_formed(r.status_code, r.headers, r.content)
        # The same body with a valid key and model reaches validation, the engine, generation.
        if case.method == "POST" and isinstance(case.body, dict):
            case.headers = {**(case.headers or {}), **auth()}
            case.body = {**case.body, "model": "tiny", **short_output(case.body)}
            r = case.call(timeout=REQUEST_TIMEOUT_S)
            STATS[f"fuzz {mode}, valid key+model"] += 1
            assert_well_formed(r.status_code, r.headers, r.content)
        assert time.monotonic() - started < 2 * REQUEST_TIMEOUT_S

    fuzz()


# The output a valid fuzzed request may ask for: generation is not what is fuzzed, and a chat
# request without a limit (the room its prompt leaves) or with a large one made the chat cases
# take 90 s of the suite's time. Values out of range or of the wrong type, and two limits that
# differ, are left as generated (their errors are what is fuzzed).
SHORT_OUTPUT = 8
LIMITS = ("max_tokens", "max_completion_tokens")


def short_output(body: dict[str, object]) -> dict[str, object]:
    """The output limits of ``body`` (with a valid key and model) to send instead."""
    given = {k: body[k] for k in LIMITS if k in body}
    if len(set(map(repr, given.values()))) > 1:  # two limits that differ: a 400 to check
        return {}
    if not given:
        return {"max_tokens": SHORT_OUTPUT}
    return {
        k: SHORT_OUTPUT if type(v) is int and SHORT_OUTPUT < v <= 1_000_000 else v
        for k, v in given.items()
    }


def open_partial_request(
    server: Server,
    declared: int,
    sent: bytes,
    path: str = "/v1/completions",
    port: int | None = None,
    key: str = API_KEY,
) -> socket.socket:
    """A POST (a completion by default) whose headers promise ``declared`` body bytes; ``sent`` is
    all sent. ``port``: another port of the server's (a replica's control API, with its ``key``:
    a call without the token is refused before its body is read)."""
    port = server.port if port is None else port
    s = socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT_S)
    s.sendall(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
        + f"Authorization: Bearer {key}\r\nContent-Length: {declared}\r\n\r\n".encode()
        + sent
    )
    return s


@contextmanager
def stalled_body(server: Server, probe: Probe) -> Iterator[tuple[socket.socket, float]]:
    """A request whose body stops after 8 of 100 bytes, and when it was opened; closed at exit."""
    s = open_partial_request(server, 100, b'{"model"')
    probe.sent["raw socket"] += 1
    try:
        yield s, time.monotonic()
    finally:
        s.close()


def read_response(s: socket.socket) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One HTTP response from a raw socket (chunked or not)."""
    resp = http.client.HTTPResponse(s)
    resp.begin()
    return resp.status, resp.headers, resp.read()


# ---- hostile bodies -----------------------------------------------------------------------------

COMPLETION = '{"model": "tiny", "prompt": "ROMEO:", "max_tokens": 2, %s}'

MALFORMED_JSON = [
    b"{",
    b'{"model": "tiny",',
    b'{"model": "tiny", "prompt": "a",}',
    b"nul",
    b"\x00\x01\x02",
    b'{"model": "tiny", "prompt": "a"}{"model": "tiny"}',
    b"[" * 5000 + b"]" * 5000,  # deep nesting
]

NOT_AN_OBJECT = [b"[]", b"null", b"1", b'"prompt"', b"true", b""]

BAD_PARAMETERS = [
    '"max_tokens": -1',
    '"max_tokens": 0',
    '"max_tokens": "ten"',
    '"max_tokens": 2.5',
    '"max_tokens": NaN',
    '"max_tokens": Infinity',
    '"max_tokens": 1e400',
    '"max_tokens": 10000000',
    '"max_tokens": 100000000000000000000000000000000',
    '"temperature": -0.1',
    '"temperature": 2.5',
    '"temperature": "hot"',
    '"temperature": NaN',
    '"temperature": Infinity',
    '"temperature": -Infinity',
    '"top_p": 0',
    '"top_p": 1.5',
    '"top_p": NaN',
    '"top_p": -Infinity',
    '"seed": -9223372036854775809',
    '"seed": 18446744073709551616',
    '"seed": "x"',
    '"n": 2',
    '"n": 0',
    '"stop": ["a", "b", "c", "d", "e"]',
    '"stop": ""',
    '"stop": [""]',
    '"stop": 5',
    f'"stop": "{"s" * 300}"',
    '"stream": [true]',
    f'"user": "{"u" * 300}"',
    '"unknown_field": 1',
    '"logprobs": 5',
    '"messages": [{"role": "user", "content": "hi"}]',
]

INVALID_CHAT_BODIES = [
    {"model": "tiny", "messages": []},
    {"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]},
    {"model": "tiny", "messages": [{"role": "user"}]},
    {"model": "tiny", "messages": [{"role": "user", "content": "hi", "extra": 1}]},
    {"model": "tiny", "messages": [{"role": "user", "content": ["not", "text"]}]},
    {"model": "tiny", "messages": "hi"},
    {"model": "tiny", "messages": [{"role": "user", "content": "x"}] * 257},
    {"model": "", "messages": [{"role": "user", "content": "hi"}]},
    {"model": "m" * 300, "messages": [{"role": "user", "content": "hi"}]},
]

INVALID_UTF8 = [
    ("/v1/completions", b'{"model": "tiny", "prompt": "\xff\xfe\xfd"}'),
    ("/v1/completions", b'{"model": "tiny", "prompt": "ok", "user": "\xc3\x28"}'),
    (
        "/v1/chat/completions",
        b'{"model": "tiny", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',
    ),
    (
        "/v1/chat/completions",
        b'{"model": "tiny", "max_tokens": 2, '
        b'"messages": [{"role": "user", "content": "\\udfff"}]}',  # escaped lone surrogate
    ),
]
INVALID_UTF8_IDS = ["ff-fe", "bad-continuation", "surrogate-bytes", "chat-surrogate-escape"]

LONE_SURROGATE_PROMPTS = [
    b'{"model": "tiny", "prompt": "ok \\ud800", "max_tokens": 2}',
    b'{"model": "tiny", "prompt": ["\\udc00"], "max_tokens": 2}',
]

WRONG_CONTENT_TYPES = [
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data",
    "application/xml",
]
