"""Fixtures for the reliability tests: processes started, killed and stopped by pid; deadlines.

Every process a test starts goes through :class:`Processes`, which stops it at the end of the test
(even when the test fails): SIGTERM, then SIGKILL after a grace period, each by its pid. Waiting on
another process is always a poll of its observable state with a deadline.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import httpx
import psutil
import pytest

from collm_fl.launch import free_port  # (the worker's $COLLM_PORT_RANGE under pytest-xdist)

ROOT = Path(__file__).resolve().parents[2]
POLL_S = 0.05  # how often a deadline poll looks at another process's state


def venv_bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> object:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(POLL_S)  # a poll of another process's state, bounded by the deadline


def kill_tree(pid: int, timeout: float = 20.0) -> list[int]:
    """SIGKILL ``pid`` and every descendant (collected first, then killed one by one by pid)."""
    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return []
    killed = []
    for proc in procs:
        try:
            proc.send_signal(signal.SIGKILL)
            killed.append(proc.pid)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=timeout)
    return killed


class Proc:
    """One child process with its log file; stopped (or killed) by pid."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name, self.cmd, self.log_path = name, list(cmd), log_path
        self._log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def kill(self) -> None:
        """SIGKILL: the crash under test (no handler runs, nothing is flushed)."""
        if self.alive():
            self.popen.kill()
        self.popen.wait(timeout=30)

    def stop(self, timeout: float = 20.0) -> None:
        if self.alive():
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)
        if not self._log.closed:
            self._log.close()

    def wait_http(self, url: str, timeout: float = 180.0) -> None:
        """Poll ``url`` until it answers 200; fail with the log if the process exits first."""

        def ready() -> bool:
            if not self.alive():
                pytest.fail(f"{self.name} exited ({self.popen.returncode}):\n{self.log()}")
            try:
                return httpx.get(url, timeout=1.0).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout, f"{self.name} at {url}")


class Processes:
    """Starts processes for one test and stops every one of them at its end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[Proc] = []

    def spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> Proc:
        env = dict(os.environ) if env is None else env
        proc = Proc(name, cmd, env, self.workdir / f"{name}-{len(self.started)}.log")
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            proc.stop()


@pytest.fixture()
def procs(tmp_path: Path) -> Iterator[Processes]:
    registry = Processes(tmp_path)
    try:
        yield registry
    finally:
        registry.stop_all()


def replica_command(
    store_dir: Path, port: int, control_port: int, *extra: str, python_prelude: str | None = None
) -> list[str]:
    """A ``collm replica`` command line on loopback ports (optionally with a patched prelude)."""
    args = [
        "replica",
        "--model",
        "tiny",
        "--port",
        str(port),
        "--control-port",
        str(control_port),
        "--store-dir",
        str(store_dir),
        *extra,
    ]
    if python_prelude is None:
        return [venv_bin("collm"), *args]
    # The prelude patches the library in the replica's own process, then runs the real CLI.
    code = (
        f"{python_prelude}\nimport sys\nfrom collm_fl.cli import main\nsys.exit(main(sys.argv[1:]))"
    )
    return [sys.executable, "-c", code, *args]


@pytest.fixture()
def flower_home(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A private FLWR_HOME and ports; stops (by pid) every local SuperLink started in it."""
    from collm_fl.federate import find_local_superlinks, flower_env, stop_processes

    home = tmp_path / "flwr-home"
    env = flower_env(home)
    env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(free_port())
    env["FLWR_LOCAL_CONTROL_API_PORT"] = str(free_port())
    try:
        yield env
    finally:
        links = find_local_superlinks(home)
        children = [c for p in links for c in p.children(recursive=True)]
        stop_processes(links)
        for child in children:  # the simulation and Ray processes below a SuperLink
            kill_tree(child.pid)


@pytest.fixture(scope="session")
def tiny_lora_shapes() -> dict[str, tuple[int, ...]]:
    """PEFT keys and shapes of the tiny model's LoRA at the replica's default spec (r=8)."""
    from collm_fl.adapters import LoraSpec
    from collm_fl.models import load_base_model
    from collm_fl.training import attach_lora, get_adapter_state

    model = attach_lora(load_base_model("tiny").model, LoraSpec())
    return {k: tuple(v.shape) for k, v in get_adapter_state(model).items()}


class Helpers:
    """The helpers above, for test modules (a fixture: test modules do not import conftest)."""

    free_port = staticmethod(free_port)
    wait_until = staticmethod(wait_until)
    kill_tree = staticmethod(kill_tree)
    replica_command = staticmethod(replica_command)
    venv_bin = staticmethod(venv_bin)
    root = ROOT


@pytest.fixture(scope="session")
def rel() -> type[Helpers]:
    return Helpers


@pytest.fixture(scope="module")
def module_procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processes]:
    """Like ``procs``, for a scenario a whole module's tests share."""
    registry = Processes(tmp_path_factory.mktemp("procs"))
    try:
        yield registry
    finally:
        registry.stop_all()
