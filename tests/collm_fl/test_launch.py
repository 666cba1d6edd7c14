"""Starting and stopping local processes: ports handed out once, every process stopped."""

from __future__ import annotations

import dataclasses
import sys
import time
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

    def second_ctrl_c(deadline: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(procs[-1], "finish_stop", second_ctrl_c)  # the first one waited for
    with pytest.raises(KeyboardInterrupt):
        fed.stop()
    assert all(p.popen.wait(timeout=30) is not None for p in procs)
    assert not any(p.alive() for p in procs) and fed.processes == []


# On SIGTERM: note it, then exit only once every other process but the SuperLink has noted
# its own (each waits for the others: stopped one after another, the first one waited for never
# exits by itself). The SuperLink notes which of the others were still running.
STOPS_TOGETHER = """
import os, pathlib, signal, sys, time
me, others = sys.argv[1], sys.argv[2:]
here = pathlib.Path(os.environ["STOP_DIR"])
def on_term(*_):
    if me == "superlink":
        alive = [o for o in others if (here / f"{o}.alive").exists()]
        (here / "superlink.saw").write_text(",".join(alive))
        sys.exit(0)
    (here / f"{me}.term").touch()
    while not all((here / f"{o}.term").exists() for o in others):
        time.sleep(0.05)
    (here / f"{me}.alive").unlink()
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
(here / f"{me}.alive").touch()
while True:
    time.sleep(1)
"""


def test_a_stop_signals_every_process_at_once_then_the_superlink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Stopped one by one, each waiting for the one before to exit, a site's processes took 2-3 s
    # each (a SuperNode leaving the SuperLink, a replica draining): a federation's stop added up.
    monkeypatch.setenv("STOP_DIR", str(tmp_path))
    fed = LocalFederation(tmp_path / "site", with_flower=False)
    fed.workdir.mkdir()
    names = ["superlink", "replica0", "replica1", "supernode0", "supernode1"]
    procs = []
    for name in names:
        others = [n for n in names if n not in (name, "superlink")]
        procs.append(fed.spawn(name, [sys.executable, "-c", STOPS_TOGETHER, name, *others]))
    for name in names:  # each has its handler in place
        deadline = time.monotonic() + 60
        while not (tmp_path / f"{name}.alive").exists():
            assert procs[names.index(name)].alive() and time.monotonic() < deadline, name
            time.sleep(0.05)
    fed.stop(timeout=20)
    assert [p.popen.returncode for p in procs] == [0] * len(names)  # none was killed
    assert (tmp_path / "superlink.saw").read_text() == ""  # the others were gone by then
    assert fed.processes == []


def test_local_replicas_get_the_run_configs_data_split_and_lora_shape(tmp_path) -> None:

    from collm_fl.cli.commands import replica_data
    from collm_fl.cli.parser import build_parser
    from collm_fl.config import RunConfig
    from collm_fl.launch import replica_flags

    data = tmp_path / "mine.jsonl"
    overrides = (
        f"data='{data}' partitioning='dirichlet' dirichlet-alpha=0.3 central-heldout=1 "
        "max-samples-per-client=50 seed=7 seq-len=64 batch-size=2 lora-rank=4 lora-alpha=8 "
        "lora-targets='q_proj,k_proj' lora-dropout=0.05 ttft-slo-s=5 tpot-slo-s=1"
    )
    cfg = RunConfig.from_app(Path(__file__).parents[2], overrides)
    args = build_parser().parse_args(["replica", *replica_flags(cfg)])
    spec = replica_data(args)
    assert spec is not None
    assert dataclasses.replace(spec, heldout_fraction=cfg.heldout_fraction) == cfg.data_spec
    assert spec.heldout_fraction == 0.0  # nothing on a replica evaluates a local tail
    assert (args.seq_len, args.train_batch_size) == (64, 2)
    # The SLOs the allocation judges the replicas by: they served to the defaults (2 s / 0.2 s).
    assert (args.ttft_slo, args.tpot_slo) == (5.0, 1.0)
    lora = (args.lora_rank, args.lora_alpha, args.lora_targets, args.lora_dropout)
    assert lora == (4, 8.0, "q_proj,k_proj", 0.05)


def test_a_replica_trains_on_all_of_its_own_file_but_not_on_the_held_out_plays() -> None:
    from collm_fl.cli.commands import replica_data
    from collm_fl.cli.parser import build_parser

    def spec(*flags: str):
        return replica_data(build_parser().parse_args(["replica", *flags]))

    assert spec().central_heldout == 2  # the plays the server evaluates on
    assert spec("--data", "site.jsonl").central_heldout == 0  # its own file: nothing set aside
    assert spec("--data", "site.jsonl", "--central-heldout", "1").central_heldout == 1
    assert spec("--data", "none") is None


SPAWNED = (
    "fed = LocalFederation(Path(sys.argv[1]), 1, 0, model='tiny')\n"
    "fed.workdir.mkdir(parents=True, exist_ok=True)\n"
    "fed.spawn('sleeper', SLEEPER)\n"
    "sys.stdin.read()\n"  # until the test kills it
)
# collm live's own `flwr run` child, whose output it reads line by line
FLWR_RUN_OF_LIVE = (
    "from types import SimpleNamespace\n"
    "from collm_fl import live\n"
    "fed = SimpleNamespace(flwr_run_command=lambda *a: SLEEPER, env=lambda: None, replicas=[])\n"
    "live._drive_flwr(fed, None, '', Path(sys.argv[1]), 0.0, None, None, [], [])\n"
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("start", [SPAWNED, FLWR_RUN_OF_LIVE], ids=["spawned", "flwr-run-of-live"])
def test_what_a_launcher_started_dies_with_it_even_when_it_is_sigkilled(tmp_path, start) -> None:
    """A launcher killed by SIGKILL (or the OOM killer) runs no cleanup: the kernel's death
    signal stops the processes it started, which would otherwise hold their models and ports."""
    import contextlib
    import signal
    import subprocess

    import psutil

    from tests.collm_fl.gateway.gateway_harness import wait_for

    pid_file = tmp_path / "child.pid"
    sleeper = (
        f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(600)"
    )
    launcher = (
        "import sys\n"
        "from pathlib import Path\n"
        "from collm_fl.launch import LocalFederation\n"
        f"SLEEPER = [sys.executable, '-c', {sleeper!r}]\n"
    ) + start
    tmp_path.joinpath("site").mkdir()
    parent = subprocess.Popen(
        [sys.executable, "-c", launcher, str(tmp_path / "site")], stdin=subprocess.PIPE
    )
    wait_for(lambda: pid_file.is_file() and pid_file.read_text() != "", 60, "no child started")
    child = psutil.Process(int(pid_file.read_text()))
    try:
        assert child.is_running() and child.ppid() == parent.pid
        parent.send_signal(signal.SIGKILL)
        parent.wait(30)
        wait_for(lambda: not child.is_running() or child.status() == "zombie", 30, "child alive")
    finally:
        if parent.poll() is None:
            parent.kill()
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()  # (by pid: only if the test failed)


def _parent_and_child(tmp_path, on_sigterm: str = ""):
    """A process spawned as the launcher spawns (a session of its own) that starts a child which
    ignores SIGINT; ``on_sigterm``: its own SIGTERM handler's code (default: dies of it)."""
    import psutil

    from collm_fl.launch import LocalFederation
    from tests.collm_fl.gateway.gateway_harness import wait_for

    pid_file = tmp_path / "child.pid"
    parent = (
        "import signal, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', "
        "'import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(600)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        f"{on_sigterm}\n"
        "time.sleep(600)\n"
    )
    fed = LocalFederation(tmp_path / "site", 1, 0, model="tiny")
    fed.workdir.mkdir(parents=True, exist_ok=True)
    proc = fed.spawn("parent", [sys.executable, "-c", parent])
    wait_for(lambda: pid_file.is_file() and pid_file.read_text() != "", 30, "no child started")
    return proc, psutil.Process(int(pid_file.read_text()))


def _gone(child) -> bool:
    return not child.is_running() or child.status() == "zombie"


def test_stopping_a_process_stops_what_it_started_that_outlives_it(tmp_path) -> None:
    """A SuperNode's ClientApp blocked pushing its reply to the SuperNode that is gone retries
    forever (CI found one alive 30 minutes on): stopping a process stops its children too."""
    from tests.collm_fl.gateway.gateway_harness import wait_for

    # It exits on SIGTERM, leaving the child.
    proc, child = _parent_and_child(
        tmp_path, "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))"
    )
    try:
        proc.stop()
        wait_for(lambda: _gone(child), 30, "child alive")
    finally:
        if child.is_running():
            child.kill()


def test_stopping_a_process_that_died_stops_what_it_left_behind(tmp_path) -> None:
    """A SuperNode killed mid-round (SIGKILL, the OOM killer) leaves its SuperExec and ClientApp
    to another parent: stopping the dead process only closed its log, and they ran on."""
    from tests.collm_fl.gateway.gateway_harness import wait_for

    proc, child = _parent_and_child(tmp_path)
    try:
        proc.popen.kill()  # dies at once, its child left behind
        proc.popen.wait(30)
        assert not _gone(child)
        proc.stop()
        wait_for(lambda: _gone(child), 30, "child alive")
    finally:
        if child.is_running():
            child.kill()


def test_flwr_run_stops_when_the_federation_cannot_finish(tmp_path) -> None:
    """`collm site`: SuperNodes below min-train-nodes fail the command (exit 1) naming the one
    gone, instead of Flower waiting for its node for ever; a replica gone does not."""
    import subprocess
    from types import SimpleNamespace

    from collm_fl.errors import WorkFailed
    from collm_fl.launch import LocalFederation

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])

    def proc(name: str, popen) -> SimpleNamespace:
        return SimpleNamespace(
            name=name, alive=lambda: popen.poll() is None, popen=popen, log_path=f"{name}.log"
        )

    fed = LocalFederation(tmp_path, processes=[proc("supernode0", sleeper)])  # type: ignore[list-item]
    flwr = [sys.executable, "-c", "import time; time.sleep(600)"]
    fed.flwr_run_command = lambda *a: flwr  # type: ignore[method-assign]
    fed.env = lambda: None  # type: ignore[method-assign]
    sleeper.kill()
    sleeper.wait()
    with pytest.raises(WorkFailed, match=r"supernode0 exited \(code -9\) mid-run; its log: "):
        fed.flwr_run("", tmp_path, min_nodes=1)
    # A replica gone: its node fails its rounds, the run goes on to flwr run's own exit code.
    fed.processes = [proc("replica0", sleeper)]  # type: ignore[list-item]
    flwr[:] = [sys.executable, "-c", "import time; time.sleep(2); raise SystemExit(3)"]
    assert fed.flwr_run("", tmp_path, min_nodes=1) == 3


