"""The control API's blocking calls run on its own threads, not the event loop's default pool.

The replica's OpenAI API and its control API share one event loop; the OpenAI API tokenizes on
the loop's default thread pool (``asyncio.to_thread``). A ``/control/train`` call holds a thread
until its job's deadline, so queued training jobs on that pool would hold up every prompt's
tokenization: serving would wait for training.
"""

import threading

import pytest
from fastapi.testclient import TestClient

from collm_fl.errors import VersionNotStoredError
from collm_fl.replica.control import create_control_app
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
