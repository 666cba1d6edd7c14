"""The gateway's OpenAI surface, in front of two real `collm replica` processes."""

import json
import os
import select
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from gateway_harness import (
    GATEWAY_KEY,
    REPLICA_KEY,
    GatewayServer,
    name_of,
    start_replicas,
    wait_for,
)
from hanging_replica import FIRST_EVENT, HangingReplica

from collm_fl.launch import free_port

AUTH = {"Authorization": f"Bearer {GATEWAY_KEY}"}
CHAT = [{"role": "user", "content": "Speak, friend."}]


@pytest.fixture(scope="module")
def replicas(start_module_replica, tmp_path_factory):
    return start_replicas(start_module_replica, tmp_path_factory.mktemp("gw"), 2)


@pytest.fixture(scope="module")
def gateway(replicas):
    gw = GatewayServer([r.url for r in replicas])
    yield gw
    gw.stop()


def client(gw: GatewayServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=GATEWAY_KEY, max_retries=0)


def post(gw: GatewayServer, path: str, body, key: str | None = GATEWAY_KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    kw.setdefault("timeout", 60)
    if isinstance(body, (dict, list)):
        return httpx.post(gw.url + path, json=body, headers=headers, **kw)
    headers["Content-Type"] = "application/json"
    return httpx.post(gw.url + path, content=body, headers=headers, **kw)


def routed_total(gw: GatewayServer) -> int:
    return sum(r["routed"] for r in gw.health()["replicas"])


def test_completion_reaches_a_replica_and_names_it_and_the_adapter_version(gateway, replicas):
    raw = client(gateway).completions.with_raw_response.create(
        model="tiny", prompt="ROMEO:", max_tokens=8, temperature=0
    )
    assert raw.headers["X-Routed-To"] in {name_of(r) for r in replicas}
    assert raw.headers["X-Adapter-Version"] == "base"
    out = raw.parse()
    assert out.choices[0].finish_reason in ("length", "stop")
    assert 0 < out.usage.completion_tokens <= 8
    assert "adapter_version" in out.model_extra and out.model_extra["adapter_version"] is None


def test_a_json_reply_carries_the_replicas_timing_and_teaches_the_gateway_its_ttft(replicas):
    gw = GatewayServer([r.url for r in replicas])  # its own: nothing learned yet
    try:
        wait_for(lambda: all(r["healthy"] for r in gw.health()["replicas"]), 30, "replicas")
        raw = client(gw).completions.with_raw_response.create(
            model="tiny", prompt="ROMEO:", max_tokens=8, temperature=0
        )
        timing = dict(
            (m.split(";")[0].strip(), float(m.split("dur=")[1]))
            for m in raw.headers["Server-Timing"].split(",")
        )
        assert 0 < timing["replica-ttft"] <= timing["replica-total"]
        learned = gw.replica(raw.headers["X-Routed-To"])
        assert learned["ewma_ttft_s"] is not None and learned["ewma_ttft_s"] > 0
    finally:
        gw.stop()


def test_chat_completion_through_the_gateway(gateway):
    out = client(gateway).chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=6, temperature=0
    )
    assert out.choices[0].message.role == "assistant"
    assert out.model_extra["adapter_version"] is None


def test_streaming_chat_carries_the_adapter_version_and_matches_the_json_reply(gateway):
    c = client(gateway)
    stream = c.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=12, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert all("adapter_version" in ch.model_extra for ch in chunks)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    full = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12, temperature=0)
    assert text == full.choices[0].message.content