def test_free_ports_come_from_collm_port_range_and_a_bad_range_is_named(monkeypatch):
    from collections import deque

    from collm_fl import launch
    from collm_fl.errors import ConfigError
    from collm_fl.launch import free_port

    # Above every pytest-xdist worker's range (tests/conftest.py: 20000-31999) and below the
    # ephemeral ports, with a fresh record of ports handed out: this worker's earlier tests took
    # ports from its own range, and holding five of ten there made no free port left (CI, once).
    monkeypatch.setattr(launch, "_HANDED_OUT", deque(maxlen=4096))
    monkeypatch.setenv("COLLM_PORT_RANGE", "32100-32109")
    ports = {free_port() for _ in range(5)}
    assert len(ports) == 5 and all(32100 <= p <= 32109 for p in ports)
    for bad in ("21000", "9-20", "3000-2000", "a-b"):
        monkeypatch.setenv("COLLM_PORT_RANGE", bad)
        with pytest.raises(ConfigError, match="COLLM_PORT_RANGE"):
            free_port()


def test_a_narrow_port_range_hands_out_its_ports_again_oldest_first(monkeypatch):
    # Every port of the range handed out once, none was ever handed out again: free_port failed
    # with all of them free (until 4096 others had been handed out).
    from collections import deque

    from collm_fl import launch

    monkeypatch.setattr(launch, "_HANDED_OUT", deque(maxlen=4096))
    monkeypatch.setenv("COLLM_PORT_RANGE", "32110-32113")  # (above the test workers' ranges)
    ports = [free_port() for _ in range(10)]
    assert sorted(set(ports[:4])) == [32110, 32111, 32112, 32113]  # fresh ones first
    assert ports[4:8] == ports[:4] and ports[8:] == ports[:2]  # then the longest ago


