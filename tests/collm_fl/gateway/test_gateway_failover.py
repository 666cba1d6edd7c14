"""Failover: replicas die (killed by pid) or hang (SIGSTOP) while the gateway answers cleanly."""

import json
import os
import signal
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from gateway_harness import GATEWAY_KEY, name_of, start_replicas, wait_for

from collm_fl.launch import free_port
from collm_fl.policies.routing import choose_replica
from collm_fl.replica.metrics import SLO

AUTH = {"Authorization": f"Bearer {GATEWAY_KEY}"}
BODY = {"model": "tiny", "prompt": "ROMEO:", "max_tokens": 4, "temperature": 0}
LONG = {**BODY, "max_tokens": 480}  # seconds of decoding: in flight when the replica freezes
HANG_BOUND_S = 60.0  # the client's timeout; a frozen replica used to hold requests for 300 s


def complete(gw) -> httpx.Response:
    return httpx.post(gw.url + "/v1/completions", json=BODY, headers=AUTH, timeout=60)


@pytest.fixture(scope="module")
def trio(start_module_replica, tmp_path_factory) -> list:
    """Three replicas for this module's faults (replica start-up is the slow part of these tests):
    the SIGSTOP test freezes then stops one, the failover test kills one of the two left, then the
    mid-stream test kills the last."""
    return start_replicas(start_module_replica, tmp_path_factory.mktemp("failover"), 3)


def alive(replicas: list) -> list:
    return [r for r in replicas if r.proc.poll() is None]


def assert_503_with_retry_after(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    assert r.headers["Retry-After"].isdigit()
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == "overloaded"


def run_to_the_end(gw, stream: bool) -> tuple[int, list[str]]:
    """One long completion: its status and, for a stream, its ``data:`` payloads."""
    url, body = gw.url + "/v1/completions", {**LONG, "stream": stream}
    with httpx.stream("POST", url, json=body, headers=AUTH, timeout=HANG_BOUND_S) as r:
        return r.status_code, [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]


def test_requests_on_a_frozen_replica_fail_over_or_end_cleanly(trio, start_gateway):
    assert len(alive(trio)) == 3, "this test must run first"
    a, b = trio[:2]
    by_name = {name_of(a): a, name_of(b): b}
    gw = start_gateway([a.url, b.url], poll_interval_s=0.25)
    streams = [True, False] * 4
    victim = None
    try:
        with ThreadPoolExecutor(len(streams)) as ex:
            replies = [ex.submit(run_to_the_end, gw, stream) for stream in streams]
            wait_for(
                lambda: sum(r["routed"] for r in gw.health()["replicas"]) == len(streams),
                HANG_BOUND_S,
                "the requests did not all reach a replica",
            )
            busiest = max(gw.health()["replicas"], key=lambda r: r["in_flight"])
            victim = by_name[busiest["name"]]
            os.kill(victim.proc.pid, signal.SIGSTOP)  # hangs: connections open, no answers
            results = [reply.result() for reply in replies]  # each ends within the client timeout
        frozen = gw.replica(name_of(victim))  # before SIGCONT, when it would answer again
    finally:
        if victim is not None:
            os.kill(victim.proc.pid, signal.SIGCONT)
            victim.stop()

    for stream, (status, payloads) in zip(streams, results, strict=True):
        assert status == 200  # an unanswered request was failed over to the other replica
        if stream:
            assert payloads[-1] == "[DONE]"
            final = json.loads(payloads[-2])
            if final["choices"][0]["finish_reason"] == "error":  # was mid-way on the frozen one
                assert "/health" in final["error"]["message"]
    victim_name = name_of(victim)
    abandoned = gw.metric(
        "collm_gateway_failovers_total", replica=victim_name, reason="unhealthy"
    ) + gw.metric("collm_gateway_requests_total", replica=victim_name, outcome="stream_error")
    assert abandoned >= 1
    assert frozen["healthy"] is False and frozen["in_flight"] == 0


def test_a_killed_replica_is_failed_over_and_shown_unhealthy(trio, start_gateway):
    pair = alive(trio)
    assert len(pair) == 2, "this test must run before the mid-stream one"
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


def test_a_replica_dying_mid_stream_ends_the_stream_with_an_error_then_done(trio, start_gateway):
    replica = alive(trio)[0]
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
