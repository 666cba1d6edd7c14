"""A client that gives up while its request waits: the replica drops the request and reports it.

A real replica server (uvicorn, in a thread) on the tiny model; a gate in the model's forward holds
the engine mid-step, so the second request is certainly queued when its client leaves.
"""

from __future__ import annotations

import threading

import httpx
import pytest

from collm_fl.replica.metrics import SLO
from collm_fl.replica.runtime import Replica, ReplicaConfig
from tests.collm_fl.gateway.gateway_harness import wait_for
from tests.collm_fl.replica.in_thread import served


class Gate:
    """Holds every model forward while closed."""

    def __init__(self) -> None:
        self.closed = threading.Event()
        self.opened = threading.Event()
        self.held = threading.Event()  # a forward is waiting at the gate

    def __call__(self, _module: object, _args: object) -> None:
        if self.closed.is_set():
            self.held.set()
            self.opened.wait(60)


@pytest.fixture(params=["slo", "fcfs"])
def server(request, tmp_path):
    cfg = ReplicaConfig(
        model="tiny",
        data=None,
        store_dir=str(tmp_path / "store"),
        max_batch_size=1,
        schedule=request.param,
        slo=SLO(ttft_s=0.2, tpot_s=1.0),
    )
    replica = Replica(cfg)
    gate = Gate()
    replica.model.register_forward_pre_hook(gate)
    with served(replica) as url:
        try:
            yield replica, gate, url
        finally:
            gate.opened.set()  # (before the server stops: a held forward would block it)


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_whose_client_left_while_queued_is_dropped_and_counted_as_a_miss(server, stream):
    replica, gate, url = server
    body = {"model": "tiny", "prompt": "ROMEO:", "max_tokens": 8, "temperature": 0}
    first: list[httpx.Response] = []
    gate.closed.set()
    t = threading.Thread(
        target=lambda: first.append(httpx.post(url + "/v1/completions", json=body, timeout=60))
    )
    t.start()
    assert gate.held.wait(30)  # the first request is admitted (the one row) and held mid-step
    # The second request queues behind it; its client gives up after half a second.
    with pytest.raises(httpx.TimeoutException):
        httpx.post(url + "/v1/completions", json={**body, "stream": stream}, timeout=0.5)
    wait_for(
        lambda: any(rec.status == "cancelled" for rec in replica.load_window._records),
        10,
        "the replica did not notice the client leaving",
    )
    gate.closed.clear()
    gate.opened.set()
    t.join(60)
    assert first[0].status_code == 200  # the first request ends as usual
    wait_for(lambda: replica.engine.stats().queue_depth == 0, 30, "the request stayed queued")
    # Only the first request generated: the one whose client left was never admitted.
    assert replica.engine.stats().tokens_generated == first[0].json()["usage"]["completion_tokens"]
    (left,) = [r for r in replica.load_window._records if r.status == "cancelled"]
    # Its wait is on record: from its admission to the queue (after tokenizing, in a worker
    # thread) until its client left, half a second after sending it.
    assert left.ttft is None and left.waited_s is not None and left.waited_s > 0.1
    report = replica.load_window.report(0, 0, 0.0, 0, reset=False)
    assert report.requests == 2  # both were load (how a wait is judged: test_load_window.py)


def test_a_stream_whose_client_left_before_its_body_started_still_ends_its_request() -> None:
    """Under ASGI 2.3 Starlette cancels the body when the client's disconnect comes first: the
    body generator never starts, so its own cleanup never ran (the row decoded on, unrecorded)."""
    import asyncio

    from collm_fl.replica.server import _EndingStream

    started, ends = [], []

    async def body():
        started.append(True)
        yield b"data: [DONE]\n\n"

    async def receive() -> dict[str, str]:
        return {"type": "http.disconnect"}  # the client is gone already

    async def send(_message: object) -> None:
        await asyncio.sleep(0)

    response = _EndingStream(body(), lambda: ends.append(True), media_type="text/event-stream")
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}}
    asyncio.run(response(scope, receive, send))
    assert started == [] and ends == [True]