def test_a_supernode_that_cannot_start_fails_the_start_with_its_log(tmp_path, monkeypatch):
    """A SuperNode that exits before it joins the SuperLink (here its Runtime API port is taken,
    and again when it is started once more on another) fails the start naming it with its log,
    and the start stops what it had started; not a run that begins and then reads "supernode0
    exited mid-run". One that lost its port once is started again and joins."""
    import socket

    from collm_fl import launch

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = taken.getsockname()[1]
    with taken:
        # The SuperLink's port, then the SuperNode's, then the one it is started again on.
        ports = iter([free_port(), busy, busy])
        monkeypatch.setattr(launch, "free_port", lambda: next(ports))
        fed = LocalFederation(tmp_path / "site", num_replicas=0, num_devices=1)
        with pytest.raises(launch.LaunchError) as caught:
            fed.start(timeout=120)
        message = str(caught.value)
        assert "supernode0 exited (code 1) before it joined the SuperLink" in message
        assert "address already in use" in message  # (its log's tail)
        assert fed.processes == []

        ports = iter([free_port(), busy, free_port()])
        again = LocalFederation(tmp_path / "again", num_replicas=0, num_devices=1)
        with again:
            names = [p.name for p in again.processes]
            assert names == ["superlink", "supernode0"] and all(p.alive() for p in again.processes)
        assert again.processes == []


