"""Faults injected into real federations on loopback: each a test, each bounded in time.

(a) a replica SIGKILLed while it trains in round 1 (deployment engine, 3 replica nodes);
(b) the ServerApp SIGKILLed after round 1 is stored (simulation engine), then the run resumed;
(c) a replica that cannot answer within ``round-timeout`` (frozen with SIGSTOP for the run).
Store and replica crashes in the middle of a write are in test_store_crash.py.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
from contextlib import closing
from pathlib import Path

import httpx
import psutil
import pytest

from collm_fl.federate import find_local_superlinks, start_local_superlink, stop_processes
from collm_fl.flower_app import stage_app
from collm_fl.launch import LocalFederation
from collm_fl.store import VersionStore

pytestmark = pytest.mark.slow

RUN_TIMEOUT_S = 600.0  # one `flwr run` of a few tiny rounds takes 1-2 minutes here
COMMON = "model='tiny' central-eval-samples=8 max-samples-per-client=40"
ROUND_LINE = re.compile(r"round (\d+) \| clients ok (\d+) rejected (\d+) failed (\d+)")


def round_lines(log: str) -> dict[int, tuple[int, int, int]]:
    """{round: (ok, rejected, failed)} from the ServerApp's one line per round."""
    return {int(m[1]): (int(m[2]), int(m[3]), int(m[4])) for m in ROUND_LINE.finditer(log)}


def health(url: str) -> dict[str, object]:
    return httpx.get(url + "/health", timeout=5).json()  # type: ignore[no-any-return]


def finish(rel, proc, timeout: float = RUN_TIMEOUT_S) -> str:
    """Wait for a `flwr run` process to exit; its return code must be 0; returns its log."""
    rel.wait_until(lambda: not proc.alive(), timeout, f"{proc.name} to finish")
    log = proc.log(200_000)
    assert proc.popen.returncode == 0, log[-4000:]
    return log


def stored_versions(replica_store: Path) -> list[int]:
    (run_dir,) = replica_store.glob("default.*")  # the run's key: its name and creation time
    return sorted(int(p.name[1:]) for p in run_dir.glob("v[0-9]*") if p.is_dir())


# ---- (a) a replica killed mid-round ------------------------------------------------------------


def stream_until_cut(url: str, started: threading.Event, result: dict[str, object]) -> None:
    """Stream a long greedy completion; record how it ended (completed, or the error)."""
    body = {"model": "tiny", "prompt": "ROMEO:", "max_tokens": 480, "temperature": 0}
    events = 0
    try:
        with httpx.stream(
            "POST", url + "/v1/completions", json={**body, "stream": True}, timeout=30
        ) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events += 1
                    started.set()
                    if line == "data: [DONE]":
                        result["end"] = "completed"
                        return
        result["end"] = "cut without [DONE]"
    except httpx.HTTPError as e:
        result["end"] = f"error: {type(e).__name__}"
    finally:
        result["events"] = events
        started.set()


