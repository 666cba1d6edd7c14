"""Admission control in a real gateway: a request it predicts would miss its TTFT SLO on every
replica is refused at once with an OpenAI-style 503.

The upstream is an in-process stand-in whose ``/health`` reports whatever queue depth the test sets
(one batch slot) and which answers a JSON completion of two tokens no sooner than ``REPLY_AFTER_S``
after it was sent: the TPOT the gateway learns from it has a lower bound, so the predicted wait
behind a deep queue does too, whatever the machine's speed.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from gateway_harness import GATEWAY_KEY, wait_for

from collm_fl.replica.metrics import SLO

AUTH = {"Authorization": f"Bearer {GATEWAY_KEY}"}
REPLY_AFTER_S = 0.1  # simulated decoding: less the 0.05 s TTFT prior, a learned TPOT >= 0.05 s
DEEP_QUEUE = 10_000  # × 8 tokens × >= 0.05 s per slot release: a predicted TTFT of >= 4000 s
SLO_ = SLO(ttft_s=2.0, tpot_s=0.2)
SHED_FACTOR = 2.0  # refuse above a predicted TTFT of 4 s
BODY = {"model": "tiny", "prompt": "ROMEO:", "max_tokens": 8}


COMPLETION = {
    "id": "cmpl-1",
    "object": "text_completion",
    "created": 0,
    "model": "tiny",
    "choices": [{"index": 0, "text": "ab", "logprobs": None, "finish_reason": "length"}],
    "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4},
}


class QueueingReplica:
    """Reports ``queue_depth`` on /health; answers any completion with two tokens, as JSON."""

    def __init__(self) -> None:
        self.queue_depth = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: object) -> None:
                pass

            def do_GET(self) -> None:
                health = {"queue_depth": fake.queue_depth, "running": 0, "max_batch_size": 1}
                with contextlib.suppress(ConnectionError):  # the gateway hung up as it stopped
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(json.dumps(health).encode())

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                time.sleep(REPLY_AFTER_S)  # simulated decoding, not synchronization
                body = json.dumps(COMPLETION).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def name(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def queueing() -> Iterator[QueueingReplica]:
    replica = QueueingReplica()
    yield replica
    replica.stop()


def complete(gw, stream: bool) -> httpx.Response:
    body = {**BODY, "stream": stream}
    return httpx.post(gw.url + "/v1/completions", json=body, headers=AUTH, timeout=30)


def test_a_request_predicted_to_miss_the_ttft_slo_everywhere_is_shed_with_a_503(
    queueing, start_gateway
):
    queueing.queue_depth = DEEP_QUEUE
    gw = start_gateway([queueing.url], poll_interval_s=0.05, slo=SLO_, shed_factor=SHED_FACTOR)
    wait_for(lambda: gw.replica(queueing.name)["queue_depth"] == DEEP_QUEUE, 10, "no poll")

    # Nothing measured yet: the prediction is priors only, so even a deep queue is admitted ...
    assert complete(gw, stream=False).status_code == 200
    # ... but a request that queued behind full batches teaches no TPOT: its time is mostly wait.
    assert gw.replica(queueing.name)["ewma_tpot_s"] is None
    queueing.queue_depth = 0
    wait_for(lambda: gw.replica(queueing.name)["queue_depth"] == 0, 10, "no poll")
    assert complete(gw, stream=False).status_code == 200
    assert gw.replica(queueing.name)["ewma_tpot_s"] is not None  # measured on an idle replica

    # Now the queue is known to be >= 4000 s deep: refused at once, JSON and streaming alike.
    queueing.queue_depth = DEEP_QUEUE
    wait_for(lambda: gw.replica(queueing.name)["queue_depth"] == DEEP_QUEUE, 10, "no poll")
    for stream in (False, True):
        r = complete(gw, stream)
        assert r.status_code == 503, r.text
        assert r.headers["Retry-After"] == "60"  # the backlog needs far longer: at most 60 s
        err = r.json()["error"]
        assert err["type"] == "server_overloaded" and err["code"] == "load_shed"
        assert "request shed" in err["message"]
        assert "exceeds shed-factor × TTFT SLO = 2 × 2 s = 4 s" in err["message"]
    assert gw.metric("collm_gateway_shed_total") == 2
    assert gw.metric("collm_gateway_unavailable_total") == 0  # shedding is counted apart
    assert gw.replica(queueing.name)["routed"] == 2  # a shed request never reaches a replica

    # The queue drains: admitted again.
    queueing.queue_depth = 0
    wait_for(lambda: gw.replica(queueing.name)["queue_depth"] == 0, 10, "no poll")
    assert complete(gw, stream=False).status_code == 200
    assert gw.metric("collm_gateway_shed_total") == 2