def test_a_supernode_joined_is_read_from_its_log(tmp_path) -> None:
    """wait_joined returns the node id the SuperLink gave it, and fails on a process that neither
    joins nor exits within the time allowed."""
    import subprocess

    from collm_fl.launch import LaunchError, ManagedProcess, wait_joined

    def started(name: str, code: str) -> ManagedProcess:
        log_path = tmp_path / f"{name}.log"
        handle = open(log_path, "wb")  # noqa: SIM115 - owned by the ManagedProcess
        popen = subprocess.Popen([sys.executable, "-c", code], stdout=handle)
        return ManagedProcess(name, popen, log_path, handle)

    joined = started(
        "supernode0", "import time; print('INFO : SuperNode ID: 42', flush=True); time.sleep(600)"
    )
    silent = started("supernode1", "import time; time.sleep(600)")
    try:
        assert wait_joined(joined, timeout=60) == "42"
        with pytest.raises(LaunchError, match="supernode1 did not join the SuperLink in 1s"):
            wait_joined(silent, timeout=1)
    finally:
        joined.stop()
        silent.stop()


def test_a_supernode_logs_at_info_at_least(monkeypatch) -> None:
    """The start waits for the node id a SuperNode logs at INFO: a caller's FLWR_LOG_LEVEL of
    WARNING would hide it (the start timing out on nodes that joined); DEBUG stays."""
    from collm_fl.launch import supernode_log_level

    for level, env in (
        ("", {}),
        ("DEBUG", {}),
        ("info", {}),
        ("WARNING", {"FLWR_LOG_LEVEL": "INFO"}),
    ):
        monkeypatch.setenv("FLWR_LOG_LEVEL", level)
        assert supernode_log_level() == env
