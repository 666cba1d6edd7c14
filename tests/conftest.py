"""Shared fixtures: tiny models and temp stores; nothing here touches the network."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Under pytest-xdist each worker (and every process it starts) takes ports from its own range,
# below the system's ephemeral ports: a port one worker's test frees (a killed replica) is never
# taken by the other's next server while the first test still talks to that address.
if (_worker := os.environ.get("PYTEST_XDIST_WORKER", "")).startswith("gw"):
    _span = 12000 // max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    _low = 20000 + int(_worker[2:]) * _span
    os.environ["COLLM_PORT_RANGE"] = f"{_low}-{_low + _span - 1}"

import numpy as np
import pytest

from collm_fl.adapters import LoraSpec
from collm_fl.launch import free_port  # (the worker's $COLLM_PORT_RANGE under pytest-xdist)


@pytest.fixture(scope="session")
def tiny():
    """The built-in tiny Llama + tokenizer (built once into the cache, then loaded)."""
    from collm_fl.models import load_base_model

    return load_base_model("tiny")


@pytest.fixture()
def tiny_fresh():
    """A fresh copy of the tiny model, for tests that wrap or modify it."""
    from collm_fl.models import load_base_model

    return load_base_model("tiny")


@pytest.fixture()
def flower_task_identity(monkeypatch):
    """Messages read the run/node identity Flower sets in an app process; set one for tests
    that make Flower messages outside such a process."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.fixture()
def lora_spec() -> LoraSpec:
    return LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))


def random_adapter(shapes: dict[str, tuple[int, int]], seed: int, scale: float = 0.05):
    """A random adapter state with the given PEFT keys and shapes."""
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in shapes.items()}


class ReplicaProcess:
    """A real `collm replica` subprocess on loopback ports; stopped by its pid."""

    def __init__(
        self, store_dir, *extra: str, api_key: str | None = None, token: str = "test-token"
    ):
        import os
        import subprocess
        import sys
        from pathlib import Path

        self.port, self.control_port = free_port(), free_port()
        self.token, self.api_key = token, api_key
        self.store_dir = store_dir
        collm = str(Path(sys.executable).with_name("collm"))
        cmd = [
            collm,
            "replica",
            "--model",
            "tiny",
            "--port",
            str(self.port),
            "--control-port",
            str(self.control_port),
            "--store-dir",
            str(store_dir),
            "--num-partitions",
            "4",
            *extra,
        ]
        env = dict(os.environ, COLLM_CONTROL_TOKEN=token)
        if api_key:
            env["COLLM_API_KEY"] = api_key
        self.log_path = Path(store_dir).parent / f"replica-{self.port}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self._wait_ready()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def control_address(self) -> str:
        return f"127.0.0.1:{self.control_port}"

    def _wait_ready(self, timeout: float = 120.0) -> None:
        import time

        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"replica exited early:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)  # readiness poll of a separate process's port, not a sync stand-in
        self.stop()
        raise RuntimeError(f"replica not ready in {timeout}s:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        import subprocess

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _replica_factory(root):
    started: list[ReplicaProcess] = []

    def start(*extra: str, store_dir=None, **kw) -> ReplicaProcess:
        proc = ReplicaProcess(store_dir or root / f"store{len(started)}", *extra, **kw)
        started.append(proc)
        return proc

    return start, started


@pytest.fixture()
def start_replica(tmp_path):
    """Factory: start real replicas for a test; all are stopped at its end."""
    start, started = _replica_factory(tmp_path)
    yield start
    for proc in started:
        proc.stop()


@pytest.fixture(scope="module")
def start_module_replica(tmp_path_factory):
    """Factory for replicas shared by a test module; stopped after its last test."""
    start, started = _replica_factory(tmp_path_factory.mktemp("replicas"))
    yield start
    for proc in started:
        proc.stop()
