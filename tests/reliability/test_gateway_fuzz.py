"""The gateway's HTTP API under hostile input and upstream faults, against real processes.

One `collm gateway` (with an API key) in front of two `collm replica --model tiny --data none`
processes. The property is the replica's (`http_probe.py`): every response is a 2xx or a 4xx/503
with an OpenAI error body (a 503 with Retry-After), never another 5xx, never a hang; the gateway
keeps serving. On top of the replica's cases: the gateway's own key (a bad request or key is
answered by the gateway, never forwarded), clients that leave (the replica's work is cancelled and
the gateway's accounting returns to zero), and replicas that die under it (fail over, or end
cleanly: a stream with an error chunk, a request with a 503). The module ends with every replica
killed, then one restarted: the gateway takes it back and its log holds no traceback.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import psutil
import pytest
from http_probe import (
    API_KEY,
    BAD_PARAMETERS,
    COMPLETION,
    FUZZ_CASES,
    INVALID_CHAT_BODIES,
    INVALID_UTF8,
    INVALID_UTF8_IDS,
    LONE_SURROGATE_PROMPTS,
    MALFORMED_JSON,
    NOT_AN_OBJECT,
    OPERATIONS,
    REQUEST_TIMEOUT_S,
    WRONG_CONTENT_TYPES,
    Probe,
    assert_error,
    auth,
    fuzz_operation,
    open_partial_request,
    read_response,
    stalled_body,
)

if TYPE_CHECKING:
    from conftest import Proc

REPLICA_KEY = "fuzz-replica-key"  # what the gateway sends to its replicas; no client's key
ROUTED = "x-routed-to"  # set on every response a replica produced, absent on the gateway's own
PROBE = Probe()  # the requests sent by kind and responses by status: reported by the last test
check, post_raw, timed_completion = PROBE.check, PROBE.post_raw, PROBE.timed_completion
check_raw = PROBE.check_raw
BODY_TIMEOUT_S = 15  # the gateway's --body-timeout (30 s by default)
STALLED_BODY_BOUND_S = BODY_TIMEOUT_S + 10.0  # plus slack
KEEPALIVE_CONNECTIONS = 64  # the gateway's pool to its replicas keeps this many open
LONG = 480  # max_tokens that keep a tiny replica busy for a while (its context is 512)


@dataclass
class Replica:
    """A replica process the module can kill and start again on the same ports."""

    name: str
    port: int
    cmd: list[str]
    env: dict[str, str]
    proc: Proc

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()


def cancelled(gateway: Gateway, replicas: list[Replica]) -> tuple[float, float]:
    """Requests cancelled so far: as the gateway counts them, and as the replicas do."""
    upstream = sum(metric(r.url, "collm_requests_total", status="cancelled") for r in replicas)
    return gateway.metric("collm_gateway_requests_total", outcome="cancelled"), upstream


@dataclass
class Gateway:
    port: int
    proc: Proc
    fds_at_start: int = 0

    def open_fds(self) -> int:
        return psutil.Process(self.proc.pid).num_fds()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()

    def replica(self, name: str) -> dict:
        return next(r for r in self.health()["replicas"] if r["name"] == name)

    def in_flight(self) -> tuple[int, int]:
        """Requests and expected tokens the gateway counts as in flight, over all replicas."""
        replicas = self.health()["replicas"]
        return sum(r["in_flight"] for r in replicas), sum(r["in_flight_tokens"] for r in replicas)

    def metric(self, name: str, **labels: str) -> float:
        return metric(self.url, name, **labels)


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of the Prometheus samples ``name`` with these labels a server exports."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=5).text
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


@pytest.fixture(scope="module")
def replicas(module_procs, rel, tmp_path_factory) -> list[Replica]:
    root: Path = tmp_path_factory.mktemp("gateway-replicas")
    env = dict(os.environ, COLLM_API_KEY=REPLICA_KEY, COLLM_CONTROL_TOKEN="fuzz-control")
    started = []
    for i in range(2):  # both start at once; replica start-up is the slow part
        port = rel.free_port()
        cmd = rel.replica_command(root / f"store{i}", port, rel.free_port(), "--data", "none")
        proc = module_procs.spawn(f"replica{i}", cmd, env)
        started.append(Replica(f"127.0.0.1:{port}", port, cmd, env, proc))
    for r in started:
        r.proc.wait_http(r.url + "/health")
    return started


@pytest.fixture(scope="module")
def gateway(module_procs, rel, replicas) -> Gateway:
    port = rel.free_port()
    cmd = [rel.venv_bin("collm"), "gateway", "--port", str(port)]
    cmd += ["--body-timeout", str(BODY_TIMEOUT_S)]
    for r in replicas:
        cmd += ["--replica", r.url]
    env = dict(os.environ, COLLM_API_KEY=API_KEY, COLLM_REPLICA_API_KEY=REPLICA_KEY)
    gw = Gateway(port, module_procs.spawn("gateway", cmd, env))
    gw.proc.wait_http(gw.url + "/health")
    rel.wait_until(lambda: gw.health()["healthy_replicas"] == 2, 30, "both replicas healthy")
    gw.fds_at_start = gw.open_fds()
    return gw


@pytest.fixture(scope="module", autouse=True)
def stalled_from_the_start(gateway) -> Iterator[tuple[socket.socket, float]]:
    """A request whose body stops after 8 of 100 bytes, opened before the module's first test; a
    later test checks it was dropped (the body timeout runs while the other tests do)."""
    with stalled_body(gateway, PROBE) as opened:
        yield opened


@pytest.fixture(scope="module")
def api_schema(gateway):
    # Imported here: without schemathesis (the `dev` extra) only the fuzzing tests skip.
    schemathesis = pytest.importorskip("schemathesis")
    return schemathesis.openapi.from_url(gateway.url + "/openapi.json")


# ---- schema-driven fuzzing ----------------------------------------------------------------------


def test_the_served_schema_has_exactly_the_fuzzed_operations(api_schema):
    served = sorted(op.ok().label for op in api_schema.get_all_operations())
    assert served == sorted(OPERATIONS)  # a new endpoint must be added to the fuzzing here


@pytest.mark.slow
@pytest.mark.parametrize("label,mode", FUZZ_CASES)
def test_fuzzed_requests_get_a_2xx_or_a_well_formed_error(api_schema, label, mode):
    """Schemathesis cases from the gateway's /openapi.json, forwarded to real replicas."""
    operation = api_schema.find_operation_by_label(label)
    assert operation is not None, label
    fuzz_operation(PROBE, operation, mode)


