"""A replica that shuts down gracefully (SIGTERM: it closes its listener, then finishes what it has)
is sent nothing new, and the requests in flight on it finish as if nothing happened."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from gateway_harness import GATEWAY_KEY, wait_for

AUTH = {"Authorization": f"Bearer {GATEWAY_KEY}"}
BOUND_S = 30.0  # the client's timeout: far above what any step here takes


def complete(gw, stream: bool) -> tuple[int, str, list[dict]]:
    """One completion through ``gw``: its status, its text and, for a stream, its chunks."""
    body = {"model": "tiny", "prompt": "x", "max_tokens": 8, "stream": stream}
    url = gw.url + "/v1/completions"
    with httpx.stream("POST", url, json=body, headers=AUTH, timeout=BOUND_S) as r:
        if not stream or r.status_code != 200:
            r.read()
            text = r.json()["choices"][0]["text"] if r.status_code == 200 else ""
            return r.status_code, text, []
        payloads = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    return r.status_code, "".join(c["choices"][0]["text"] for c in chunks), chunks


@pytest.mark.parametrize("stream", [True, False], ids=["sse", "json"])
def test_a_request_in_flight_on_a_replica_that_stops_listening_finishes_normally(
    scripted, start_gateway, stream
):
    replica = scripted()
    replica.hold.clear()  # the request stays in flight until the replica has stopped listening
    gw = start_gateway([replica.url], poll_interval_s=0.1)
    with ThreadPoolExecutor(1) as ex:
        reply = ex.submit(complete, gw, stream)
        assert replica.received.wait(BOUND_S)
        replica.stop_listening()
        wait_for(lambda: not gw.replica(replica.name)["healthy"], BOUND_S, "drain not noticed")
        replica.hold.set()
        status, text, chunks = reply.result()

    assert status == 200 and text == "abc"
    assert all("error" not in c and c["choices"][0]["finish_reason"] != "error" for c in chunks)
    assert gw.metric("collm_gateway_requests_total", outcome="ok") == 1
    assert gw.metric("collm_gateway_failovers_total") == 0
    assert gw.replica(replica.name)["in_flight"] == 0
    # ... and nothing new is sent to it: with no other replica, the next request is a 503.
    assert complete(gw, stream)[0] == 503
    assert gw.replica(replica.name)["routed"] == 1