def test_a_replica_killed_mid_round_is_counted_failed_and_rejoins_after_restart(
    tmp_path, procs, rel
):
    out = tmp_path / "out"
    config = (
        f"{COMMON} output-dir='{out}' local-steps=100 min-train-nodes=3 min-good-replies=1 "
        "num-server-rounds=1"
    )
    with LocalFederation(tmp_path / "site", num_replicas=3, model="tiny") as fed:
        victim, others = fed.replicas[2], fed.replicas[:2]
        run = procs.spawn("flwr-run-1", fed.flwr_run_command(config, rel.root), fed.env())

        def victim_training() -> bool:
            if not run.alive():
                pytest.fail(f"flwr run ended before round 1 trained:\n{run.log()}")
            return bool(health(victim.api_url)["training"])

        rel.wait_until(victim_training, 300, "the victim replica to train in round 1")
        # Requests in flight on the victim when it dies.
        streams = []
        for _ in range(4):
            started, result = threading.Event(), {}
            thread = threading.Thread(
                target=stream_until_cut, args=(victim.api_url, started, result)
            )
            thread.start()
            streams.append((thread, started, result))
        for _, started, _ in streams:
            assert started.wait(30), "a stream on the victim never started"
        victim.process.popen.kill()  # SIGKILL mid-round, mid-stream
        victim.process.popen.wait(30)
        for thread, _, _ in streams:
            thread.join(timeout=45)
        assert not any(t.is_alive() for t, _, _ in streams), "a stream on the killed replica hung"
        ends = [r["end"] for _, _, r in streams]
        cut = [(r["end"], r["events"]) for *_, r in streams]
        print(f"\nstreams on the killed replica (end, events): {cut}")
        assert any(e != "completed" for e in ends), ends  # they were cut, not finished
        assert all(e == "completed" or e.startswith(("error", "cut")) for e in ends), ends

        log = finish(rel, run)
        rounds = round_lines(log)
        print(f"rounds (ok, rejected, failed): {rounds}")
        assert rounds == {1: (2, 0, 1)}, log[-4000:]  # the victim's round-1 reply: failed
        for node in others:  # the survivors advanced to the newest version
            assert health(node.api_url)["adapter_version"] == 1
        with VersionStore(out) as store:
            run_id = store.find_run("default").id
            assert [v.number for v in store.list_versions(run_id)] == [0, 1]
            failed = [p for p in store.participations(run_id) if p.status == "failed"]
            assert [p.round_number for p in failed] == [1]
            assert all(p.reason and "error reply" in p.reason for p in failed), failed

        # Restarted with the same command (ports, store), it serves the newest version it stored.
        victim_cmd = list(victim.process.popen.args)
        victim_store = Path(victim_cmd[victim_cmd.index("--store-dir") + 1])
        had = stored_versions(victim_store)
        assert had, "the victim had stored v0 before it was killed"
        back = procs.spawn("victim-restarted", victim_cmd, fed.env())
        back.wait_http(victim.api_url + "/health")
        assert health(victim.api_url)["adapter_version"] == max(had)
        assert not list(victim_store.rglob(".tmp-*"))

        # It rejoins: a resumed run (one more round) gets all three replies and advances it too.
        # (100 local steps were for a kill window in round 1: the rejoin needs a few)
        config2 = config.replace("num-server-rounds=1", "num-server-rounds=2").replace(
            "local-steps=100", "local-steps=3"
        )
        run2 = procs.spawn("flwr-run-2", fed.flwr_run_command(config2, rel.root), fed.env())
        log2 = finish(rel, run2)
        assert "resuming run 'default' from version v1" in log2
        assert round_lines(log2) == {2: (3, 0, 0)}, log2[-4000:]
        for node in fed.replicas:
            assert health(node.api_url)["adapter_version"] == 2


# ---- (b) the server killed mid-run --------------------------------------------------------------


def recorded_rounds(db: Path) -> list[int]:
    """Round numbers committed so far (read-only SQL: opening a VersionStore would repair)."""
    if not db.exists():
        return []
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
            rows = conn.execute(
                "SELECT r.number FROM rounds r JOIN runs u ON r.run_id = u.id "
                "WHERE u.name = 'default' ORDER BY r.number"
            ).fetchall()
    except sqlite3.Error:
        return []  # not created yet, or mid-migration
    return [int(n) for (n,) in rows]


def kill_server_app(rel, flwr_home: Path) -> list[int]:
    """SIGKILL the simulation process (ServerApp and its Ray workers) under the SuperLink."""
    links = find_local_superlinks(flwr_home)
    assert links, "no local SuperLink is running"
    killed = []
    for link in links:
        for child in link.children(recursive=True):
            try:
                is_sim = "flwr-simulation" in " ".join(child.cmdline())
            except psutil.NoSuchProcess:
                continue
            if is_sim:
                killed += rel.kill_tree(child.pid)
    assert killed, "no flwr-simulation process found below the SuperLink"
    return killed


