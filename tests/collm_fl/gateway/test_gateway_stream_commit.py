"""A stream is committed to its replica by its first token: a chat stream whose replica fails after
the role chunk but before any token is failed over, and its client sees one clean stream."""

from __future__ import annotations

import json

import httpx
import pytest
from gateway_harness import GATEWAY_KEY

from collm_fl.policies.routing import choose_replica
from collm_fl.replica.metrics import SLO

AUTH = {"Authorization": f"Bearer {GATEWAY_KEY}"}
BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True}


def chat_stream(gw) -> tuple[str, list[dict]]:
    """One streamed chat through ``gw``: the replica it was routed to and its chunks."""
    url = gw.url + "/v1/chat/completions"
    with httpx.stream("POST", url, json=BODY, headers=AUTH, timeout=30) as r:
        assert r.status_code == 200
        payloads = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    return r.headers["X-Routed-To"], [json.loads(p) for p in payloads[:-1]]


@pytest.mark.parametrize("fault", ["drop", "error"])
def test_a_chat_stream_that_fails_before_its_first_token_is_failed_over(
    scripted, start_gateway, fault
):
    a, b = scripted(), scripted()
    gw = start_gateway([a.url, b.url])
    first = choose_replica(gw.pool.views(), 1, 256, SLO())  # where the gateway sends it first
    faulty, good = (a, b) if first == a.name else (b, a)
    faulty.fault = fault

    routed, chunks = chat_stream(gw)

    assert routed == good.name
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert sum("role" in d for d in deltas) == 1  # the failed replica's role chunk was held back
    assert "".join(d.get("content", "") for d in deltas) == "abc"
    assert all("error" not in c and c["choices"][0]["finish_reason"] != "error" for c in chunks)
    assert gw.metric("collm_gateway_failovers_total", replica=faulty.name) == 1
    assert gw.metric("collm_gateway_requests_total", replica=good.name, outcome="ok") == 1


def test_a_chat_stream_that_finishes_without_a_token_is_relayed_not_failed_over(
    scripted, start_gateway
):
    replica = scripted()
    replica.tokens = []  # the role chunk, then a chunk that finishes with no text
    gw = start_gateway([replica.url])
    _, chunks = chat_stream(gw)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, "stop"]
    assert gw.metric("collm_gateway_failovers_total") == 0
    assert gw.metric("collm_gateway_requests_total", outcome="ok") == 1


def test_a_streams_usage_chunk_tells_the_gateway_how_many_tokens_its_events_carried(
    scripted, start_gateway
):
    # Text held back for a stop string comes later in one event with the next: the replica's
    # usage chunk counts the tokens, and the gateway learns its TPOT from that count.
    replica = scripted()
    replica.usage_tokens = 7  # three events ("a", "b", "c"), seven tokens
    gw = start_gateway([replica.url])
    learned = []
    real = gw.pool.succeed

    def succeed(ticket, completion_tokens=None, replica_timing=None):
        learned.append((ticket.tokens, completion_tokens))
        real(ticket, completion_tokens, replica_timing)

    gw.pool.succeed = succeed
    body = {**BODY, "stream_options": {"include_usage": True}}
    url = gw.url + "/v1/chat/completions"
    with httpx.stream("POST", url, json=body, headers=AUTH, timeout=30) as r:
        payloads = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert json.loads(payloads[-2])["usage"]["completion_tokens"] == 7  # relayed unchanged
    assert learned == [(3, 7)]
