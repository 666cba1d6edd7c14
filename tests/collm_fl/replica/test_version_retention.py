"""A long-lived replica keeps a bounded number of received versions on disk."""

import numpy as np
import pytest

from collm_fl.adapters import LoraSpec
from collm_fl.replica.runtime import Replica, ReplicaConfig
from collm_fl.store.adapter_io import TEMP_PREFIX, cleanup_partial_dirs, remove_adapter_dir


@pytest.fixture()
def make_replica(tmp_path):
    started: list[Replica] = []

    def make(keep: int) -> Replica:
        r = Replica(
            ReplicaConfig(model="tiny", store_dir=str(tmp_path / "store"), keep_versions=keep)
        )
        r.start()
        started.append(r)
        return r

    yield make
    for r in started:
        r.stop()


def push(r: Replica, version: int, run: str = "default") -> None:
    rng = np.random.default_rng(version)
    shapes = r.modules.expected_shapes()
    state = {k: (rng.standard_normal(s) * 0.01).astype(np.float32) for k, s in shapes.items()}
    r.push_version(state, LoraSpec().to_peft_config_dict("tiny"), version, run=run)


def test_only_the_newest_versions_stay_on_disk_and_rollback_still_works(make_replica):
    r = make_replica(keep=3)
    for v in range(8):
        push(r, v)
    assert r.stored_versions() == [5, 6, 7]
    assert not [p for p in r.version_dir(7).parent.iterdir() if p.name.startswith(TEMP_PREFIX)]
    r.rollback(5)
    assert r.served_version == 5
    push(r, 8)
    assert r.stored_versions() == [6, 7, 8] and r.served_version == 8