# ---- the gateway's key --------------------------------------------------------------------------

GUARDED = [
    ("GET", "/v1/models", None),
    ("POST", "/v1/completions", b'{"model": "tiny", "prompt": "a", "max_tokens": 1}'),
    (
        "POST",
        "/v1/chat/completions",
        b'{"model": "tiny", "messages": [{"role": "user", "content": "a"}], "max_tokens": 1}',
    ),
]
WRONG_KEYS = {
    "none": None,
    "wrong": "Bearer wrong-key",
    "empty": "Bearer",
    "basic": "Basic ZnV6ei1rZXk=",  # base64 of the right key
    "no-scheme": API_KEY,
    "prefix": f"Bearer {API_KEY[:-1]}",
    "suffix": f"Bearer {API_KEY}x",
    "two-spaces": f"Bearer  {API_KEY}",
    "replica-key": f"Bearer {REPLICA_KEY}",  # the gateway's key to the replicas opens nothing
    "latin-1": "Bearer fuzz-k\xe9y".encode("latin-1"),
    "utf-8": "Bearer fuzz-k\xe9y".encode(),
}


@pytest.mark.parametrize("header", WRONG_KEYS.values(), ids=WRONG_KEYS.keys())
@pytest.mark.parametrize("method,path,body", GUARDED, ids=[g[1] for g in GUARDED])
def test_a_missing_or_wrong_key_is_a_401_from_the_gateway(gateway, header, method, path, body):
    headers = {"Content-Type": "application/json"}
    if header is not None:
        headers["Authorization"] = header
    PROBE.sent["auth"] += 1
    r = check(httpx.request(method, gateway.url + path, content=body, headers=headers, timeout=30))
    assert_error(r, 401, "invalid_api_key")
    assert r.headers["www-authenticate"] == "Bearer"
    assert ROUTED not in r.headers  # refused by the gateway, not forwarded