def test_a_server_killed_mid_run_resumes_with_no_gap_and_no_duplicate(
    tmp_path, procs, flower_home, rel
):
    out = tmp_path / "out"
    flwr = rel.venv_bin("flwr")
    config = f"{COMMON} output-dir='{out}' local-steps=3 num-server-rounds=3"
    app = stage_app(rel.root, tmp_path / "app")  # (as `collm federate` runs it)
    cmd = [flwr, "run", str(app), "--stream", "--federation-config", "num-supernodes=2"]
    cmd += ["--run-config", config]
    start_local_superlink(flower_home)  # (`flwr run` gives it 15 s, too few on a loaded machine)
    first = procs.spawn("flwr-run-1", cmd, flower_home)

    def round_one_stored() -> bool:
        if not first.alive():
            pytest.fail(f"the run ended before round 1 was stored:\n{first.log()}")
        return 1 in recorded_rounds(out / "store.db")

    rel.wait_until(round_one_stored, RUN_TIMEOUT_S, "round 1 to be stored")
    home = Path(flower_home["FLWR_HOME"])
    kill_server_app(rel, home)  # the crash under test
    first.kill()  # the `flwr run` client streaming its logs
    stop_processes(find_local_superlinks(home))
    at_kill = recorded_rounds(out / "store.db")
    print(f"\nrounds stored when the ServerApp was killed: {at_kill}")
    assert at_kill and at_kill[-1] < 3, at_kill

    start_local_superlink(flower_home)
    second = procs.spawn("flwr-run-2", cmd, flower_home)
    log = finish(rel, second)
    with VersionStore(out) as store:
        assert not store.consistency.missing_version_dirs, store.consistency
        run_id = store.find_run("default").id
        versions = store.list_versions(run_id)
        latest_before = max(v.number for v in versions if v.round_number <= at_kill[-1])
        assert f"resuming run 'default' from version v{latest_before}" in log, log[-4000:]
        assert [r.number for r in store.list_rounds(run_id)] == [1, 2, 3]  # no gap, no duplicate
        assert [v.number for v in versions] == [0, 1, 2, 3]
        assert [v.round_number for v in versions] == [0, 1, 2, 3]
        assert [v.parent_number for v in versions] == [None, 0, 1, 2]
        for v in versions:
            store.load_version(v)  # every version on disk, with the recorded checksum
        per_round = [p.round_number for p in store.participations(run_id)]
        assert sorted(per_round) == [1, 1, 2, 2, 3, 3]
    assert sorted(round_lines(log)) == [r for r in (1, 2, 3) if r > at_kill[-1]]


# ---- (c) a replica that misses the round timeout ------------------------------------------------

ROUND_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def late_node_run(tmp_path_factory, module_procs, rel):
    """One run in which replica 2 is frozen (SIGSTOP) and cannot answer within round-timeout."""
    workdir = tmp_path_factory.mktemp("late-node")
    out = workdir / "out"
    config = (
        f"{COMMON} output-dir='{out}' local-steps=5 min-train-nodes=3 num-server-rounds=1 "
        f"allocation='static' round-timeout={ROUND_TIMEOUT_S} round-deadline-s=20 "
        "publish-timeout=20"
    )
    with LocalFederation(workdir / "site", num_replicas=3, model="tiny") as fed:
        frozen = psutil.Process(fed.replicas[2].process.popen.pid)
        frozen.suspend()  # its port still accepts connections; nothing answers them
        try:
            run = module_procs.spawn("flwr-run", fed.flwr_run_command(config, rel.root), fed.env())
            rel.wait_until(lambda: not run.alive(), RUN_TIMEOUT_S, "flwr run to finish")
        finally:
            frozen.resume()
        slow_alive = health(fed.replicas[2].api_url)["status"] == "ok"
    with VersionStore(out) as store:
        run_id = store.find_run("default").id
        return {
            "returncode": run.popen.returncode,
            "log": run.log(200_000),
            "rounds": store.list_rounds(run_id),
            "versions": [v.number for v in store.list_versions(run_id)],
            "participations": store.participations(run_id),
            "slow_alive": slow_alive,
        }


