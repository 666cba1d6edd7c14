"""The replica's HTTP APIs under hostile input, against a real `collm replica --data none` process.

The property: every response is a 2xx or a well-formed 4xx/503 with an OpenAI error body
``{"error": {"message", "type", "param", "code"}}``, never a 5xx, never a hang; and the server
still answers afterwards. Schemathesis fuzzes every operation of ``/openapi.json`` (positive and
negative cases); hand-written cases cover what a schema cannot express (bytes that are not JSON or
not UTF-8, bodies over the limit, slow and stalled clients, many connections at once).
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
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
    stalled_body,
)
from safetensors.numpy import save as st_save

from collm_fl.adapters import LoraSpec
from collm_fl.replica.wire import encode_adapter

PROBE = Probe()  # the requests sent by kind and responses by status: reported by the last test
STATS, STATUSES = PROBE.sent, PROBE.statuses
check, post_raw, timed_completion = PROBE.check, PROBE.post_raw, PROBE.timed_completion
check_raw = PROBE.check_raw


@pytest.fixture(scope="module")
def replica(start_module_replica):
    return start_module_replica("--data", "none", api_key=API_KEY)


SPARE_BODY_TIMEOUT_S = 2


@pytest.fixture(scope="module")
def spare_replica(start_module_replica):
    """A second replica for inputs that hit a known 500 (the main replica's log stays clean), with
    a short body timeout (``--body-timeout``, 30 s by default)."""
    return start_module_replica(
        "--data", "none", "--body-timeout", str(SPARE_BODY_TIMEOUT_S), api_key=API_KEY
    )


@pytest.fixture(scope="module", autouse=True)
def stalled_from_the_start(replica) -> Iterator[tuple[socket.socket, float]]:
    """A request whose body stops after 8 of 100 bytes, opened before the module's first test; a
    later test checks it was dropped (the 30 s body timeout runs while the other tests do)."""
    with stalled_body(replica, PROBE) as opened:
        yield opened


@pytest.fixture(scope="module")
def api_schema(replica):
    # Imported here: without schemathesis (the `dev` extra) only the fuzzing tests skip.
    schemathesis = pytest.importorskip("schemathesis")
    return schemathesis.openapi.from_url(replica.url + "/openapi.json")


# ---- schema-driven fuzzing ----------------------------------------------------------------------


def test_the_served_schema_has_exactly_the_fuzzed_operations(api_schema):
    served = sorted(op.ok().label for op in api_schema.get_all_operations())
    assert served == sorted(OPERATIONS)  # a new endpoint must be added to the fuzzing here


@pytest.mark.slow
@pytest.mark.parametrize("label,mode", FUZZ_CASES)
def test_fuzzed_requests_get_a_2xx_or_a_well_formed_error(api_schema, label, mode):
    """Schemathesis cases from the served /openapi.json (loaded at run time, not import time)."""
    operation = api_schema.find_operation_by_label(label)
    assert operation is not None, label
    fuzz_operation(PROBE, operation, mode)


# ---- hand-written: bodies -----------------------------------------------------------------------


@pytest.mark.parametrize("body", MALFORMED_JSON, ids=range(len(MALFORMED_JSON)))
def test_malformed_json_is_a_400(replica, body):
    r = post_raw(replica, "/v1/completions", body)
    assert_error(r, 400)


@pytest.mark.parametrize("body", NOT_AN_OBJECT)
def test_json_that_is_not_an_object_is_a_400(replica, body):
    assert_error(post_raw(replica, "/v1/chat/completions", body), 400)


@pytest.mark.parametrize("fields", BAD_PARAMETERS)
def test_out_of_range_or_wrongly_typed_parameters_are_a_400(replica, fields):
    r = post_raw(replica, "/v1/completions", (COMPLETION % fields).encode())
    assert_error(r, 400)


@pytest.mark.parametrize("body", INVALID_CHAT_BODIES, ids=range(9))
def test_invalid_chat_bodies_are_a_400(replica, body):
    assert_error(post_raw(replica, "/v1/chat/completions", json.dumps(body).encode()), 400)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_unknown_models_are_a_404(replica, path):
    body = {"model": "gpt-99", "prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}
    body.pop("messages" if path == "/v1/completions" else "prompt")
    r = post_raw(replica, path, json.dumps(body).encode())
    assert_error(r, 404, "model_not_found")
    assert r.json()["error"]["param"] == "model"


@pytest.mark.parametrize("path,body", INVALID_UTF8, ids=INVALID_UTF8_IDS)
def test_invalid_utf8_is_a_4xx_not_a_crash(replica, path, body):
    r = post_raw(replica, path, body)
    assert 400 <= r.status_code < 500


@pytest.mark.parametrize("body", LONE_SURROGATE_PROMPTS, ids=["string", "list"])
def test_an_escaped_lone_surrogate_in_a_prompt_is_a_400(spare_replica, body):
    own = spare_replica
    STATS["hand-written"] += 1
    r = httpx.post(
        own.url + "/v1/completions",
        content=body,
        headers={**auth(), "Content-Type": "application/json"},
        timeout=REQUEST_TIMEOUT_S,
    )
    assert r.status_code == 400, r.text
    check(r)


@pytest.mark.parametrize("content_type", WRONG_CONTENT_TYPES)
def test_wrong_content_type_is_a_4xx(replica, content_type):
    body = COMPLETION % '"seed": 1'
    r = post_raw(replica, "/v1/completions", body.encode(), content_type=content_type)
    assert 400 <= r.status_code < 500


def test_huge_max_tokens_is_refused_before_any_generation(replica):
    body = COMPLETION.replace('"max_tokens": 2, ', "") % '"max_tokens": 1000000'
    started = time.monotonic()
    assert_error(post_raw(replica, "/v1/completions", body.encode()), 400)
    assert time.monotonic() - started < 5.0


def test_a_prompt_far_over_the_context_is_refused_fast(replica):
    body = json.dumps({"model": "tiny", "prompt": "ab " * 60_000}).encode()  # 180 kB, 60k tokens
    started = time.monotonic()
    assert_error(post_raw(replica, "/v1/completions", body), 400, "context_length_exceeded")
    assert time.monotonic() - started < 10.0


def test_a_body_over_one_megabyte_is_a_413(replica):
    body = json.dumps({"model": "tiny", "prompt": "a" * 1_100_000}).encode()
    assert_error(post_raw(replica, "/v1/completions", body), 413, "body_too_large")


def test_a_content_length_over_the_limit_is_a_413_without_reading_the_body(replica):
    with socket.create_connection(("127.0.0.1", replica.port), timeout=REQUEST_TIMEOUT_S) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 50000000\r\n\r\n{"
        )
        head = s.recv(4096)
    STATS["hand-written"] += 1
    assert head.startswith(b"HTTP/1.1 413"), head[:200]


def test_a_chunked_body_over_one_megabyte_is_a_413(replica):
    def chunks():
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(12):
            yield b"a" * 100_000
        yield b'"}'

    STATS["hand-written"] += 1
    r = check(
        httpx.post(
            replica.url + "/v1/completions",
            content=chunks(),
            headers={**auth(), "Content-Type": "application/json"},
            timeout=REQUEST_TIMEOUT_S,
        )
    )
    assert r.status_code == 413, r.text


def test_a_completion_still_works_after_the_bad_bodies(replica):
    r = post_raw(replica, "/v1/completions", (COMPLETION % '"temperature": 0').encode())
    assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None


# ---- hand-written: connections ------------------------------------------------------------------


def test_a_client_that_dribbles_its_body_does_not_hold_up_others(replica):
    body = (COMPLETION % '"temperature": 0').encode()
    s = open_partial_request(replica, len(body), b"")
    others_done = threading.Event()
    result: dict[str, object] = {}

    def dribble() -> None:
        try:
            for i in range(len(body) - 1):  # one byte every 20 ms: the slow client under test
                s.sendall(body[i : i + 1])
                time.sleep(0.02)
            others_done.wait(REQUEST_TIMEOUT_S)  # the last byte only once the others are served
            s.sendall(body[-1:])
            result["head"] = s.recv(4096)
        except OSError as e:
            result["error"] = e

    slow = threading.Thread(target=dribble)
    slow.start()
    try:
        # While the slow body trickles in (and is never complete), others are served (held up,
        # they would time out: its last byte is sent only once they are served).
        timings = [timed_completion(replica) for _ in range(5)]
        assert all(status == 200 for status, _ in timings), timings
    finally:
        others_done.set()
        slow.join(timeout=REQUEST_TIMEOUT_S)
        s.close()
    assert not slow.is_alive()
    assert "error" not in result, result
    assert bytes(result["head"]).startswith(b"HTTP/1.1 200"), result  # and it is served too


def test_a_client_that_stops_sending_does_not_hold_up_others(replica):
    stalled = [open_partial_request(replica, 100, b'{"model"') for _ in range(20)]
    try:
        timings = [timed_completion(replica) for _ in range(5)]
        assert all(status == 200 for status, _ in timings), timings
        # Held up, they would have waited for the stalled bodies' 30 s timeout.
        assert max(t for _, t in timings) < 20.0, timings
    finally:
        for s in stalled:
            s.close()


@pytest.mark.parametrize("api", ["openai", "control"])
def test_the_body_timeout_flag_sets_both_apis_timeout(spare_replica, api):
    port, key = (
        (spare_replica.port, API_KEY)
        if api == "openai"
        else (spare_replica.control_port, spare_replica.token)
    )
    path = "/v1/completions" if api == "openai" else "/control/train"
    s = open_partial_request(spare_replica, 100, b'{"model"', path=path, port=port, key=key)
    STATS["raw socket"] += 1
    try:
        s.settimeout(SPARE_BODY_TIMEOUT_S + 10.0)  # (not the default's 30 s)
        status, body = check_raw(s)
        closed = s.recv(1) == b""
    finally:
        s.close()
    error = json.loads(body)["error"]
    assert status == 408 and error["code"] == "body_timeout", body
    assert f"not received within {SPARE_BODY_TIMEOUT_S:g} s" in error["message"], body
    assert closed


def test_a_body_dribbled_past_the_timeout_is_a_408_though_no_read_waited_that_long(
    spare_replica,
):
    # A byte every 0.4 s: no single read waits the 2 s, and with a timeout per read this client
    # held its connection and a server task for as long as it liked (here 100 bytes: 40 s).
    s = open_partial_request(spare_replica, 100, b"{")
    STATS["raw socket"] += 1
    answered = threading.Event()

    def dribble() -> None:
        with contextlib.suppress(OSError):  # (the server closes the socket after its 408)
            for _ in range(99):
                if answered.wait(0.4):
                    return
                s.sendall(b" ")

    sender = threading.Thread(target=dribble)
    sender.start()
    try:
        s.settimeout(SPARE_BODY_TIMEOUT_S + 10.0)  # (well before the 40 s the body would take)
        status, body = check_raw(s)
    finally:
        answered.set()
        sender.join(timeout=10)
        s.close()
    error = json.loads(body)["error"]
    assert status == 408 and error["code"] == "body_timeout", body


def test_many_concurrent_connections_get_200_or_503_and_idle_ones_do_not_block(replica):
    idle = [socket.create_connection(("127.0.0.1", replica.port)) for _ in range(64)]
    try:
        body = {"model": "tiny", "prompt": "To be", "max_tokens": 8, "temperature": 0}

        def one(_: int) -> int:
            r = httpx.post(replica.url + "/v1/completions", json=body, headers=auth(), timeout=60.0)
            check(r)
            return r.status_code

        with ThreadPoolExecutor(max_workers=96) as pool:  # (each request times out in 60 s)
            statuses = list(pool.map(one, range(192)))
        STATS["hand-written"] += len(statuses)
        assert set(statuses) <= {200, 503}, Counter(statuses)
        assert statuses.count(200) >= 64, Counter(statuses)
    finally:
        for s in idle:
            s.close()
    status, _ = timed_completion(replica)  # (within its request timeout: not stuck)
    assert status == 200


def test_a_client_that_leaves_mid_stream_frees_its_engine_row(replica):
    body = {"model": "tiny", "prompt": "ROMEO:", "max_tokens": 400, "temperature": 0}
    for _ in range(4):
        with httpx.stream(
            "POST",
            replica.url + "/v1/completions",
            json={**body, "stream": True},
            headers=auth(),
            timeout=REQUEST_TIMEOUT_S,
        ) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # read one event, then hang up
        STATS["hand-written"] += 1

    def idle() -> bool:
        h = httpx.get(replica.url + "/health", timeout=5).json()
        return h["running"] == 0 and h["queue_depth"] == 0

    deadline = time.monotonic() + 30
    while not idle():
        assert time.monotonic() < deadline, "cancelled streams still hold engine rows"
        time.sleep(0.1)  # polling the server's reported state, bounded above


# ---- the control API ----------------------------------------------------------------------------

CONTROL_CALLS = [
    ("PUT", "/control/adapters/1", b"x"),
    ("POST", "/control/train", b'{"round": 1, "steps": 1, "learning_rate": 0.1, "deadline_s": 1}'),
    ("GET", "/control/load", None),
    ("POST", "/control/load/reset", None),
    ("PUT", "/control/share", b'{"share": 0.5}'),
    ("POST", "/control/rollback", b'{"version": 0}'),
    ("GET", "/control/status", None),
]


def control_url(replica, path: str) -> str:
    return f"http://{replica.control_address}{path}"


@pytest.mark.parametrize(
    "header",
    [None, "Bearer wrong-token", "Bearer", "Basic dGVzdC10b2tlbg==", "test-token", "Bearer test"],
    ids=["none", "wrong", "empty", "basic", "no-scheme", "prefix"],
)
@pytest.mark.parametrize("method,path,body", CONTROL_CALLS, ids=[c[1] for c in CONTROL_CALLS])
def test_control_calls_without_the_right_token_are_a_401(replica, header, method, path, body):
    headers = {"Authorization": header} if header is not None else {}
    STATS["control"] += 1
    r = check(
        httpx.request(method, control_url(replica, path), content=body, headers=headers, timeout=30)
    )
    assert_error(r, 401, "invalid_control_token")
    assert r.headers["www-authenticate"] == "Bearer"


def garbage_adapters(shapes: dict[str, tuple[int, ...]]) -> dict[str, bytes]:
    cfg = LoraSpec().to_peft_config_dict("tiny")
    rng = np.random.default_rng(0)
    good = {k: (rng.standard_normal(s) * 0.01).astype(np.float32) for k, s in shapes.items()}
    first = next(iter(good))
    nan = {**good, first: np.full(shapes[first], np.nan, np.float32)}
    inf = {**good, first: np.full(shapes[first], np.inf, np.float32)}
    missing = {k: v for k, v in good.items() if k != first}
    wrong_rank = {
        k: np.zeros((s[0] + 1, s[1]) if "lora_A" in k else s, np.float32) for k, s in shapes.items()
    }
    blob = encode_adapter(good, cfg, None)
    return {
        "empty": b"",
        "not-safetensors": b"definitely not a tensor file",
        "random-bytes": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "header-too-long": (10**12).to_bytes(8, "little") + blob[8:],
        "header-zero": (0).to_bytes(8, "little") + blob[8:],
        "truncated": blob[: len(blob) // 2],
        "header-not-json": (8).to_bytes(8, "little") + b"{{{{{{{{",
        "non-lora-keys": encode_adapter({"model.embed.weight": np.zeros((4, 4), np.float32)}, cfg),
        "nan-values": encode_adapter(nan, cfg),
        "inf-values": encode_adapter(inf, cfg),
        "missing-key": encode_adapter(missing, cfg),
        "wrong-rank": encode_adapter(wrong_rank, cfg),
        "empty-state": encode_adapter({}, cfg),
        "config-wrong-rank": encode_adapter(good, LoraSpec(rank=4).to_peft_config_dict("tiny")),
        "config-not-lora": encode_adapter(good, {**cfg, "peft_type": "PREFIX_TUNING"}),
        "config-no-targets": encode_adapter(good, {"r": 8, "lora_alpha": 16}),
        "config-bad-rank": encode_adapter(good, {**cfg, "r": "eight"}),
        "version-mismatch": encode_adapter(good, cfg, 7),
        "bare-adapter-file": st_save(good),  # as PEFT saves it: no config in the header
    }


def test_garbage_adapter_pushes_are_a_400_and_serving_is_unchanged(replica, tiny_lora_shapes):
    headers = {"Authorization": f"Bearer {replica.token}"}
    before = httpx.get(control_url(replica, "/control/status"), headers=headers).json()
    results = {}
    for name, blob in garbage_adapters(tiny_lora_shapes).items():
        STATS["control"] += 1
        r = check(
            httpx.put(
                control_url(replica, "/control/adapters/1"),
                content=blob,
                headers=headers,
                timeout=60,
            )
        )
        results[name] = (r.status_code, r.json()["error"]["code"] if r.status_code >= 400 else "")
    assert all(status == 400 for status, _ in results.values()), results
    after = httpx.get(control_url(replica, "/control/status"), headers=headers).json()
    assert after["served_version"] == before["served_version"]
    assert after["stored_versions"] == before["stored_versions"]


@pytest.mark.parametrize(
    "method,path,body",
    [
        ("PUT", "/control/adapters/-1", b"x"),
        ("PUT", "/control/adapters/one", b"x"),
        ("PUT", "/control/adapters/1?run=../../etc", b"x"),
        ("PUT", "/control/share", b'{"share": NaN}'),
        ("PUT", "/control/share", b'{"share": 1.5}'),
        ("PUT", "/control/share", b'{"share": 0.5, "extra": 1}'),
        ("POST", "/control/rollback", b'{"version": -3}'),
        ("POST", "/control/rollback", b"{"),
        ("POST", "/control/train", b'{"round": 1, "steps": -1, "learning_rate": 0.1}'),
        (
            "POST",
            "/control/train",
            b'{"round": 1, "steps": 1, "learning_rate": Infinity, "deadline_s": 1}',
        ),
        ("GET", "/control/load?reset=maybe", None),
        ("GET", "/control/load?reset=true", None),
    ],
)
def test_bad_control_parameters_are_a_4xx(replica, method, path, body):
    headers = {"Authorization": f"Bearer {replica.token}", "Content-Type": "application/json"}
    STATS["control"] += 1
    r = check(
        httpx.request(method, control_url(replica, path), content=body, headers=headers, timeout=30)
    )
    assert 400 <= r.status_code < 500, r.text


def test_a_rejected_push_leaves_no_version_on_disk(replica, tiny_lora_shapes):
    headers = {"Authorization": f"Bearer {replica.token}"}
    # A well-formed LoRA (A and B agree on the rank) whose dimensions are not the model's.
    wrong_dims = {
        k: np.zeros((8, s[1] + 3) if "lora_A" in k else (s[0] + 3, 8), np.float32)
        for k, s in tiny_lora_shapes.items()
    }
    blob = encode_adapter(wrong_dims, LoraSpec().to_peft_config_dict("tiny"))
    r = httpx.put(control_url(replica, "/control/adapters/41"), content=blob, headers=headers)
    assert_error(r, 400, "invalid_adapter")
    status = httpx.get(control_url(replica, "/control/status"), headers=headers).json()
    assert 41 not in status["stored_versions"], status["stored_versions"]


# ---- afterwards ---------------------------------------------------------------------------------

STALLED_BODY_BOUND_S = 40.0  # the body-read timeout (30 s) plus slack


def test_a_stalled_request_body_is_dropped_after_a_timeout(stalled_from_the_start):
    """The request opened before the module's first test, its body stalled: a 408, then closed."""
    s, opened_at = stalled_from_the_start
    s.settimeout(max(0.1, opened_at + STALLED_BODY_BOUND_S - time.monotonic()))
    try:
        status, body = check_raw(s)
    except TimeoutError:
        pytest.fail(f"connection still open {STALLED_BODY_BOUND_S:.0f}s after its body stalled")
    assert status == 408 and json.loads(body)["error"]["code"] == "body_timeout", body
    assert s.recv(1) == b""


def test_the_replica_is_healthy_after_everything_and_logged_no_unexpected_error(replica):
    assert replica.proc.poll() is None, "the replica process died"
    h = httpx.get(replica.url + "/health", timeout=5)
    assert h.status_code == 200 and h.json()["status"] == "ok"
    status, _ = timed_completion(replica)  # (within its request timeout: not stuck)
    assert status == 200
    log = replica.log_path.read_text(errors="replace")
    assert "unexpected error while serving a request" not in log
    assert "Traceback" not in log, log[-3000:]
    print(f"\nchecked {STATUSES.total()} responses: {dict(sorted(STATUSES.items()))}")
    print(f"requests by kind: {dict(STATS)}")