def test_the_key_is_compared_in_constant_time(monkeypatch):
    """Every key a client sends is compared with hmac.compare_digest (no early exit on a prefix)."""
    import hmac

    from collm_fl.api import errors

    compared: list[tuple[bytes, bytes]] = []
    compare_digest = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return compare_digest(a, b)

    monkeypatch.setattr(errors.hmac, "compare_digest", spy)
    keys = ["x", API_KEY[:-1], API_KEY + "x", "", API_KEY]
    for key in keys:
        try:
            errors.check_bearer(f"Bearer {key}", API_KEY)
        except errors.APIError as e:
            assert e.status == 401 and key != API_KEY
    assert compared == [(key.encode(), API_KEY.encode()) for key in keys]


def test_the_open_endpoints_need_no_key_and_show_no_secret(gateway):
    for path in ("/health", "/metrics", "/openapi.json"):
        PROBE.sent["hand-written"] += 1
        r = check(httpx.get(gateway.url + path, timeout=10))
        assert r.status_code == 200
        assert REPLICA_KEY not in r.text and API_KEY not in r.text


@pytest.mark.parametrize(
    "method,path,status",
    [
        ("GET", "/v1/completions", 405),
        ("PUT", "/v1/chat/completions", 405),
        ("DELETE", "/v1/models", 405),
        ("POST", "/v1/embeddings", 404),
        ("GET", "/control/status", 404),  # the replicas' control API is not reachable here
        ("GET", "/../../etc/passwd", 404),
    ],
)
def test_unknown_methods_and_paths_are_a_well_formed_4xx(gateway, method, path, status):
    PROBE.sent["hand-written"] += 1
    r = check(httpx.request(method, gateway.url + path, headers=auth(), timeout=30))
    assert r.status_code == status, r.text


# ---- hand-written: bodies -----------------------------------------------------------------------


def assert_refused_by_the_gateway(r: httpx.Response, status: int = 400) -> None:
    assert_error(r, status)
    assert ROUTED not in r.headers, "a request the gateway should refuse was forwarded"


@pytest.mark.parametrize("body", MALFORMED_JSON, ids=range(len(MALFORMED_JSON)))
def test_malformed_json_is_a_400(gateway, body):
    assert_refused_by_the_gateway(post_raw(gateway, "/v1/completions", body))


@pytest.mark.parametrize("body", NOT_AN_OBJECT)
def test_json_that_is_not_an_object_is_a_400(gateway, body):
    assert_refused_by_the_gateway(post_raw(gateway, "/v1/chat/completions", body))


@pytest.mark.parametrize("fields", BAD_PARAMETERS)
def test_out_of_range_or_wrongly_typed_parameters_are_a_400(gateway, fields):
    r = post_raw(gateway, "/v1/completions", (COMPLETION % fields).encode())
    assert_refused_by_the_gateway(r)


