"""A ``/control/train`` caller that leaves (its round gave up, its node stopped) takes its job
along: uvicorn never cancels a handler whose client disconnected, so the job ran to its deadline
while the replica reported training (the gateway routed around it) and the next job queued
behind it. A real control server (uvicorn, in a thread) on a tiny replica with data."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn

from collm_fl.adapters import LoraSpec
from collm_fl.data import DataSpec
from collm_fl.launch import free_port
from collm_fl.replica.control import create_control_app
from collm_fl.replica.runtime import Replica, ReplicaConfig
from collm_fl.replica.wire import decode_adapter
from tests.collm_fl.gateway.gateway_harness import wait_for

TOKEN = "t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SPEC = LoraSpec()


@pytest.fixture()
def control(tmp_path: Path) -> Iterator[tuple[Replica, str]]:
    cfg = ReplicaConfig(
        model="tiny",
        lora=SPEC,
        store_dir=str(tmp_path / "store"),
        data=DataSpec(),
        num_partitions=4,
    )
    replica = Replica(cfg)
    replica.start()
    rng = np.random.default_rng(0)
    shapes = replica.modules.expected_shapes()
    state = {k: (rng.standard_normal(s) * 0.01).astype(np.float32) for k, s in shapes.items()}
    replica.push_version(state, SPEC.to_peft_config_dict("tiny"), 1)
    port = free_port()
    config = uvicorn.Config(
        create_control_app(replica, TOKEN), host="127.0.0.1", port=port, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: _answers(url), 60, "control server did not start")
    try:
        yield replica, url
    finally:
        server.should_exit = True
        thread.join(30)
        replica.stop()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "/control/load", headers=AUTH, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _train(url: str, timeout: float, **body: object) -> httpx.Response:
    job = {"round": 1, "steps": 1, "learning_rate": 1e-3, "deadline_s": 60.0, **body}
    return httpx.post(url + "/control/train", json=job, headers=AUTH, timeout=timeout)


def test_a_job_not_started_is_dropped_when_its_caller_leaves(control) -> None:
    replica, url = control
    with pytest.raises(httpx.TimeoutException):  # its turn would come in 50 s
        _train(url, timeout=1.0, start_after_s=50.0)
    # The next job does not queue behind it: it trains its step at once (behind the first, its
    # 20 s deadline would pass while the first waited for its turn: 0 steps).
    r = _train(url, timeout=60.0, deadline_s=20.0)
    assert r.status_code == 200, r.text
    assert decode_adapter(r.content)[3]["local-steps"] == 1.0
    assert replica.trainer is not None and replica.trainer.steps_total == 1


def test_a_running_job_stops_after_its_step_when_its_caller_leaves(control) -> None:
    replica, url = control
    assert replica.trainer is not None
    # Steps enough to train until its deadline, a minute on the tiny model.
    with pytest.raises(httpx.TimeoutException):
        _train(url, timeout=2.0, steps=1_000_000, deadline_s=60.0)
    wait_for(lambda: not replica.trainer.running_job, 30, "the job trained on for nobody")
    done = replica.trainer.steps_total
    assert done > 0  # it had started: it was stopped, not cancelled
    r = _train(url, timeout=60.0)  # and the trainer takes the next job
    assert r.status_code == 200 and decode_adapter(r.content)[3]["local-steps"] == 1.0


def test_a_refused_job_leaves_the_training_share_as_it_was(control) -> None:
    replica, url = control
    before = replica.training_share
    refusals = [
        {"start_after_s": 90.0, "share": 0.7},  # its start after its deadline
        {"base_version": 7, "share": 0.7},  # not the served version
        # the served version's number, of another run (two runs' v1 are different adapters)
        {"base_version": 1, "base_run": "another-run", "share": 0.7},
    ]
    for body in refusals:
        r = _train(url, timeout=30.0, **body)
        assert r.status_code in (400, 409), r.text
        assert replica.training_share == before, body
    r = _train(url, timeout=60.0, share=0.7)  # an accepted one sets it
    assert r.status_code == 200 and replica.training_share == 0.7


def test_a_diverged_job_is_a_500_naming_it_and_leaves_the_share_as_it_was(control, monkeypatch):
    import torch

    replica, url = control
    before = replica.training_share
    monkeypatch.setattr(
        torch.nn.utils, "clip_grad_norm_", lambda *a, **k: torch.tensor(float("nan"))
    )
    r = _train(url, timeout=60.0, share=0.7)
    assert r.status_code == 500, r.text
    error = r.json()["error"]
    assert error["code"] == "training_diverged" and "non-finite gradient norm" in error["message"]
    assert replica.training_share == before
    monkeypatch.undo()
    r = _train(url, timeout=60.0, base_version=1, base_run=replica.run)  # the served run: fine
    assert r.status_code == 200, r.text