def test_a_rollback_to_a_version_not_stored_and_to_one_unreadable_are_told_apart(make_replica):
    # The control API answers the first 404 version_not_found, the second 500 store_error: the
    # version is there, the caller asked nothing wrong.
    from collm_fl.errors import StoreError, VersionNotStoredError

    r = make_replica(keep=0)
    push(r, 1)
    push(r, 2)
    with pytest.raises(VersionNotStoredError):
        r.rollback(7)
    (r.version_dir(1) / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(StoreError) as info:
        r.rollback(1)
    assert not isinstance(info.value, VersionNotStoredError)
    assert r.served_version == 2  # still serving what it served


def test_keep_zero_keeps_every_version(make_replica):
    r = make_replica(keep=0)
    for v in range(5):
        push(r, v)
    assert r.stored_versions() == [0, 1, 2, 3, 4]


def test_a_restart_recovers_the_newest_kept_version(make_replica):
    r = make_replica(keep=2)
    for v in range(4):
        push(r, v)
    r.stop()
    again = make_replica(keep=2)
    assert again.recover() == 3 and again.served_version == 3


def test_a_restart_after_a_rollback_serves_the_version_rolled_back_to(make_replica):
    """v3 misbehaved, the operator rolled back to v1: a restart must not serve v3 again (and
    then refuse v2 as older); the next push ends the rollback."""
    r = make_replica(keep=0)
    for v in range(4):
        push(r, v)
    r.rollback(1)
    r.stop()
    again = make_replica(keep=0)
    assert again.recover() == 1 and again.served_version == 1
    push(again, 2)  # newer than what it serves: taken
    again.stop()
    third = make_replica(keep=0)
    assert third.recover() == 3  # the push ended the rollback: the newest again


def test_a_restart_resumes_the_run_served_last_whatever_folder_changed_since(make_replica):
    """Run "a" served up to v3, then run "b" from v1. A push of "a" that failed, or a restart's
    clean-up in it, touches a's folder after b's: chosen by the folders' times, a restart served
    a's v3 again, a version of a run no longer served."""
    import os
    import time

    r = make_replica(keep=0)
    for v in range(4):
        push(r, v, run="a")
    push(r, 1, run="b")
    r.stop()
    a_dir = r.version_dir(3, "a").parent
    later = time.time() + 60
    os.utime(a_dir, (later, later))  # (as writing and removing a failed push's files does)
    again = make_replica(keep=0)
    assert again.recover() == 1 and again.run == "b"
    push(again, 4, run="a")  # the federation moves back to run a: a restart follows it
    again.stop()
    third = make_replica(keep=0)
    assert third.recover() == 4 and third.run == "a"


def test_a_restart_passes_over_a_version_whose_config_is_no_lora_config(make_replica):
    import json

    r = make_replica(keep=0)
    for v in range(3):
        push(r, v)
    r.stop()
    config = r.version_dir(2) / "adapter_config.json"
    broken = json.loads(config.read_text())
    del broken["r"]
    config.write_text(json.dumps(broken))
    again = make_replica(keep=0)
    assert again.recover() == 1 and again.served_version == 1  # the newest valid one


def test_a_float64_value_past_float32_is_refused_not_served_as_inf(make_replica):
    from collm_fl.errors import AdapterValidationError

    r = make_replica(keep=0)
    shapes = r.modules.expected_shapes()
    state = {k: np.zeros(s, np.float64) for k, s in shapes.items()}
    key = sorted(state)[0]
    state[key][0, 0] = 1e39
    with pytest.raises(AdapterValidationError, match="non-finite values"):
        r.push_version(state, LoraSpec().to_peft_config_dict("tiny"), 1)
    assert r.served_version is None and r.stored_versions() == []


def test_removal_is_all_or_nothing(tmp_path):
    vdir = tmp_path / "run" / "v0003"
    vdir.mkdir(parents=True)
    (vdir / "adapter_model.safetensors").write_bytes(b"x" * 10)
    remove_adapter_dir(vdir)
    assert not vdir.exists() and list((tmp_path / "run").iterdir()) == []
    # A crash between the rename and the delete leaves only a temp dir, which recovery removes.
    (tmp_path / "run" / f"{TEMP_PREFIX}rm-v0002-abc").mkdir()
    assert len(cleanup_partial_dirs(tmp_path / "run")) == 1


@pytest.mark.parametrize("fails", ["swap", "write"])
def test_a_stored_version_pushed_again_keeps_its_copy_when_the_new_one_fails(
    make_replica, monkeypatch, fails
):
    """Pushed again after a rollback from it: if the new swap (every slot pinned) or the new
    copy's write (disk full) fails, the stored copy is still there for a rollback."""
    import collm_fl.replica.runtime as runtime
    from collm_fl.errors import StoreError
    from collm_fl.replica.slots import NoFreeSlotError

    r = make_replica(keep=0)
    for v in range(3):
        push(r, v)
    r.rollback(1)
    stored = (r.version_dir(2) / "adapter_model.safetensors").read_bytes()
    error = NoFreeSlotError("every slot pinned") if fails == "swap" else StoreError("disk full")

    def failing(*args, **kwargs):
        raise error

    if fails == "swap":
        monkeypatch.setattr(r, "_swap", failing)
    else:
        monkeypatch.setattr(runtime, "write_adapter_dir", failing)
    with pytest.raises(type(error)):
        push(r, 2)
    monkeypatch.undo()
    assert (r.version_dir(2) / "adapter_model.safetensors").read_bytes() == stored
    assert not [p for p in r.version_dir(2).parent.iterdir() if p.name.startswith(TEMP_PREFIX)]
    r.rollback(2)
    assert r.served_version == 2


def test_a_version_set_aside_by_a_crashed_re_push_is_put_back_at_start(make_replica):
    from collm_fl.replica.runtime import ASIDE_PREFIX

    r = make_replica(keep=0)
    for v in range(3):
        push(r, v)
    r.stop()
    run_dir = r.version_dir(2).parent
    # A crash after v2 was set aside and before its new copy was written:
    r.version_dir(2).rename(run_dir / f"{ASIDE_PREFIX}v0002-0123abcd")
    # ... and one after v1's new copy landed (its old copy still aside):
    (run_dir / f"{ASIDE_PREFIX}v0001-4567cdef").mkdir()
    again = make_replica(keep=0)
    assert again.recover() == 2 and again.stored_versions() == [0, 1, 2]
    assert not [p for p in run_dir.iterdir() if p.name.startswith(ASIDE_PREFIX)]


def test_a_rollback_is_remembered_before_it_is_served_and_not_if_it_fails(
    make_replica, monkeypatch
):
    """The marker was written after the promotion: a crash between the two made a restart serve
    the version rolled back from. A rollback that fails leaves the marker as it was."""
    from collm_fl.replica.runtime import ROLLED_BACK

    r = make_replica(keep=0)
    for v in range(4):
        push(r, v)
    marker = r.version_dir(1).parent / ROLLED_BACK
    promote = r._load_and_promote
    seen: list[str | None] = []

    def promoting(*args, **kwargs):
        seen.append(marker.read_text() if marker.exists() else None)
        if len(seen) == 2:
            raise RuntimeError("the load failed")
        return promote(*args, **kwargs)

    monkeypatch.setattr(r, "_load_and_promote", promoting)
    r.rollback(1)
    assert seen == ["1\n"] and r.served_version == 1
    with pytest.raises(RuntimeError, match="the load failed"):
        r.rollback(2)
    assert marker.read_text() == "1\n" and r.served_version == 1


def test_a_served_push_is_remembered_even_if_its_old_copy_cannot_be_removed(
    make_replica, monkeypatch
):
    """v3 pushed again after a rollback to v1: the new copy serves, so the push succeeded even
    if the old copy set aside cannot be removed (a restart removes it); a restart serves v3,
    not the rollback's v1."""
    import collm_fl.replica.runtime as runtime
    from collm_fl.errors import StoreError
    from collm_fl.replica.runtime import ASIDE_PREFIX, ROLLED_BACK

    r = make_replica(keep=0)
    for v in range(4):
        push(r, v)
    r.rollback(1)
    marker = r.version_dir(1).parent / ROLLED_BACK
    assert marker.exists()
    remove = runtime.remove_adapter_dir

    def removing(path):
        if path.name.startswith(ASIDE_PREFIX):
            raise StoreError(f"{path}: cannot remove adapter: device busy")
        remove(path)

    monkeypatch.setattr(runtime, "remove_adapter_dir", removing)
    push(r, 3)
    monkeypatch.undo()
    assert r.served_version == 3 and not marker.exists()
    r.stop()
    again = make_replica(keep=0)
    assert again.recover() == 3 and again.served_version == 3
    assert not [p for p in marker.parent.iterdir() if p.name.startswith(ASIDE_PREFIX)]