@pytest.mark.parametrize("body", INVALID_CHAT_BODIES, ids=range(len(INVALID_CHAT_BODIES)))
def test_invalid_chat_bodies_are_a_400(gateway, body):
    r = post_raw(gateway, "/v1/chat/completions", json.dumps(body).encode())
    assert_refused_by_the_gateway(r)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_unknown_models_are_a_404(gateway, path, stream):
    body = {"model": "gpt-99", "prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}
    body.pop("messages" if path == "/v1/completions" else "prompt")
    r = post_raw(gateway, path, json.dumps({**body, "stream": stream}).encode())
    assert_error(r, 404, "model_not_found")
    assert r.json()["error"]["param"] == "model"
    assert ROUTED not in r.headers  # the gateway knows its replicas' model: never forwarded


@pytest.mark.parametrize("path,body", INVALID_UTF8, ids=INVALID_UTF8_IDS)
def test_invalid_utf8_is_a_4xx_not_a_crash(gateway, path, body):
    r = post_raw(gateway, path, body)
    assert 400 <= r.status_code < 500


@pytest.mark.parametrize("body", LONE_SURROGATE_PROMPTS, ids=["string", "list"])
def test_an_escaped_lone_surrogate_in_a_prompt_is_a_400(gateway, body):
    assert_refused_by_the_gateway(post_raw(gateway, "/v1/completions", body))


@pytest.mark.parametrize("content_type", WRONG_CONTENT_TYPES)
def test_wrong_content_type_is_a_4xx(gateway, content_type):
    body = COMPLETION % '"seed": 1'
    r = post_raw(gateway, "/v1/completions", body.encode(), content_type=content_type)
    assert 400 <= r.status_code < 500 and ROUTED not in r.headers


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_huge_max_tokens_is_refused_fast_and_leaves_no_accounting_behind(gateway, stream):
    fields = f'"max_tokens": 1000000, "stream": {json.dumps(stream)}'
    body = COMPLETION.replace('"max_tokens": 2, ', "") % fields
    started = time.monotonic()
    assert_error(post_raw(gateway, "/v1/completions", body.encode()), 400)  # the replica's 400
    assert time.monotonic() - started < 5.0
    assert gateway.in_flight() == (0, 0)


def test_a_prompt_far_over_the_context_is_refused_fast(gateway):
    body = json.dumps({"model": "tiny", "prompt": "ab " * 60_000}).encode()  # 180 kB, 60k tokens
    started = time.monotonic()
    assert_error(post_raw(gateway, "/v1/completions", body), 400, "context_length_exceeded")
    assert time.monotonic() - started < 10.0


def test_a_body_over_one_megabyte_is_a_413(gateway):
    body = json.dumps({"model": "tiny", "prompt": "a" * 1_100_000}).encode()
    r = post_raw(gateway, "/v1/completions", body)
    assert_error(r, 413, "body_too_large")
    assert ROUTED not in r.headers


def test_a_chunked_body_over_one_megabyte_is_a_413(gateway):
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(12):
            yield b"a" * 100_000
        yield b'"}'

    PROBE.sent["hand-written"] += 1
    r = check(
        httpx.post(
            gateway.url + "/v1/completions",
            content=chunks(),
            headers={**auth(), "Content-Type": "application/json"},
            timeout=REQUEST_TIMEOUT_S,
        )
    )
    assert_error(r, 413, "body_too_large")


def raw_request(gateway: Gateway, head: bytes, body: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", gateway.port), timeout=REQUEST_TIMEOUT_S)
    s.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {API_KEY}\r\n".encode()
        + head
        + b"\r\n"
        + body
    )
    PROBE.sent["raw socket"] += 1
    return s


def test_a_content_length_over_the_limit_is_a_413_without_reading_the_body(gateway):
    with raw_request(gateway, b"Content-Length: 50000000\r\n", b"{") as s:
        status, body = check_raw(s)
    assert status == 413 and json.loads(body)["error"]["code"] == "body_too_large"


BODY = b'{"model": "tiny", "prompt": "ROMEO:", "max_tokens": 2}'
BAD_FRAMING = {
    "shorter-than-sent": b"Content-Length: 10\r\n",
    "not-a-number": b"Content-Length: abc\r\n",
    "negative": b"Content-Length: -1\r\n",
    "signed": b"Content-Length: +55\r\n",
    "overflowing": b"Content-Length: 99999999999999999999999999\r\n",
    "two-lengths": b"Content-Length: 10\r\nContent-Length: 55\r\n",
    "length-and-chunked": b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
}


def read_to_the_end(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a hang fails the test)."""
    received = b""
    while chunk := s.recv(65536):
        received += chunk
    return received


@pytest.mark.parametrize("head", BAD_FRAMING.values(), ids=BAD_FRAMING.keys())
def test_a_lying_or_malformed_content_length_is_a_400_and_the_connection_closes(gateway, head):
    """Refused by the HTTP layer (uvicorn's plain-text 400) before the app sees a request, or
    (the request cut at a short length) by the app; then closed, the rest never served."""
    with raw_request(gateway, head, BODY) as s:
        statuses = [int(c) for c in re.findall(rb"HTTP/1\.1 (\d{3}) ", read_to_the_end(s))]
    assert statuses and set(statuses) == {400}, statuses


def test_a_client_that_sends_less_than_its_content_length_and_leaves_gets_no_reply(gateway):
    with raw_request(gateway, b"Content-Length: 500\r\n", BODY) as s:
        s.shutdown(socket.SHUT_WR)
        assert read_to_the_end(s) == b""  # no reply to a request that never arrived, and no hang
    assert timed_completion(gateway)[0] == 200


def test_a_completion_still_works_after_the_bad_bodies(gateway):
    r = post_raw(gateway, "/v1/completions", (COMPLETION % '"temperature": 0').encode())
    assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None
    assert r.headers[ROUTED]


# ---- hand-written: clients ----------------------------------------------------------------------


def test_a_client_that_dribbles_its_body_does_not_hold_up_others(gateway):
    body = (COMPLETION % '"temperature": 0').encode()
    s = open_partial_request(gateway, len(body), b"")
    PROBE.sent["raw socket"] += 1
    others_done = threading.Event()
    result: dict[str, object] = {}

    def dribble() -> None:
        try:
            for i in range(len(body) - 1):  # one byte every 20 ms: the slow client under test
                s.sendall(body[i : i + 1])
                time.sleep(0.02)
            others_done.wait(REQUEST_TIMEOUT_S)  # the last byte only once the others are served
            s.sendall(body[-1:])
            result["reply"] = read_response(s)
        except OSError as e:
            result["error"] = e

    slow = threading.Thread(target=dribble)
    slow.start()
    try:
        # (were they held up, the slow client's last byte, sent only once they are served, would
        # never come: they would time out)
        timings = [timed_completion(gateway) for _ in range(5)]
        assert all(status == 200 for status, _ in timings), timings
    finally:
        others_done.set()
        slow.join(timeout=REQUEST_TIMEOUT_S)
        s.close()
    assert not slow.is_alive()
    assert "error" not in result, result
    status, _, reply = result["reply"]  # type: ignore[misc]
    assert status == 200, reply  # and it is served too


def test_clients_that_stop_sending_do_not_hold_up_others(gateway):
    stalled = [open_partial_request(gateway, 100, b'{"model"') for _ in range(20)]
    PROBE.sent["raw socket"] += len(stalled)
    try:
        timings = [timed_completion(gateway) for _ in range(5)]
        assert all(status == 200 for status, _ in timings), timings
        # Held up, they would have waited for the stalled bodies' body timeout.
        assert max(t for _, t in timings) < BODY_TIMEOUT_S - 3.0, timings
    finally:
        for s in stalled:
            s.close()


def test_many_concurrent_connections_get_200_or_503_and_idle_ones_do_not_block(gateway):
    idle = [socket.create_connection(("127.0.0.1", gateway.port)) for _ in range(64)]
    try:
        body = {"model": "tiny", "prompt": "To be", "max_tokens": 8, "temperature": 0}

        def one(_: int) -> int:
            r = httpx.post(gateway.url + "/v1/completions", json=body, headers=auth(), timeout=60)
            check(r)
            return r.status_code

        with ThreadPoolExecutor(max_workers=96) as pool:  # (each request times out in 60 s)
            statuses = list(pool.map(one, range(192)))
        PROBE.sent["concurrent"] += len(statuses)
        assert set(statuses) <= {200, 503}, Counter(statuses)
        assert statuses.count(200) >= 64, Counter(statuses)
    finally:
        for s in idle:
            s.close()
    status, _ = timed_completion(gateway)  # (within its request timeout: not stuck)
    assert status == 200


def wait_until_idle(rel, gateway: Gateway, replicas: list[Replica], what: str) -> None:
    """Until the gateway counts nothing in flight and no replica runs or queues a request."""

    def idle() -> bool:
        return gateway.in_flight() == (0, 0) and all(
            h["running"] == 0 and h["queue_depth"] == 0 for h in (r.health() for r in replicas)
        )

    rel.wait_until(idle, 30, what)


def test_a_client_that_leaves_mid_stream_cancels_the_replicas_work(rel, gateway, replicas):
    before = cancelled(gateway, replicas)
    body = {"model": "tiny", "prompt": "ROMEO:", "max_tokens": LONG, "temperature": 0}
    for path, extra in [
        ("/v1/completions", {}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Speak."}]}),
    ] * 2:
        payload = {**body, **extra, "stream": True}
        if extra:
            payload.pop("prompt")
        with httpx.stream(
            "POST", gateway.url + path, json=payload, headers=auth(), timeout=REQUEST_TIMEOUT_S
        ) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # read one event, then hang up
        PROBE.sent["hand-written"] += 1
    wait_until_idle(rel, gateway, replicas, "cancelled streams still counted or generating")
    assert cancelled(gateway, replicas) == (before[0] + 4, before[1] + 4)


def test_a_client_that_leaves_before_its_json_reply_cancels_the_replicas_work(
    rel, gateway, replicas
):
    before = cancelled(gateway, replicas)
    # Greedy: sampled, it could end at an early EOS before it was seen routed.
    request = {"model": "tiny", "prompt": "KING:", "max_tokens": LONG, "temperature": 0}
    body = json.dumps(request).encode()
    for _ in range(2):
        with raw_request(gateway, f"Content-Length: {len(body)}\r\n".encode(), body):
            # Left as soon as the gateway has routed it (the replica is generating by then).
            rel.wait_until(lambda: gateway.in_flight()[0] > 0, 10, "the request to be routed")
    wait_until_idle(rel, gateway, replicas, "an abandoned request still counted or generating")
    assert cancelled(gateway, replicas) == (before[0] + 2, before[1] + 2)


# ---- upstream faults ----------------------------------------------------------------------------


def stream_to_end(gateway: Gateway, started: threading.Barrier) -> tuple[str, list[str]] | None:
    """One long streamed completion: (replica it went to, its data payloads to the end), or None
    if it was refused (with a well-formed error)."""
    body = {"model": "tiny", "prompt": "ROMEO:", "max_tokens": LONG, "temperature": 0}
    url = gateway.url + "/v1/completions"
    with httpx.stream(
        "POST", url, json={**body, "stream": True}, headers=auth(), timeout=REQUEST_TIMEOUT_S
    ) as r:
        if r.status_code != 200:
            r.read()
            check(r)
            started.wait(REQUEST_TIMEOUT_S)
            return None
        lines = (ln[6:] for ln in r.iter_lines() if ln.startswith("data: "))
        payloads = [next(lines)]
        started.wait(REQUEST_TIMEOUT_S)  # every stream is generating: now the kill
        payloads += list(lines)  # must end, not hang (the read timeout would fail the test)
        return r.headers[ROUTED], payloads


def assert_stream_ended_cleanly(payloads: list[str]) -> str:
    """A stream ends with [DONE] after a normal finish or an OpenAI error chunk; which one."""
    assert payloads[-1] == "[DONE]", payloads[-3:]
    final = json.loads(payloads[-2])
    reason = final["choices"][0]["finish_reason"]
    if reason == "error":
        assert set(final["error"]) == {"message", "type", "param", "code"}, final
        assert final["error"]["code"] == "replica_failed"
    else:
        assert reason in ("stop", "length"), final
    return reason


def test_a_replica_killed_while_serving_is_failed_over_and_marked_unhealthy(rel, gateway, replicas):
    victim, survivor = replicas
    assert gateway.health()["healthy_replicas"] == 2, "this test needs both replicas"
    failovers = gateway.metric("collm_gateway_failovers_total")
    json_body = {"model": "tiny", "prompt": "KING:", "max_tokens": LONG, "temperature": 0}

    def complete(_: int) -> httpx.Response:
        r = httpx.post(gateway.url + "/v1/completions", json=json_body, headers=auth(), timeout=60)
        return check(r)

    streams, requests = 4, 8
    started = threading.Barrier(streams + 1)
    with ThreadPoolExecutor(max_workers=streams + requests) as pool:
        stream_futures = [pool.submit(stream_to_end, gateway, started) for _ in range(streams)]
        json_futures = [pool.submit(complete, i) for i in range(requests)]
        started.wait(REQUEST_TIMEOUT_S)  # every stream has its first token
        rel.wait_until(
            lambda: gateway.replica(victim.name)["in_flight"] >= 2, 10, "work on the victim"
        )
        victim.proc.kill()  # SIGKILL by pid, in the middle of its streams and requests
        stream_results = [f.result(timeout=2 * REQUEST_TIMEOUT_S) for f in stream_futures]
        replies = [f.result(timeout=2 * REQUEST_TIMEOUT_S) for f in json_futures]
    PROBE.sent["upstream fault"] += streams + requests

    # Streams end with [DONE]: broken ones (on the victim only) after an OpenAI error chunk.
    reasons: Counter[str] = Counter()
    for result in stream_results:
        if result is None:
            reasons["refused"] += 1
            continue
        name, payloads = result
        reason = assert_stream_ended_cleanly(payloads)
        assert reason != "error" or name == victim.name, (name, reason)
        reasons[reason] += 1
    # JSON requests: a completion (failed over if the victim had it) or a clean 503.
    assert {r.status_code for r in replies} <= {200, 503}, [r.status_code for r in replies]
    failed_over = gateway.metric("collm_gateway_failovers_total") - failovers
    assert reasons["error"] + failed_over >= 1, "the kill hit nothing in flight"
    print(f"\nkill: streams {dict(reasons)}, JSON requests failed over {failed_over:.0f}")

    rel.wait_until(
        lambda: not gateway.replica(victim.name)["healthy"], 10, "the victim marked unhealthy"
    )
    for _ in range(3):  # nothing more goes to the dead replica
        r = post_raw(gateway, "/v1/completions", (COMPLETION % '"temperature": 0').encode())
        assert r.status_code == 200 and r.headers[ROUTED] == survivor.name
    assert gateway.in_flight() == (0, 0)


def assert_unavailable(r: httpx.Response) -> None:
    assert_error(r, 503, "overloaded")
    assert int(r.headers["retry-after"]) >= 1


def test_with_every_replica_down_requests_get_a_503_with_retry_after(rel, gateway, replicas):
    replicas[1].proc.kill()  # the survivor of the test above: now nothing listens
    completion = COMPLETION % '"temperature": 0'
    for _ in range(2):  # the first may find out by being refused, the second by the pool
        started = time.monotonic()
        assert_unavailable(post_raw(gateway, "/v1/completions", completion.encode()))
        assert time.monotonic() - started < 10.0
    stream = COMPLETION % '"stream": true'
    assert_unavailable(post_raw(gateway, "/v1/completions", stream.encode()))
    chat = b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}'
    assert_unavailable(post_raw(gateway, "/v1/chat/completions", chat))
    PROBE.sent["hand-written"] += 1
    assert_unavailable(check(httpx.get(gateway.url + "/v1/models", headers=auth(), timeout=30)))
    rel.wait_until(lambda: gateway.health()["healthy_replicas"] == 0, 10, "all marked unhealthy")
    health = httpx.get(gateway.url + "/health", timeout=5)
    assert health.status_code == 503 and health.json()["status"] == "unavailable"
    assert gateway.in_flight() == (0, 0)


def test_a_restarted_replica_is_taken_back(rel, module_procs, gateway, replicas):
    back = replicas[0]
    back.proc = module_procs.spawn(f"{back.name}-restarted", back.cmd, back.env)
    back.proc.wait_http(back.url + "/health")
    rel.wait_until(lambda: gateway.replica(back.name)["healthy"], 10, "the replica taken back")
    r = post_raw(gateway, "/v1/completions", (COMPLETION % '"temperature": 0').encode())
    assert r.status_code == 200 and r.headers[ROUTED] == back.name


# ---- afterwards ---------------------------------------------------------------------------------


def test_a_stalled_request_body_is_dropped_after_a_timeout(stalled_from_the_start):
    s, opened_at = stalled_from_the_start
    s.settimeout(max(0.1, opened_at + STALLED_BODY_BOUND_S - time.monotonic()))
    try:
        status, body = check_raw(s)  # a 408 with an OpenAI error body, then closed
    except TimeoutError:
        pytest.fail(f"connection still open {STALLED_BODY_BOUND_S:.0f}s after its body stalled")
    error = json.loads(body)["error"]
    assert status == 408 and error["code"] == "body_timeout", body
    assert f"not received within {BODY_TIMEOUT_S:g} s" in error["message"], body  # --body-timeout
    assert s.recv(1) == b""


def test_the_gateway_still_serves_after_everything_and_logged_no_unexpected_error(gateway):
    assert gateway.proc.alive(), "the gateway process died"
    status, _ = timed_completion(gateway)  # (within its request timeout: not stuck)
    assert status == 200
    log = gateway.proc.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]
    assert "unexpected error while serving a request" not in log
    assert "ERROR" not in log, log[-3000:]
    # Every client socket is closed; only the keep-alive pool to the replicas (64) may stay.
    assert gateway.open_fds() <= gateway.fds_at_start + KEEPALIVE_CONNECTIONS + 4
    print(f"\n{PROBE.report()}")
