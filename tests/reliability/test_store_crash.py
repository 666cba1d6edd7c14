"""Crashes while a version or a store transaction is being written leave the previous state intact.

Each crash is real: a child process (a Python writer, or a `collm replica`) runs the production
write path with one step patched to announce itself and block, and is then SIGKILLed at exactly
that step. Reopening the store (or restarting the replica) must find no partial directory, the
previous version loadable with its checksum, and a database that agrees with the disk.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import threading
from contextlib import closing
from pathlib import Path

import httpx
import numpy as np
import pytest

from collm_fl.adapters import LoraSpec
from collm_fl.replica.wire import encode_adapter
from collm_fl.store import VersionStore

WRITE_TIMEOUT_S = 120.0
CONFIG = LoraSpec(rank=16).to_peft_config_dict("big-model")


def big_adapter(seed: int, layers: int = 8, dim: int = 4096, rank: int = 16):
    """~4 MB of LoRA factors: big enough that a write takes visible time."""
    rng = np.random.default_rng(seed)
    state = {}
    for i in range(layers):
        m = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        state[m + ".lora_A.weight"] = rng.standard_normal((rank, dim), dtype=np.float32) * 0.01
        state[m + ".lora_B.weight"] = rng.standard_normal((dim, rank), dtype=np.float32) * 0.01
    return state


# The child: opens the store, patches one step of the real write path to touch a marker file and
# block (until SIGKILLed, or until a "go" file appears), then runs the real operation.
CHILD = r"""
import os, sys, time
from pathlib import Path
import numpy as np
root, point, marker = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
go = marker.with_suffix(".go")

def block():
    marker.write_text(point)
    deadline = time.monotonic() + 120
    while not go.exists():  # waiting to be killed (or released): the crash point under test
        if time.monotonic() > deadline:
            os._exit(3)
        time.sleep(0.01)

import safetensors.numpy as st_np
from collm_fl.store import adapter_io

