"""``scripts/test.sh``: a signal stops the tests, mypy and the servers the tests started, at once
(bash runs a trap only after the foreground command ends: the tests ran to their end first)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _fake_venv(where: Path) -> Path:
    """A virtual environment whose ruff passes, whose mypy and pytest run until stopped (pytest
    with a server in a session of its own, as a test's replica), each telling its process id on
    the file descriptor ``$PID_FD``."""
    bin_dir = where / "bin"
    bin_dir.mkdir(parents=True)
    scripts = {
        "activate": f'PATH="{bin_dir}:$PATH"\n',
        "ruff": "#!/usr/bin/env bash\nexit 0\n",
        "mypy": '#!/usr/bin/env bash\necho "mypy $$" >&"$PID_FD"\nexec sleep 600\n',
        # (on a Ctrl-C pytest runs its fixtures' teardown, which stops the servers its tests
        # started, and exits; with $LEAK set this one leaves its server, in a session of its
        # own, for the script to stop)
        "python": "#!/usr/bin/env bash\n"
        'trap \'echo "interrupted $$" >&"$PID_FD"; [ -n "$LEAK" ] || kill $server; exit 2\' INT\n'
        "setsid sleep 600 </dev/null &\nserver=$!\n"
        'echo "server $server" >&"$PID_FD"\necho "pytest $$" >&"$PID_FD"\nwait\n',
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return where


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize(
    ("sig", "code", "leak"),
    [
        (signal.SIGTERM, 143, "1"),  # (the tests are listed before they are interrupted)
        (signal.SIGTERM, 143, ""),
        (signal.SIGINT, 130, ""),  # (a leak here races the listing with the tests' end)
    ],
)
def test_a_signal_stops_the_tests_mypy_and_the_servers_they_started(
    tmp_path: Path, sig: signal.Signals, code: int, leak: str
) -> None:
    """A Ctrl-C (to the whole job) or a SIGTERM (a CI timeout, to the script): the tests are
    interrupted as by a Ctrl-C, so their teardown stops what they started, then whatever is
    left of them and mypy is stopped."""
    read, write = os.pipe()
    venv = _fake_venv(tmp_path / "venv")
    proc = subprocess.Popen(
        ["bash", str(ROOT / "scripts" / "test.sh")],
        env={**os.environ, "VENV": str(venv), "PID_FD": str(write), "LEAK": leak},
        pass_fds=(write,),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        start_new_session=True,  # a job of its own, as at a terminal
        # ... with Ctrl-C not ignored, as at a terminal (a test run in the background passes
        # SIGINT on ignored, and a shell cannot trap a signal ignored when it started)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    os.close(write)
    pids: dict[str, int] = {}
    try:
        with os.fdopen(read) as told:
            while len(pids) < 3:  # (end of file: every process that could tell has exited)
                line = told.readline()
                assert line, f"test.sh exited ({proc.wait()}) before its tests started"
                name, pid = line.split()
                pids[name] = int(pid)
            # Ctrl-C reaches the whole job at a terminal; SIGTERM (a CI timeout) the script.
            if sig == signal.SIGINT:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
            assert proc.wait(timeout=120) == code
            # pytest was interrupted first, as by a Ctrl-C (its fixtures' teardown stops what
            # left the tests' process tree), then what was left was stopped
            assert f"interrupted {pids['pytest']}" in told.read()
        assert {name: _gone(pid) for name, pid in pids.items()} == dict.fromkeys(pids, True)
    finally:
        for pid in [proc.pid, *pids.values()]:
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