def sse_payloads(url: str, body: dict, key: str) -> tuple[list[str], httpx.Headers]:
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.stream("POST", url, json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200
        return [line[6:] for line in r.iter_lines() if line.startswith("data: ")], r.headers


@pytest.mark.parametrize("options", [{}, {"stream_options": {"include_usage": True}}])
def test_a_stream_is_relayed_unchanged(gateway, replicas, options):
    body = {"model": "tiny", "prompt": "KING:", "max_tokens": 10, "temperature": 0, "stream": True}
    body |= options
    via_gw, headers = sse_payloads(gateway.url + "/v1/completions", body, GATEWAY_KEY)
    replica = next(r for r in replicas if name_of(r) == headers["X-Routed-To"])
    direct, _ = sse_payloads(replica.url + "/v1/completions", body, REPLICA_KEY)
    assert via_gw[-1] == direct[-1] == "[DONE]"

    def strip(payloads: list[str]) -> list[dict]:  # ids and timestamps differ per request
        return [{**json.loads(p), "id": None, "created": None} for p in payloads[:-1]]

    assert strip(via_gw) == strip(direct)
    assert ("usage" in json.loads(via_gw[-2])) == bool(options)
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["X-Adapter-Version"] == "base"


def test_models_come_from_a_healthy_replica(gateway):
    assert [m.id for m in client(gateway).models.list().data] == ["tiny"]


def test_concurrent_requests_spread_over_both_replicas(gateway, replicas):
    body = {"model": "tiny", "prompt": "JULIET:", "max_tokens": 64, "temperature": 0}
    with ThreadPoolExecutor(16) as ex:
        results = list(ex.map(lambda _: post(gateway, "/v1/completions", body), range(16)))
    assert all(r.status_code == 200 for r in results), [r.text for r in results]
    routes = {r.headers["X-Routed-To"] for r in results}
    assert routes == {name_of(r) for r in replicas}
    for name in routes:
        assert gateway.metric("collm_gateway_requests_total", replica=name, outcome="ok") > 0


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ("{not json", "invalid_json"),
        ({"model": "tiny", "prompt": "x", "frequency_penalty": 1}, "unsupported_parameter"),
        ({"model": "tiny", "prompt": "x", "logprobs": 2}, "unsupported_parameter"),
        ({"model": "tiny", "prompt": "x", "best_of": 2}, "unknown_parameter"),
        ({"model": "tiny", "prompt": "x", "max_tokens": -1}, "invalid_parameter"),
        ({"model": "tiny", "prompt": "x", "n": 3}, "invalid_parameter"),
        ({"model": "tiny"}, "invalid_parameter"),
    ],
)
def test_bad_requests_are_a_400_from_the_gateway_itself(gateway, body, code):
    before = routed_total(gateway)
    r = post(gateway, "/v1/completions", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == code
    assert "X-Routed-To" not in r.headers
    assert routed_total(gateway) == before  # never forwarded


def test_unknown_chat_field_is_refused_before_routing(gateway):
    r = post(gateway, "/v1/chat/completions", {"model": "tiny", "messages": CHAT, "tools": []})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_parameter"


def test_the_gateway_api_key_is_enforced(gateway):
    body = {"model": "tiny", "prompt": "x", "max_tokens": 2}
    for key in (None, "wrong", REPLICA_KEY):  # a replica's key is not the gateway's
        r = post(gateway, "/v1/completions", body, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(gateway.url + "/v1/models").status_code == 401
    assert httpx.get(gateway.url + "/health").status_code == 200
    assert httpx.get(gateway.url + "/metrics").status_code == 200


def test_a_replica_4xx_passes_through_without_failover(gateway):
    failovers = gateway.metric("collm_gateway_failovers_total")
    r = post(gateway, "/v1/completions", {"model": "tiny", "prompt": "word " * 2000})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "X-Routed-To" in r.headers  # the replica's answer, not the gateway's
    r = post(gateway, "/v1/chat/completions", {"model": "gpt-9", "messages": CHAT})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert gateway.metric("collm_gateway_failovers_total") == failovers


def test_health_shows_each_replica(gateway, replicas):
    health = gateway.health()
    assert health["status"] == "ok" and health["healthy_replicas"] == 2
    by_name = {r["name"]: r for r in health["replicas"]}
    assert set(by_name) == {name_of(r) for r in replicas}
    for r in by_name.values():
        assert r["healthy"] is True and r["model"] == "tiny" and r["adapter_version"] is None
        assert {"queue_depth", "running", "in_flight", "training_share", "ewma_tpot_s"} <= set(r)


def replica_requests(replica, status: str) -> float:
    """The replica's count of requests that finished with ``status``."""
    text = httpx.get(replica.url + "/metrics", timeout=5).text
    prefix = f'collm_requests_total{{status="{status}"}}'
    line = next((ln for ln in text.splitlines() if ln.startswith(prefix)), None)
    return float(line.split()[-1]) if line else 0.0


def replica_cancelled(replica) -> float:
    return replica_requests(replica, "cancelled")


def answered(sock: socket.socket) -> bool:
    """Has the gateway already sent (part of) its response on ``sock``?"""
    return bool(select.select([sock], [], [], 0)[0])


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_cancels_the_upstream_request(gateway, replicas, stream):
    before = {name_of(r): replica_cancelled(r) for r in replicas}
    body = {"model": "tiny", "prompt": "ROMEO:", "max_tokens": 450, "stream": stream}
    if stream:
        # 450 tokens of the tiny model take about half a second: on a loaded machine all of them
        # can be generated before the hang-up reaches the replica. Such a try tests nothing about
        # hang-ups: send again, at most 3 times.
        for _ in range(3):
            done = {name_of(r): replica_requests(r, "ok") for r in replicas}
            with httpx.stream(
                "POST", gateway.url + "/v1/completions", json=body, headers=AUTH
            ) as r:
                name = r.headers["X-Routed-To"]
                next(r.iter_lines())  # one event, then hang up
            replica = next(r for r in replicas if name_of(r) == name)
            wait_for(
                lambda replica=replica, cancelled=before[name], finished=done[name]: (
                    replica_cancelled(replica) > cancelled
                    or replica_requests(replica, "ok") > finished
                ),
                10,
                "the replica neither finished nor cancelled the request",
            )
            if replica_cancelled(replica) > before[name]:
                break
        else:
            pytest.fail("3 tries were all generated in full before the hang-up reached a replica")
    else:  # a raw socket, to hang up exactly when the replica is generating
        payload = json.dumps(body).encode()
        head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {GATEWAY_KEY}"
            f"\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        )
        # 450 tokens of the tiny model take about half a second: on a loaded machine the answer
        # (or a 503 from a gateway whose health polls were slow) can come back before the request
        # is seen running. Such a try tests nothing about hang-ups: send again, at most 3 times.
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", gateway.port)) as sock:
                sock.sendall(head.encode() + payload)
                wait_for(
                    lambda sock=sock: (
                        answered(sock)
                        or any(httpx.get(r.url + "/health").json()["running"] for r in replicas)
                    ),
                    10,
                    "the request never reached a replica",
                )
                if not answered(sock):
                    break  # running on a replica: hang up now
                before = {name_of(r): replica_cancelled(r) for r in replicas}
        else:
            pytest.fail("3 tries were all answered before they were seen running on a replica")
    # The replica records the request as cancelled well before 450 tokens could be generated.
    wait_for(
        lambda: sum(replica_cancelled(r) - before[name_of(r)] for r in replicas) >= 1,
        10,
        "no replica saw the request cancelled",
    )
    wait_for(
        lambda: all(r["in_flight"] == 0 for r in gateway.health()["replicas"]),
        10,
        "the gateway still counts the request in flight",
    )
    if stream:
        assert replica_cancelled(next(r for r in replicas if name_of(r) == name)) > before[name]


def start_run_gateway(urls: list[str], **kw: object) -> tuple[subprocess.Popen, str]:
    """``run_gateway`` in a process of its own (it takes the signals), once it answers; its URL."""
    port = free_port()
    args = "".join(f", {k}={v!r}" for k, v in kw.items())
    code = (
        "from collm_fl.gateway.serve import run_gateway; from collm_fl.replica.metrics import SLO; "
        f"run_gateway({urls!r}, '127.0.0.1', {port}, 'k', {REPLICA_KEY!r}, SLO(){args})"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env=dict(os.environ), stderr=subprocess.PIPE, text=True
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, "run_gateway exited early"
        try:
            return httpx.get(url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, 30, "run_gateway did not come up")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, url


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_run_gateway_serves_until_a_signal_then_exits_cleanly(replicas, sig):
    proc, url = start_run_gateway([r.url for r in replicas])
    try:
        r = httpx.post(
            url + "/v1/completions",
            json={"model": "tiny", "prompt": "A", "max_tokens": 2},
            headers={"Authorization": "Bearer k"},
            timeout=30,
        )
        assert r.status_code == 200
        proc.send_signal(sig)
        assert proc.wait(timeout=20) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_requests_still_open_at_the_end_of_the_shutdown_grace_get_the_gateways_own_end():
    # uvicorn cancels what still runs once its graceful shutdown has passed: a JSON request got
    # its plain-text 500, a stream was cut with no error chunk and no [DONE], and each logged
    # "Exception in ASGI application". The gateway ends them itself a little before that.
    hanging = HangingReplica()  # blocks every request (a stream after one event) until stopped
    proc, url = start_run_gateway([hanging.url], graceful_shutdown_s=2)
    auth = {"Authorization": "Bearer k"}
    body = {"model": "tiny", "prompt": "after", "max_tokens": 8}
    with ThreadPoolExecutor(1) as ex:
        try:
            stream_body = body | {"stream": True}
            with httpx.stream(
                "POST", url + "/v1/completions", json=stream_body, headers=auth, timeout=30
            ) as stream:
                events = (ln[6:] for ln in stream.iter_lines() if ln.startswith("data: "))
                assert json.loads(next(events)) == FIRST_EVENT
                reply = ex.submit(
                    httpx.post, url + "/v1/completions", json=body, headers=auth, timeout=30
                )
                wait_for(lambda: hanging.blocked == 2, 30, "the replica did not get both")
                os.kill(proc.pid, signal.SIGTERM)
                rest = list(events)
            r = reply.result()
            assert proc.wait(timeout=20) == 0
            stderr = proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            hanging.stop()
    assert rest[-1] == "[DONE]"
    final = json.loads(rest[-2])
    assert final["id"] == FIRST_EVENT["id"] and final["choices"][0]["finish_reason"] == "error"
    assert final["error"]["code"] == "shutting_down"
    assert r.status_code == 503 and r.headers["Retry-After"].isdigit()
    assert r.json()["error"]["code"] == "shutting_down"
    assert "Exception in ASGI application" not in stderr and "Traceback" not in stderr


def test_replicas_refusing_the_gateways_key_is_a_502_naming_the_setting_not_an_overload(replicas):
    gw = GatewayServer([r.url for r in replicas], replica_api_key="not-their-key")
    try:
        body = {"model": "tiny", "prompt": "ROMEO:", "max_tokens": 2}
        completion = post(gw, "/v1/completions", body)
        listing = httpx.get(gw.url + "/v1/models", headers=AUTH, timeout=60)  # the same for it
        for r in (completion, listing):
            assert r.status_code == 502, r.text
            err = r.json()["error"]
            assert err["code"] == "replica_auth_failed" and "--replica-api-key" in err["message"]
            assert "Retry-After" not in r.headers
    finally:
        gw.stop()