if point == "mid-weights":
    def partial_save(tensors, path, metadata=None):
        blob = st_np.save(tensors, metadata=metadata)
        with open(path, "wb") as f:
            f.write(blob[: len(blob) // 2])
            f.flush()
            os.fsync(f.fileno())
        block()
    adapter_io.st_np.save_file = partial_save
elif point in ("before-rename", "after-rename"):
    real_fsync_dir = adapter_io._fsync_dir
    def fsync_dir(path):
        real_fsync_dir(path)
        renamed = not path.name.startswith(adapter_io.TEMP_PREFIX)
        if renamed == (point == "after-rename"):
            block()
    adapter_io._fsync_dir = fsync_dir
elif point in ("version-transaction", "round-transaction"):
    from sqlalchemy import event
    from sqlalchemy.orm import Session
    event.listen(Session, "after_flush", lambda session, ctx: block())

from collm_fl.store import VersionStore, RoundRecord, ParticipationRecord
from datetime import UTC, datetime
store = VersionStore(root)
run = store.find_run("default")
if point == "round-transaction":
    now = datetime.now(UTC)
    store.record_round_result(
        run.id,
        RoundRecord(number=1, status="aggregated", started_at=now, finished_at=now, num_ok=2,
                    version_number=0, seconds=1.0),
        [ParticipationRecord(node_id=n, status="ok", num_examples=10) for n in (1, 2)],
    )
else:
    rng = np.random.default_rng(1)
    state = {}
    for i in range(8):
        m = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        state[m + ".lora_A.weight"] = rng.standard_normal((16, 4096), dtype=np.float32) * 0.01
        state[m + ".lora_B.weight"] = rng.standard_normal((4096, 16), dtype=np.float32) * 0.01
    from collm_fl.adapters import LoraSpec
    config = LoraSpec(rank=16).to_peft_config_dict("big-model")
    store.save_version(run.id, 1, state, config, {"eval-loss": 1.0}, 1.0)
print("write finished")
"""


@pytest.fixture()
def store_with_v0(tmp_path):
    root = tmp_path / "store"
    state = big_adapter(0)
    with VersionStore(root) as store:
        run = store.open_run("default", {"model": "big-model"}, base_model="big-model")
        store.save_version(run.id, 0, state, CONFIG, {"eval-loss": 2.0}, 2.0)
    return root, state


def start_writer(rel, procs, root: Path, point: str, tmp_path: Path):
    marker = tmp_path / f"{point}.marker"
    cmd = [sys.executable, "-c", CHILD, str(root), point, str(marker)]
    proc = procs.spawn(f"writer-{point}", cmd)

    def blocked() -> bool:
        if not proc.alive():
            pytest.fail(f"writer exited ({proc.popen.returncode}) early:\n{proc.log()}")
        return marker.exists()

    rel.wait_until(blocked, WRITE_TIMEOUT_S, f"the writer to reach {point}")
    return proc, marker


def temp_dirs(root: Path) -> list[Path]:
    return [p for p in root.rglob(".tmp-*")]


def integrity(root: Path) -> str:
    with closing(sqlite3.connect(root / "store.db")) as db:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])


@pytest.mark.parametrize(
    "point,leftover",
    [
        ("mid-weights", "temp"),  # half the safetensors bytes on disk, in the temp dir
        ("before-rename", "temp"),  # every byte written and fsynced, not yet renamed
        ("after-rename", "orphan"),  # renamed into place, its row never inserted
        ("version-transaction", "orphan"),  # row flushed inside the open transaction
    ],
)
def test_a_writer_killed_mid_version_leaves_the_previous_version_intact(
    rel, procs, store_with_v0, tmp_path, point, leftover
):
    root, v0_state = store_with_v0
    writer, _ = start_writer(rel, procs, root, point, tmp_path)
    if leftover == "temp":
        assert temp_dirs(root), "the crash point is inside the temp-dir write"
    else:
        assert (root / "runs/default/versions/v0001").is_dir()
    writer.kill()

    with VersionStore(root) as store:
        report = store.consistency
        found = report.removed_temp_dirs if leftover == "temp" else report.removed_orphan_dirs
        assert len(found) == 1, report
        assert not report.missing_version_dirs, report
        assert not temp_dirs(root)
        assert sorted(p.name for p in (root / "runs/default/versions").iterdir()) == ["v0000"]
        run = store.find_run("default")
        versions = store.list_versions(run.id)
        assert [v.number for v in versions] == [0]
        loaded = store.load_version(versions[0])  # checks the sha256 recorded at write time
        for k, v in v0_state.items():
            np.testing.assert_array_equal(loaded[k], v)
        # The store is usable: the same version is written again, under the same number.
        again = store.save_version(run.id, 1, big_adapter(1), CONFIG, {"eval-loss": 1.0}, 1.0)
        assert again.number == 1
        np.testing.assert_array_equal(
            store.load_version(again)[next(iter(v0_state))], big_adapter(1)[next(iter(v0_state))]
        )
    assert integrity(root) == "ok"


def test_a_writer_killed_inside_a_round_transaction_records_nothing_of_it(
    rel, procs, store_with_v0, tmp_path
):
    root, _ = store_with_v0
    writer, _ = start_writer(rel, procs, root, "round-transaction", tmp_path)
    writer.kill()
    assert integrity(root) == "ok"
    with VersionStore(root) as store:
        run = store.find_run("default")
        assert store.list_rounds(run.id) == []
        assert store.participations(run.id) == []  # all of the round or none of it
        assert store.last_completed_round(run.id) == 0  # a resume redoes round 1
        assert [v.number for v in store.list_versions(run.id)] == [0]


@pytest.mark.parametrize("point", ["before-rename", "after-rename"])
@pytest.mark.parametrize("reader_first", [False, True])
def test_a_reader_opening_the_store_during_a_write_does_not_break_it(
    rel, procs, store_with_v0, tmp_path, point, reader_first
):
    root, _ = store_with_v0
    # A reader that opened before the writer (and closes mid-write) must not hand a later one
    # the right to repair what the writer is writing.
    early = VersionStore(root) if reader_first else None
    writer, marker = start_writer(rel, procs, root, point, tmp_path)
    if early is not None:
        early.close()
    with VersionStore(root) as reader:  # what `collm versions` does
        assert [v.number for v in reader.list_versions(reader.find_run("default").id)] == [0]
    marker.with_suffix(".go").write_text("")  # let the writer finish
    rel.wait_until(lambda: not writer.alive(), WRITE_TIMEOUT_S, "the writer to finish")
    assert writer.popen.returncode == 0, writer.log()
    with VersionStore(root) as store:
        assert not store.consistency.missing_version_dirs, store.consistency
        latest = store.latest_version(store.find_run("default").id)
        assert latest is not None and latest.number == 1
        store.load_version(latest)


# ---- the replica's push path --------------------------------------------------------------------

SLOW_PUSH_PRELUDE = r"""
import os, time
from pathlib import Path
from collm_fl.store import adapter_io
marker = Path(os.environ["COLLM_TEST_PUSH_MARKER"])
real = adapter_io._fsync_and_hash
def fsync_and_hash(path):
    digest = real(path)
    if "v0002" in str(path):  # the push under test: block with its bytes in the temp dir
        marker.write_text(str(path))
        time.sleep(120)  # killed long before this ends
    return digest
adapter_io._fsync_and_hash = fsync_and_hash
"""


def push(control_address: str, token: str, state, version: int) -> httpx.Response:
    blob = encode_adapter(state, LoraSpec().to_peft_config_dict("tiny"), version)
    return httpx.put(
        f"http://{control_address}/control/adapters/{version}",
        content=blob,
        headers={"Authorization": f"Bearer {token}"},
        timeout=60,
    )


def lora_states(shapes, n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    return [
        {k: (rng.standard_normal(s) * 0.05).astype(np.float32) for k, s in shapes.items()}
        for _ in range(n)
    ]


def test_a_replica_killed_during_a_push_serves_the_previous_version_after_restart(
    rel, procs, tmp_path, tiny_lora_shapes
):
    store = tmp_path / "replica-store"
    marker = tmp_path / "push.marker"
    port, control_port = rel.free_port(), rel.free_port()
    env = dict(os.environ, COLLM_CONTROL_TOKEN="tok", COLLM_TEST_PUSH_MARKER=str(marker))
    args = (store, port, control_port, "--data", "none")
    patched = rel.replica_command(*args, python_prelude=SLOW_PUSH_PRELUDE)
    first = procs.spawn("replica", patched, env)
    first.wait_http(f"http://127.0.0.1:{port}/health")
    control = f"127.0.0.1:{control_port}"
    states = lora_states(tiny_lora_shapes, 3)
    for v in (0, 1):
        assert push(control, "tok", states[v], v).status_code == 200

    outcome: dict[str, object] = {}

    def push_v2() -> None:
        try:
            outcome["response"] = push(control, "tok", states[2], 2)
        except httpx.HTTPError as e:  # the replica died under the request: the expected end
            outcome["error"] = e

    pusher = threading.Thread(target=push_v2)
    pusher.start()
    rel.wait_until(marker.exists, WRITE_TIMEOUT_S, "the replica to be mid-write of v2")
    assert list((store / "default").glob(".tmp-v0002-*")), "v2 is in its temp dir"
    first.kill()
    pusher.join(timeout=30)
    assert not pusher.is_alive(), "the push to a killed replica hung"
    assert "error" in outcome, outcome  # a transport error, not a success

    second = procs.spawn("replica-restarted", rel.replica_command(*args), env)
    second.wait_http(f"http://127.0.0.1:{port}/health")
    health = httpx.get(f"http://127.0.0.1:{port}/health").json()
    assert health["adapter_version"] == 1
    assert not list(store.rglob(".tmp-*"))
    assert sorted(p.name for p in (store / "default").iterdir()) == ["v0000", "v0001"]
    body = {"model": "tiny", "prompt": "ROMEO:", "max_tokens": 4, "temperature": 0}
    r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.headers["X-Adapter-Version"] == "1"
    # The interrupted version can be pushed again and is served.
    assert push(control, "tok", states[2], 2).status_code == 200
    assert httpx.get(f"http://127.0.0.1:{port}/health").json()["adapter_version"] == 2


def test_after_a_rejected_push_and_a_good_retry_a_restart_serves_the_retried_version(
    start_replica, tmp_path, tiny_lora_shapes
):
    store = tmp_path / "replica-store"
    first = start_replica("--data", "none", store_dir=store)
    control, token = first.control_address, first.token
    good = lora_states(tiny_lora_shapes, 2)
    assert push(control, token, good[0], 0).status_code == 200
    wrong_dims = {
        k: np.zeros((8, s[1] + 3) if "lora_A" in k else (s[0] + 3, 8), np.float32)
        for k, s in tiny_lora_shapes.items()
    }
    assert push(control, token, wrong_dims, 1).status_code == 400
    assert push(control, token, good[1], 1).status_code == 200
    assert httpx.get(first.url + "/health").json()["adapter_version"] == 1
    first.stop()
    second = start_replica("--data", "none", store_dir=store)
    health = httpx.get(second.url + "/health").json()
    assert health["adapter_version"] == 1, json.dumps(health)