def test_a_round_completes_without_a_node_that_misses_the_round_timeout(late_node_run):
    facts = late_node_run
    assert facts["returncode"] == 0, facts["log"][-4000:]
    ok, rejected, _ = round_lines(facts["log"])[1]
    assert (ok, rejected) == (2, 0), facts["log"][-4000:]
    assert facts["versions"] == [0, 1]  # aggregated from the two in-time replies
    (round1,) = facts["rounds"]
    assert round1.status == "aggregated" and round1.num_ok == 2
    # The round waited for the timeout, not for the frozen node.
    assert round1.seconds < 2 * ROUND_TIMEOUT_S, round1.seconds
    assert facts["slow_alive"], "the frozen replica serves again once resumed"


def test_a_node_that_misses_the_round_timeout_is_counted_failed(late_node_run):
    facts = late_node_run
    assert round_lines(facts["log"])[1] == (2, 0, 1), json.dumps(round_lines(facts["log"]))
    (round1,) = facts["rounds"]
    assert round1.num_failed == 1
    statuses = sorted(p.status for p in facts["participations"])
    assert statuses == ["failed", "ok", "ok"], statuses
    # The new version reached the two others though the frozen node never acknowledged it.
    assert "published v1 to 2/3 nodes" in facts["log"], facts["log"][-4000:]


# ---- (d) SIGTERM while a replica trains -------------------------------------------------------


def test_sigterm_ends_a_replicas_training_job_instead_of_waiting_for_its_deadline(
    procs, rel, tmp_path
):
    """uvicorn's graceful shutdown waits for open requests, and a /control/train request lasts
    until its job's deadline: the exit signal ends the job, which answers 503."""
    import os

    import numpy as np

    from collm_fl.adapters import LoraSpec
    from collm_fl.replica.control_client import ReplicaClient

    port, control_port = rel.free_port(), rel.free_port()
    env = {**os.environ, "COLLM_CONTROL_TOKEN": "t0ken"}
    cmd = rel.replica_command(
        tmp_path / "store", port, control_port, "--max-samples-per-client", "40"
    )
    replica = procs.spawn("replica", cmd, env)
    replica.wait_http(f"http://127.0.0.1:{port}/health")
    control = ReplicaClient(f"http://127.0.0.1:{control_port}", "t0ken", timeout=900)
    shapes = {k: tuple(v) for k, v in control.status()["adapter_shapes"].items()}
    zeros = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    control.push_version(zeros, LoraSpec().to_peft_config_dict("tiny"), 1)
    outcome: dict[str, object] = {}

    def train() -> None:
        try:
            control.train(1, 1_000_000, 1e-4, deadline_s=900.0, base_version=1)
            outcome["end"] = "trained"
        except Exception as e:
            outcome["end"] = str(e)

    job = threading.Thread(target=train, daemon=True)
    job.start()
    rel.wait_until(lambda: control.status()["training"], 120, "the job to start")
    replica.popen.terminate()  # SIGTERM, by pid
    rel.wait_until(lambda: not replica.alive(), 120, "the replica to exit (deadline: 900 s)")
    job.join(60)
    log = replica.log(100_000)
    assert replica.popen.returncode == 130, log  # the CLI's exit code when interrupted
    assert "stopping: the training job in progress ends" in log and "replica stopped" in log
    assert "training job for round 1 stopped" in log and "failed" not in log
    assert "503" in str(outcome.get("end")) and "shutting down" in str(outcome["end"]), outcome
