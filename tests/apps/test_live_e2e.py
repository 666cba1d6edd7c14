"""`collm live` for real: replicas, SuperLink, SuperNodes, gateway, load and `flwr run` on the tiny
model; its progress, its report, its exit code, and nothing left running after it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

RUN_CONFIG = "local-steps=2 central-eval-samples=8 max-samples-per-client=40"


def _live(out: Path, rounds: int) -> subprocess.Popen[str]:
    cmd = [
        *(sys.executable, "-c", "import sys; from collm_fl.cli import main; sys.exit(main())"),
        *("live", "--model", "tiny", "--replicas", "2", "--rounds", str(rounds)),
        *("--rate", "2", "--arrivals", "poisson", "--prompt-tokens", "16", "--output-tokens", "8"),
        *("--ttft-slo", "5", "--tpot-slo", "1", "--out", str(out), "-c", RUN_CONFIG),
    ]
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a job at a terminal has
        # ... and Ctrl-C not ignored, as at a terminal: a test run in the background (`cmd &`, as
        # CI may be) passes SIGINT on ignored, and Python then installs no handler for it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _until_round_1(proc: subprocess.Popen[str]) -> tuple[list[str], list[psutil.Process]]:
    """Its output up to the round 1 line, and every process it has running then."""
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("round 1 | served v"):
            return lines, psutil.Process(proc.pid).children(recursive=True)
    pytest.fail("no round 1 line:\n" + "".join(lines)[-4000:])


def _still_running(procs: list[psutil.Process], timeout: float = 30.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        left = []
        for p in procs:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{p.pid}: {' '.join(p.cmdline())[:200]}")
            except psutil.NoSuchProcess:
                pass
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def _run(
    out: Path, rounds: int, after_round_1: Callable[[int, list[psutil.Process]], None] | None = None
) -> tuple[int, str, list[psutil.Process]]:
    """Run `collm live` to its end (``after_round_1(pid, processes)`` done at round 1's line):
    its exit code, its output, and the processes it had running at round 1."""
    proc = _live(out, rounds)
    try:
        lines, started = _until_round_1(proc)
        if after_round_1 is not None:
            after_round_1(proc.pid, started)
        rest, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, "".join(lines) + rest, started


def test_the_main_job_reports_each_round_and_stops_everything(tmp_path: Path) -> None:
    out = tmp_path / "live"
    code, stdout, started = _run(out, rounds=2)
    assert code == 0, stdout[-4000:]
    assert len(started) >= 6  # 2 replicas, 2 SuperNodes, the SuperLink, the gateway, flwr run
    # One progress line per round, with every replica's training share.
    for rnd in (1, 2):
        line = next(x for x in stdout.splitlines() if x.startswith(f"round {rnd} | served v"))
        assert "replica0" in line and "replica1" in line, line
    report = json.loads((out / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    versions = [r["version"] for r in report["rounds"]]
    assert versions == sorted(versions) and versions[0] >= 1  # (the quality gate may keep one)
    assert report["summary"]["requests"] > 0 and report["note"] == ""
    assert (out / "report.md").is_file() and (out / "live.png").is_file()
    assert _still_running(started) == []


def test_a_supernode_that_dies_mid_run_fails_the_job_with_a_report_and_stops_everything(
    tmp_path: Path,
) -> None:
    """min-train-nodes is every node in `collm live`: without one, Flower would wait for ever."""

    def kill_a_supernode(_pid: int, started: list[psutil.Process]) -> None:
        supernode = next(p for p in started if "flower-supernode" in " ".join(p.cmdline()))
        supernode.send_signal(signal.SIGKILL)

    out = tmp_path / "live"
    code, stdout, started = _run(out, 20, kill_a_supernode)  # more rounds than it gets to
    assert code == 1, stdout[-4000:]
    assert "stopping: supernode" in stdout and "fewer than the run's min-train-nodes=2" in stdout
    md = (out / "report.md").read_text()
    assert "**Stopped: supernode" in md and "| 1 | " in md
    assert _still_running(started) == []


def test_ctrl_c_at_the_terminal_reports_the_rounds_so_far_and_stops_everything(
    tmp_path: Path,
) -> None:
    """The terminal sends SIGINT to the job's whole process group: every process the job
    started must still be stopped by it (with what they started), not end on its own and leave
    its children behind."""
    out = tmp_path / "live"
    code, stdout, started = _run(out, 20, lambda pid, _: os.killpg(pid, signal.SIGINT))
    assert code == 130, stdout[-4000:]
    md = (out / "report.md").read_text()
    assert "**Interrupted: the report covers the rounds so far.**" in md
    assert _still_running(started) == []
