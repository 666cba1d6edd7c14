"""Flower's deployment engine for real: SuperLink, SuperNodes beside replicas, a device node."""

import threading
import time
from pathlib import Path

import httpx
import pytest

from collm_fl.launch import LocalFederation
from collm_fl.store import VersionStore

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_rounds_on_the_deployment_engine_advance_every_replica_while_serving(tmp_path):
    out = tmp_path / "out"
    served: list[tuple[str, int, object]] = []  # (routed-to replica, status, version)
    stop = threading.Event()

    with LocalFederation(tmp_path / "site", num_replicas=2, num_devices=1, model="tiny") as fed:
        gateway_url, _ = fed.start_gateway()

        def traffic() -> None:
            body = {"model": "tiny", "prompt": "ROMEO:", "max_tokens": 8, "temperature": 0}
            deadline = time.monotonic() + 600  # bounded in time and count
            for _ in range(2000):
                if stop.is_set() or time.monotonic() > deadline:
                    return
                r = httpx.post(gateway_url + "/v1/completions", json=body, timeout=60)
                routed = r.headers.get("X-Routed-To", "?")
                served.append((routed, r.status_code, r.json().get("adapter_version")))

        sender = threading.Thread(target=traffic)
        sender.start()
        try:
            config = (
                f"num-server-rounds=2 model='tiny' output-dir='{out}' local-steps=3 "
                "central-eval-samples=8 max-samples-per-client=40 min-train-nodes=3"
            )
            cmd = fed.flwr_run_command(config, ROOT)
            import subprocess

            result = subprocess.run(cmd, env=fed.env(), capture_output=True, text=True, timeout=900)
        finally:
            stop.set()
            sender.join()
        log = result.stdout + result.stderr
        assert result.returncode == 0, log[-4000:]
        assert "round 2 | clients ok 3 rejected 0 failed 0" in log, log[-4000:]
        assert "published v2 to 3/3 nodes" in log
        # Every replica serves the newest version right after the run, without a restart.
        for node in fed.replicas:
            health = httpx.get(node.api_url + "/health").json()
            assert health["adapter_version"] == 2, (node.index, health)
            assert health["run"].startswith("default.")  # the run's name and creation time

    # Requests were served through the gateway throughout: all succeeded, and each replica's
    # versions only advanced.
    assert served and all(status == 200 for _, status, _ in served)
    for name in {n for n, _, _ in served}:
        versions = [v for n, _, v in served if n == name and v is not None]
        assert versions == sorted(versions)
    store = VersionStore(out)
    run = store.find_run("default")
    assert [v.number for v in store.list_versions(run.id)] == [0, 1, 2]
    store.close()
