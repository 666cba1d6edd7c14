"""The control API's blocking calls run on its own threads, not the event loop's default pool.

The replica's OpenAI API and its control API share one event loop; the OpenAI API tokenizes on
the loop's default thread pool (``asyncio.to_thread``). A co-executing ``/control/train`` job lasts
until its deadline: held on a thread of either pool, queued jobs would hold up every prompt's
tokenization, or every adapter push.
"""

import asyncio
import threading
from concurrent.futures import Future

import httpx
import pytest
from fastapi.testclient import TestClient

from collm_fl.errors import VersionNotStoredError
from collm_fl.replica.coexec import TrainerStopped
from collm_fl.replica.control import CONTROL_THREADS, create_control_app
from collm_fl.replica.runtime import Replica, ReplicaConfig

TOKEN = "t0ken"


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    r = Replica(ReplicaConfig(model="tiny", store_dir=str(tmp_path_factory.mktemp("store"))))
    r.start()
    yield r
    r.stop()


def test_control_calls_run_on_the_control_apis_own_threads(replica, monkeypatch):
    ran_on: list[str] = []

    def rollback(version: int) -> None:
        ran_on.append(threading.current_thread().name)
        raise VersionNotStoredError(f"version {version} is not stored")

    monkeypatch.setattr(replica, "rollback", rollback)
    with TestClient(create_control_app(replica, TOKEN)) as client:
        r = client.post(
            "/control/rollback",
            json={"version": 3},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
    assert r.status_code == 404 and r.json()["error"]["code"] == "version_not_found"
    assert len(ran_on) == 1 and ran_on[0].startswith("collm-control")


def test_queued_co_executing_training_jobs_hold_no_control_thread(replica, monkeypatch):
    """More training jobs than control threads wait on the trainer; a rollback still runs."""
    queued = CONTROL_THREADS + 2
    jobs: list[Future] = []
    all_queued = threading.Event()

    def submit_training(*args: object, **kwargs: object) -> Future:
        jobs.append(job := Future())
        if len(jobs) == queued:
            all_queued.set()
        return job  # never runs: the test ends it

    def rollback(version: int) -> None:
        raise VersionNotStoredError(f"version {version} is not stored")

    monkeypatch.setattr(replica, "submit_training", submit_training)
    monkeypatch.setattr(replica, "rollback", rollback)
    app = create_control_app(replica, TOKEN)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    body = {"round": 1, "steps": 5, "learning_rate": 0.01, "deadline_s": 60}

    async def main() -> tuple[int, list[int]]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://replica") as c:
            trains = [
                asyncio.create_task(c.post("/control/train", json=body, headers=auth))
                for _ in range(queued)
            ]
            assert await asyncio.to_thread(all_queued.wait, 30)
            r = await asyncio.wait_for(
                c.post("/control/rollback", json={"version": 3}, headers=auth), 30
            )
            for job in jobs:
                job.set_exception(TrainerStopped("replica is shutting down"))
            return r.status_code, [(await t).status_code for t in trains]

    rollback_status, train_statuses = asyncio.run(main())
    assert rollback_status == 404
    assert train_statuses == [503] * queued


def test_a_training_start_is_for_co_executing_jobs_and_never_negative(replica):
    body = {"round": 1, "steps": 1, "learning_rate": 1e-3, "deadline_s": 60.0}
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(create_control_app(replica, TOKEN)) as client:
        r = client.post(
            "/control/train",
            json={**body, "exclusive": True, "start_after_s": 5.0, "share": 0.7},
            headers=headers,
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "cannot_train"
        assert r.json()["error"]["param"] == "start_after_s"
        assert replica.training_share != 0.7  # refused: nothing changed
        r = client.post("/control/train", json={**body, "start_after_s": -1.0}, headers=headers)
        assert r.status_code in (400, 422) and "start_after_s" in r.text
