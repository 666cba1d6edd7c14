"""A replica that hangs: its stream stalls, or its /health stops answering while requests wait.

The upstream is :class:`~hanging_replica.HangingReplica`, which sends what the prompt says, then
blocks until the test ends, so each case is a hang unless the gateway ends it. The client's
timeout is the hang bound: far below the gateway's 300 s read timeout, far above the cases' own.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from gateway_harness import GATEWAY_KEY, wait_for
from hanging_replica import ERROR_EVENT, FIRST_EVENT, HangingReplica

AUTH = {"Authorization": f"Bearer {GATEWAY_KEY}"}
HANG_BOUND_S = 30.0


@pytest.fixture()
def hanging() -> Iterator[HangingReplica]:
    replica = HangingReplica()
    yield replica
    replica.stop()


def completion(prompt: str, stream: bool) -> dict:
    return {"model": "tiny", "prompt": prompt, "max_tokens": 8, "stream": stream}


def stream_payloads(gw, prompt: str) -> list[str]:
    body = completion(prompt, stream=True)
    url = gw.url + "/v1/completions"
    with httpx.stream("POST", url, json=body, headers=AUTH, timeout=HANG_BOUND_S) as r:
        assert r.status_code == 200
        return [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]


def assert_error_chunk_then_done(payloads: list[str], message: str) -> None:
    assert payloads[-1] == "[DONE]"
    final = json.loads(payloads[-2])
    assert final["id"] == FIRST_EVENT["id"]
    assert final["choices"][0]["finish_reason"] == "error"
    assert final["error"]["code"] == "replica_failed" and message in final["error"]["message"]


def test_a_stream_that_stalls_mid_way_ends_with_an_error_chunk_then_done(hanging, start_gateway):
    gw = start_gateway([hanging.url], stream_stall_timeout_s=0.5)
    assert_error_chunk_then_done(stream_payloads(gw, "after"), "sent nothing for 0.5 s")
    assert gw.metric("collm_gateway_requests_total", outcome="stream_error") == 1


def test_a_stream_that_stalls_before_its_first_event_is_failed_over(hanging, start_gateway):
    gw = start_gateway([hanging.url], stream_stall_timeout_s=0.5)
    body = completion("before", stream=True)
    r = httpx.post(gw.url + "/v1/completions", json=body, headers=AUTH, timeout=HANG_BOUND_S)
    assert r.status_code == 503 and r.headers["Retry-After"].isdigit()  # no other replica
    assert r.json()["error"]["code"] == "overloaded"
    assert gw.metric("collm_gateway_failovers_total", reason="stall") == 1


def test_a_json_request_on_a_replica_that_fails_its_health_polls_is_failed_over(
    hanging, start_gateway
):
    gw = start_gateway([hanging.url], poll_interval_s=0.1)
    body = completion("any", stream=False)
    with ThreadPoolExecutor(1) as ex:
        reply = ex.submit(
            httpx.post, gw.url + "/v1/completions", json=body, headers=AUTH, timeout=HANG_BOUND_S
        )
        assert hanging.received.wait(HANG_BOUND_S)
        hanging.health_ok = False
        r = reply.result()
    assert r.status_code == 503 and r.headers["Retry-After"].isdigit()  # no other replica
    assert gw.metric("collm_gateway_failovers_total", reason="unhealthy") == 1
    assert gw.health()["replicas"][0]["in_flight"] == 0


def test_a_request_past_the_read_timeout_is_a_504_not_rerun_on_every_replica(
    hanging, start_gateway
):
    # Run again elsewhere from scratch, a request the replica is still running would hold every
    # replica for the read timeout before the client heard anything.
    other = HangingReplica()
    try:
        gw = start_gateway([hanging.url, other.url], read_timeout_s=0.5)
        wait_for(lambda: all(r["healthy"] for r in gw.health()["replicas"]), 10, "not healthy")
        body = completion("any", stream=False)
        r = httpx.post(gw.url + "/v1/completions", json=body, headers=AUTH, timeout=HANG_BOUND_S)
        assert r.status_code == 504, r.text
        assert r.json()["error"]["code"] == "upstream_timeout"
        assert hanging.received.is_set() != other.received.is_set()  # one replica, not both
        assert gw.metric("collm_gateway_requests_total", outcome="timeout") == 1
        assert all(x["in_flight"] == 0 for x in gw.health()["replicas"])
    finally:
        other.stop()


@pytest.mark.parametrize(
    ("status", "ending"),
    [
        (500, "stopped answering /health"),  # a replica answering 500: taken for hung
        # nginx in front of a replica that closed its listener answers /health 502 while it still
        # relays the streams it has: those finish (here: the replica ends this one), none is
        # abandoned; the replica only gets no new requests.
        (502, "closed the stream before it finished"),
    ],
)
def test_a_stream_on_a_replica_that_fails_its_health_polls(hanging, start_gateway, status, ending):
    gw = start_gateway([hanging.url], poll_interval_s=0.1)
    with ThreadPoolExecutor(1) as ex:
        payloads = ex.submit(stream_payloads, gw, "after")
        assert hanging.received.wait(HANG_BOUND_S)
        hanging.health_status, hanging.health_ok = status, False
        wait_for(lambda: not gw.health()["replicas"][0]["healthy"], HANG_BOUND_S, "unhealthy")
        hanging.released.set()  # (then the replica ends the stream without [DONE])
        assert_error_chunk_then_done(payloads.result(), ending)


def test_a_stream_the_replica_ends_with_its_own_error_chunk_counts_as_a_stream_error(
    hanging, start_gateway
):
    gw = start_gateway([hanging.url])
    payloads = stream_payloads(gw, "fails")
    assert payloads[-1] == "[DONE]"
    assert json.loads(payloads[-2])["choices"][0]["finish_reason"] == "error"
    assert gw.metric("collm_gateway_requests_total", outcome="stream_error") == 1
    assert gw.metric("collm_gateway_requests_total", outcome="ok") == 0


def test_an_error_event_without_choices_mid_stream_counts_as_a_stream_error(hanging, start_gateway):
    # A foreign (vLLM-style) replica reports a failure mid-stream as a bare {"error": …} event:
    # read only for its finish reason, it counted as a success and cleared the failure streak.
    gw = start_gateway([hanging.url])
    payloads = stream_payloads(gw, "error event")
    assert [json.loads(p) for p in payloads[:-1]] == [FIRST_EVENT, ERROR_EVENT]  # none added
    assert payloads[-1] == "[DONE]"
    assert gw.metric("collm_gateway_requests_total", outcome="stream_error") == 1
    assert gw.metric("collm_gateway_requests_total", outcome="ok") == 0
    assert gw.health()["replicas"][0]["consecutive_failures"] == 1


def test_listing_models_on_a_stuck_replica_is_a_503_not_a_hang(hanging, start_gateway):
    gw = start_gateway([hanging.url])
    r = httpx.get(gw.url + "/v1/models", headers=AUTH, timeout=HANG_BOUND_S)
    assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"


def test_a_stream_queued_for_longer_than_the_stall_timeout_is_not_a_stall(scripted, start_gateway):
    replica = scripted()
    replica.queued_s = 1.5  # no response headers until the replica admits the request
    gw = start_gateway([replica.url], stream_stall_timeout_s=0.5)
    payloads = stream_payloads(gw, "queued")
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "abc"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert gw.metric("collm_gateway_failovers_total") == 0
    assert gw.replica(replica.name)["consecutive_failures"] == 0


def test_a_replicas_error_chunk_then_a_cut_reaches_the_client_as_one_error_chunk(
    hanging, start_gateway
):
    gw = start_gateway([hanging.url])
    payloads = stream_payloads(gw, "fails, cut")
    assert payloads[-1] == "[DONE]"
    finals = [json.loads(p)["choices"][0]["finish_reason"] for p in payloads[:-1]]
    assert finals == [None, "error"]  # the first event, then one error chunk (the replica's)
    assert gw.metric("collm_gateway_requests_total", outcome="stream_error") == 1


def test_a_finished_stream_cut_before_its_done_ends_cleanly_not_with_an_error(
    hanging, start_gateway
):
    # Its finish chunk relayed, only [DONE] was lost: an error chunk after it gave choice 0 a
    # second finish ("error"), SDKs reported the answer failed, and the replica was penalised.
    gw = start_gateway([hanging.url])
    payloads = stream_payloads(gw, "finished, cut")
    assert payloads[-1] == "[DONE]"
    finals = [json.loads(p)["choices"][0]["finish_reason"] for p in payloads[:-1]]
    assert finals == [None, "stop"]
    assert gw.metric("collm_gateway_requests_total", outcome="ok") == 1
    assert gw.metric("collm_gateway_requests_total", outcome="stream_error") == 0
    assert gw.health()["replicas"][0]["consecutive_failures"] == 0


def test_the_gateway_raises_its_open_files_limit_to_the_hard_one() -> None:
    # Two sockets a stream: at a soft limit of 1,024, ~500 streams in, connects failed with
    # EMFILE and every replica read as down.
    import resource

    from collm_fl.gateway.serve import raise_open_files_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        got = raise_open_files_limit()
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == got > 256
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_stream_of_done_alone_is_a_refusal_not_an_empty_success(hanging, start_gateway):
    # No token and no finish: nothing had reached the client, so it could still fail over; it
    # was relayed as an empty answer, counted ok, and cleared the replica's failure streak.
    gw = start_gateway([hanging.url])
    body = completion("done only", stream=True)
    r = httpx.post(gw.url + "/v1/completions", json=body, headers=AUTH, timeout=HANG_BOUND_S)
    assert r.status_code in (502, 503), r.text
    assert r.json()["error"]["message"]
    assert gw.metric("collm_gateway_requests_total", outcome="ok") == 0
    assert gw.health()["replicas"][0]["consecutive_failures"] >= 1
