"""Failover: replicas die (killed by pid) while the gateway keeps answering cleanly."""

import json

import httpx
import pytest
from gateway_harness import GATEWAY_KEY, name_of, start_replicas, wait_for

from collm_fl.launch import free_port
from collm_fl.policies.routing import choose_replica
from collm_fl.replica.metrics import SLO

AUTH = {"Authorization": f"Bearer {GATEWAY_KEY}"}
BODY = {"model": "tiny", "prompt": "ROMEO:", "max_tokens": 4, "temperature": 0}


def complete(gw) -> httpx.Response:
    return httpx.post(gw.url + "/v1/completions", json=BODY, headers=AUTH, timeout=60)


@pytest.fixture(scope="module")
def pair(start_module_replica, tmp_path_factory) -> list:
    """Two replicas for this module's killings (replica start-up is the slow part of these tests):
    the failover test kills one, then the mid-stream test kills one that is left."""
    return start_replicas(start_module_replica, tmp_path_factory.mktemp("failover"), 2)


def alive(replicas: list) -> list:
    return [r for r in replicas if r.proc.poll() is None]


def assert_503_with_retry_after(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    assert r.headers["Retry-After"].isdigit()
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == "overloaded"


def test_a_killed_replica_is_failed_over_and_shown_unhealthy(pair, start_gateway):
    assert len(alive(pair)) == 2, "this test must run before the mid-stream one"
    a, b = pair
    by_name = {name_of(a): a, name_of(b): b}
    # Slow polling: this gateway learns of the death from the refused request itself ...
    slow = start_gateway([a.url, b.url], poll_interval_s=3600)
    # ... and this one from its health polls.
    polling = start_gateway([a.url, b.url], poll_interval_s=0.1)
    assert complete(slow).status_code == 200
    victim_name = choose_replica(slow.pool.views(), 1, BODY["max_tokens"], SLO())
    assert victim_name is not None
    victim = by_name.pop(victim_name)
    (survivor_name,) = by_name
    victim.stop()

    r = complete(slow)
    assert r.status_code == 200, r.text
    assert r.headers["X-Routed-To"] == survivor_name
    assert slow.metric("collm_gateway_failovers_total", replica=victim_name) == 1
    assert slow.replica(victim_name)["healthy"] is False
    for _ in range(3):  # no more attempts on the dead replica
        assert complete(slow).headers["X-Routed-To"] == survivor_name
    assert slow.metric("collm_gateway_failovers_total") == 1

    wait_for(lambda: not polling.replica(victim_name)["healthy"], 10, "poll missed the death")
    assert polling.health()["status"] == "ok"
    assert complete(polling).headers["X-Routed-To"] == survivor_name


def test_no_live_replica_means_503_with_retry_after(start_gateway):
    gw = start_gateway([f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"])
    health = httpx.get(gw.url + "/health", timeout=5)
    assert health.status_code == 503 and health.json()["status"] == "unavailable"
    assert_503_with_retry_after(complete(gw))
    stream = {**BODY, "stream": True}
    r = httpx.post(gw.url + "/v1/completions", json=stream, headers=AUTH, timeout=60)
    assert_503_with_retry_after(r)
    assert_503_with_retry_after(httpx.get(gw.url + "/v1/models", headers=AUTH, timeout=60))


def test_a_replica_dying_mid_stream_ends_the_stream_with_an_error_then_done(pair, start_gateway):
    replica = alive(pair)[0]
    gw = start_gateway([replica.url], poll_interval_s=3600)  # the death goes unnoticed by polls
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Speak, friend."}],
        "max_tokens": 450,  # seconds of decoding: the replica dies long before the end
        "temperature": 0,
        "stream": True,
    }
    url = gw.url + "/v1/chat/completions"
    payloads: list[str] = []
    with httpx.stream("POST", url, json=body, headers=AUTH, timeout=30) as r:
        assert r.status_code == 200
        lines = (ln[6:] for ln in r.iter_lines() if ln.startswith("data: "))
        payloads += [next(lines) for _ in range(3)]
        replica.proc.kill()  # SIGKILL by pid: the stream just breaks
        payloads += list(lines)  # must end, not hang (the read timeout would fail the test)

    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    final = chunks[-1]
    assert final["choices"][0]["finish_reason"] == "error"
    assert final["error"]["code"] == "replica_failed" and final["error"]["message"]
    assert final["id"] == chunks[0]["id"] and "adapter_version" in final
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    tokens = sum(1 for c in chunks if c["choices"][0]["delta"].get("content"))
    assert 0 < tokens < 450
    assert gw.metric("collm_gateway_requests_total", outcome="stream_error") == 1
    wait_for(lambda: gw.health()["replicas"][0]["in_flight"] == 0, 10, "request still in flight")

    # The next request finds nothing listening: its attempt is refused, and it gets a clean 503.
    assert_503_with_retry_after(complete(gw))
    assert gw.metric("collm_gateway_failovers_total", reason="ConnectError") == 1
    assert gw.health()["status"] == "unavailable"
