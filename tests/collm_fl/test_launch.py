"""Starting and stopping local processes: ports handed out once, every process stopped."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from collm_fl.launch import LocalFederation, free_port

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


def test_free_ports_are_never_handed_out_twice() -> None:
    ports = [free_port() for _ in range(2000)]  # the kernel reuses a just-closed port often
    assert len(set(ports)) == len(ports)


def test_a_stop_interrupted_midway_still_kills_every_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fed = LocalFederation(tmp_path, with_flower=False)
    tmp_path.mkdir(exist_ok=True)
    procs = [fed.spawn(f"sleeper{i}", SLEEPER) for i in range(3)]

    def second_ctrl_c(timeout: float = 20.0) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(procs[-1], "stop", second_ctrl_c)  # the first one stop() reaches
    with pytest.raises(KeyboardInterrupt):
        fed.stop()
    assert all(p.popen.wait(timeout=30) is not None for p in procs)
    assert not any(p.alive() for p in procs) and fed.processes == []
