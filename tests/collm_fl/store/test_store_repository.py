"""VersionStore: numbering, resume, crash safety, atomic round results, other database URLs."""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy as st_np
from sqlalchemy import event

from collm_fl.errors import StoreError
from collm_fl.store import ParticipationRecord, RoundRecord, VersionStore, repository
from collm_fl.store.models import Version

T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
T1 = datetime(2025, 1, 1, 12, 1, tzinfo=UTC)


def _round(number: int, version_number: int | None = None) -> RoundRecord:
    return RoundRecord(
        number=number,
        status="aggregated",
        started_at=T0,
        finished_at=T1,
        seconds=60.0,
        num_ok=2,
        num_rejected=1,
        train_loss=1.5,
        eval_loss=1.25,
        eval_perplexity=3.49,
        version_number=version_number,
        metrics={"update_norm": 0.5},
    )


def _parts() -> list[ParticipationRecord]:
    return [
        ParticipationRecord(node_id=2**62 + 1, status="ok", num_examples=10, train_loss=1.4),
        ParticipationRecord(node_id=7, status="ok", num_examples=20, train_loss=1.6),
        ParticipationRecord(node_id=9, status="rejected", reason="NaN in lora_B"),
    ]


def _dirs(store: VersionStore, run_name: str) -> list[str]:
    return sorted(p.name for p in (store.root / "runs" / run_name / "versions").iterdir())


def test_saved_version_loads_back_identical_with_checksum(
    store: VersionStore, make_state, assert_states_equal, peft_config
) -> None:
    run = store.open_run("r", {"rounds": 3}, "tiny")
    state = make_state(0)
    info = store.save_version(run.id, 0, state, peft_config, {"norm": 1.0}, eval_loss=2.0)
    assert (info.number, info.round_number, info.parent_number) == (0, 0, None)
    assert info.path == "runs/r/versions/v0000" and info.metrics == {"norm": 1.0}
    assert store.version_dir(info) == store.root / "runs/r/versions/v0000"
    assert_states_equal(store.load_version(info), state)
    assert store.get_version(run.id, 0) == info


def test_versions_are_numbered_from_zero_at_round_zero_then_consecutively(
    store: VersionStore, make_state, peft_config
) -> None:
    run = store.open_run("r", {}, "tiny")
    for rnd in (0, 1, 2):
        store.save_version(run.id, rnd, make_state(rnd), peft_config, {})
    infos = store.list_versions(run.id)
    assert [(v.number, v.round_number, v.parent_number) for v in infos] == [
        (0, 0, None),
        (1, 1, 0),
        (2, 2, 1),
    ]
    assert _dirs(store, "r") == ["v0000", "v0001", "v0002"]


def test_first_version_after_round_zero_is_number_one(
    store: VersionStore, make_state, peft_config
) -> None:
    run = store.open_run("r", {}, "tiny")
    assert store.latest_version(run.id) is None
    assert store.save_version(run.id, 3, make_state(0), peft_config, {}).number == 1


def test_version_older_than_latest_round_is_refused(
    store: VersionStore, make_state, peft_config
) -> None:
    run = store.open_run("r", {}, "tiny")
    store.save_version(run.id, 2, make_state(0), peft_config, {})
    with pytest.raises(StoreError, match="older"):
        store.save_version(run.id, 1, make_state(1), peft_config, {})


def test_reopened_store_resumes_latest_version_and_last_completed_round(
    tmp_path: Path, make_state, assert_states_equal, peft_config
) -> None:
    with VersionStore(tmp_path / "s") as first:
        run = first.open_run("r", {"rounds": 5}, "tiny")
        first.save_version(run.id, 0, make_state(0), peft_config, {})
        first.save_version(run.id, 1, make_state(1), peft_config, {})
        first.record_round(run.id, _round(1, version_number=1))
    with VersionStore(tmp_path / "s") as second:
        resumed = second.open_run("r", {"rounds": 5}, "tiny")
        assert resumed == run
        latest = second.latest_version(run.id)
        assert latest is not None and latest.number == 1
        assert_states_equal(second.load_version(latest), make_state(1))
        assert second.last_completed_round(run.id) == 1
        assert second.list_rounds(run.id)[0].version_number == 1


def test_resuming_a_run_on_another_base_model_is_refused(store: VersionStore) -> None:
    store.open_run("r", {}, "tiny")
    with pytest.raises(StoreError, match="base model"):
        store.open_run("r", {}, "other")


def test_resuming_a_run_with_another_lora_shape_is_refused_and_other_changes_apply(
    store: VersionStore,
) -> None:
    store.open_run("r", {"lora-rank": 8, "lora-alpha": 16.0, "num-server-rounds": 3}, "tiny")
    with pytest.raises(StoreError, match=r"lora-rank=8.*lora-rank=16"):
        store.open_run("r", {"lora-rank": 16, "lora-alpha": 16.0, "num-server-rounds": 3}, "tiny")
    with pytest.raises(StoreError, match="lora-alpha"):
        store.open_run("r", {"lora-rank": 8, "lora-alpha": 32.0, "num-server-rounds": 3}, "tiny")
    more_rounds = {"lora-rank": 8, "lora-alpha": 16.0, "num-server-rounds": 6}
    run = store.open_run("r", more_rounds, "tiny")
    assert run.name == "r"  # resuming for more rounds
    # What changed is stored with each resume (only logged, the rounds after it were aggregated
    # with settings the store did not hold); a refused resume adds nothing, an unchanged none.
    store.open_run("r", {"lora-rank": 8, "lora-alpha": 16.0, "num-server-rounds": 3}, "tiny")
    (event,) = store.events(run.id, "config-changed")
    assert event.payload == {"changed": {"num-server-rounds": {"was": 3, "now": 6}}}
    assert store.get_run(run.id).config["num-server-rounds"] == 3  # (as the run started)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("seq-len", 32),
        ("central-eval-samples", 4),
        ("data", "other.jsonl"),
        ("quantization", "4bit"),
    ],
)
def test_resuming_on_another_central_held_out_set_is_refused(
    store: VersionStore, key: str, value: object
) -> None:
    # The stored versions' losses were measured on the first set; the quality gate would hold new
    # versions against numbers from another one.
    first = {
        "seq-len": 128,
        "central-eval-samples": 16,
        "data": "shakespeare",
        "quantization": "none",
    }
    store.open_run("r", first, "tiny")
    with pytest.raises(StoreError, match=rf"{key}=.*cannot be resumed"):
        store.open_run("r", {**first, key: value}, "tiny")


def test_run_names_that_are_not_safe_directory_names_are_refused(store: VersionStore) -> None:
    for bad in ("../x", "", "a/b", ".hidden"):
        with pytest.raises(StoreError, match="run name"):
            store.open_run(bad, {}, "tiny")


@pytest.mark.parametrize("where", ["safetensors", "rename"])
def test_crash_mid_write_leaves_no_dir_temp_or_row_and_previous_still_loads(
    store: VersionStore,
    make_state,
    assert_states_equal,
    peft_config,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    run = store.open_run("r", {}, "tiny")
    store.save_version(run.id, 0, make_state(0), peft_config, {})

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("crash injected")

    if where == "safetensors":
        monkeypatch.setattr(st_np, "save_file", boom)
    else:
        monkeypatch.setattr(os, "rename", boom)
    with pytest.raises(StoreError, match="crash injected"):
        store.save_version(run.id, 1, make_state(1), peft_config, {})
    monkeypatch.undo()
    assert _dirs(store, "r") == ["v0000"]
    assert [v.number for v in store.list_versions(run.id)] == [0]
    latest = store.latest_version(run.id)
    assert latest is not None
    assert_states_equal(store.load_version(latest), make_state(0))
    # and the next save takes the number the failed one would have had
    assert store.save_version(run.id, 1, make_state(1), peft_config, {}).number == 1


def test_database_failure_during_save_removes_the_written_dir(
    store: VersionStore, make_state, peft_config
) -> None:
    run = store.open_run("r", {}, "tiny")
    store.save_version(run.id, 0, make_state(0), peft_config, {})

    def fail_insert(*args: object) -> None:
        raise RuntimeError("database went away")

    event.listen(Version, "before_insert", fail_insert)
    try:
        with pytest.raises(RuntimeError, match="went away"):
            store.save_version(run.id, 1, make_state(1), peft_config, {})
    finally:
        event.remove(Version, "before_insert", fail_insert)
    assert _dirs(store, "r") == ["v0000"]
    assert [v.number for v in store.list_versions(run.id)] == [0]


def test_tampered_weights_raise_store_error_on_load(
    store: VersionStore, make_state, peft_config
) -> None:
    run = store.open_run("r", {}, "tiny")
    info = store.save_version(run.id, 0, make_state(0), peft_config, {})
    weights = store.version_dir(info) / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="checksum mismatch"):
        store.load_version(info)


def test_round_result_stores_round_and_participations_together(store: VersionStore) -> None:
    run = store.open_run("r", {}, "tiny")
    info = store.record_round_result(run.id, _round(1), _parts())
    assert info.started_at == T0 and info.metrics == {"update_norm": 0.5}
    assert store.list_rounds(run.id) == [info]
    parts = store.participations(run.id, 1)
    assert [(p.node_id, p.status, p.reason) for p in parts] == [
        (2**62 + 1, "ok", None),
        (7, "ok", None),
        (9, "rejected", "NaN in lora_B"),
    ]
    assert store.participations(run.id, 2) == []


def test_round_result_failing_midway_commits_nothing(
    store: VersionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = store.open_run("r", {}, "tiny")
    real = repository._participation_row
    calls = []

    def second_fails(run_id: int, round_number: int, p: ParticipationRecord) -> object:
        calls.append(p.node_id)
        if len(calls) == 2:
            raise RuntimeError("crash injected")
        return real(run_id, round_number, p)

    monkeypatch.setattr(repository, "_participation_row", second_fails)
    with pytest.raises(RuntimeError, match="crash injected"):
        store.record_round_result(run.id, _round(1), _parts())
    assert store.list_rounds(run.id) == []
    assert store.participations(run.id) == []
    assert store.last_completed_round(run.id) == 0


def test_a_version_and_the_round_that_saved_it_are_one_transaction(
    store: VersionStore, make_state, peft_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = store.open_run("r", {}, "tiny")
    store.save_version(run.id, 0, make_state(0), peft_config, {})
    info = store.save_version(
        run.id, 1, make_state(1), peft_config, {}, 1.25, round=_round(1), participations=_parts()
    )
    (round1,) = store.list_rounds(run.id)
    assert (round1.number, round1.version_number, info.number) == (1, 1, 1)
    assert len(store.participations(run.id, 1)) == 3
    # A crash while the round's rows are added: neither the version nor the round is recorded,
    # and the version's directory is gone with it.
    real = repository._participation_row

    def fails(run_id: int, round_number: int, p: ParticipationRecord) -> object:
        raise RuntimeError("crash injected")

    monkeypatch.setattr(repository, "_participation_row", fails)
    with pytest.raises(RuntimeError, match="crash injected"):
        store.save_version(
            run.id, 2, make_state(2), peft_config, {}, round=_round(2), participations=_parts()
        )
    monkeypatch.setattr(repository, "_participation_row", real)
    assert [v.number for v in store.list_versions(run.id)] == [0, 1]
    assert [r.number for r in store.list_rounds(run.id)] == [1]
    assert _dirs(store, "r") == ["v0000", "v0001"]
    assert store.last_completed_round(run.id) == 1
    with pytest.raises(StoreError, match="round 3 cannot save a version of 2"):
        store.save_version(run.id, 2, make_state(2), peft_config, {}, round=_round(3))


def test_a_commit_that_raises_after_it_took_effect_keeps_the_versions_directory(
    store: VersionStore, make_state, peft_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A connection lost during COMMIT after the server applied it: the row is there, so its
    # directory must stay (removing it left a version no resume could load).
    run = store.open_run("r", {}, "tiny")
    store.save_version(run.id, 0, make_state(0), peft_config, {})
    real = repository.session_scope
    calls = []

    @contextmanager
    def lost_after_commit(engine):  # the save's second transaction: the insert
        calls.append(1)
        with real(engine) as s:
            yield s
        if len(calls) == 2:
            raise StoreError("database error: server closed the connection unexpectedly")

    monkeypatch.setattr(repository, "session_scope", lost_after_commit)
    with pytest.raises(StoreError, match="closed the connection"):
        store.save_version(run.id, 1, make_state(1), peft_config, {})
    monkeypatch.setattr(repository, "session_scope", real)
    assert [v.number for v in store.list_versions(run.id)] == [0, 1]
    assert _dirs(store, "r") == ["v0000", "v0001"]
    assert store.load_version(store.latest_version(run.id)).keys() == make_state(1).keys()
    report = store.check_consistency()
    assert not report.missing_version_dirs and not report.removed_orphan_dirs


def test_recording_the_same_round_twice_is_refused(store: VersionStore) -> None:
    run = store.open_run("r", {}, "tiny")
    store.record_round(run.id, _round(1))
    with pytest.raises(StoreError):
        store.record_round_result(run.id, _round(1), _parts())
    assert store.participations(run.id) == []


def test_single_participation_is_recorded_with_its_reason(store: VersionStore) -> None:
    run = store.open_run("r", {}, "tiny")
    store.record_participation(run.id, 1, 5, "failed", reason="timeout")
    assert [(p.node_id, p.reason) for p in store.participations(run.id)] == [(5, "timeout")]


def test_unknown_participation_status_is_refused(store: VersionStore) -> None:
    run = store.open_run("r", {}, "tiny")
    with pytest.raises(StoreError, match="participation status"):
        store.record_participation(run.id, 1, 6, "maybe")


def test_events_are_stored_in_order_and_filtered_by_kind(store: VersionStore) -> None:
    run = store.open_run("r", {}, "tiny")
    store.record_event(run.id, "allocation", {"replica": "a", "train_share": 0.25})
    store.record_event(run.id, "slo", {"ok": True})
    store.record_event(run.id, "allocation", {"replica": "b", "train_share": 0.5})
    alloc = store.events(run.id, "allocation")
    assert [e.payload["replica"] for e in alloc] == ["a", "b"]
    assert len(store.events(run.id)) == 3
    with pytest.raises(StoreError, match="JSON"):
        store.record_event(run.id, "bad", {"x": object()})


def test_a_run_ends_with_its_status_and_its_event_together(store: VersionStore) -> None:
    run = store.open_run("r", {}, "tiny")
    store.set_run_status(run.id, "running")
    with pytest.raises(StoreError, match="JSON"):  # the event cannot be stored: no status either
        store.end_run(run.id, "failed", "run-failed", {"error": object()})
    assert store.find_run("r").status == "running" and store.events(run.id) == []
    # The event's insert failing inside the transaction (a crash between the two writes, as
    # two transactions had it) leaves the status as it was.
    from collm_fl.store import repository

    def no_event(**kwargs):
        raise RuntimeError("killed between the status and the event")

    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(repository, "Event", no_event)
        with pytest.raises(RuntimeError, match="killed"):
            store.end_run(run.id, "finished", "run-finished", {"latest_version": 3})
    assert store.find_run("r").status == "running"
    assert store.end_run(run.id, "finished", "run-finished", {"latest_version": 3})
    assert store.find_run("r").status == "finished"
    assert [e.payload for e in store.events(run.id, "run-finished")] == [{"latest_version": 3}]
    # A launcher marking a run that ended meanwhile changes nothing.
    assert not store.end_run(run.id, "failed", "run-failed", {"error": "x"}, only_if="running")
    assert store.find_run("r").status == "finished" and not store.events(run.id, "run-failed")


def test_every_folder_a_first_version_makes_is_made_durable_in_its_parent(
    store: VersionStore, make_state, peft_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (the runs/ and runs/<name>/ a first save made were never fsynced in their parents: a power
    # cut could keep the version's row and lose its folder)
    from collm_fl.store import adapter_io

    synced: list[Path] = []
    real = adapter_io._fsync_dir

    def recording(path: Path) -> None:
        synced.append(Path(path))
        real(path)

    monkeypatch.setattr(adapter_io, "_fsync_dir", recording)
    run = store.open_run("fresh", {}, "tiny")
    store.save_version(run.id, 0, make_state(0), peft_config, {})
    runs = store.root / "runs"
    # runs/ made in the root, runs/fresh/ in runs/, versions/ in runs/fresh/, v0000 in versions/
    for parent in (store.root, runs, runs / "fresh", runs / "fresh" / "versions"):
        assert parent in synced, (parent, synced)


def test_store_works_with_a_database_url_in_another_directory(
    tmp_path: Path, make_state, assert_states_equal, peft_config
) -> None:
    url = f"sqlite:///{tmp_path / 'elsewhere' / 'nested' / 'meta.db'}"
    with VersionStore(tmp_path / "files", url=url) as store:
        run = store.open_run("r", {}, "tiny")
        store.save_version(run.id, 0, make_state(0), peft_config, {})
    assert (tmp_path / "elsewhere" / "nested" / "meta.db").is_file()
    assert not (tmp_path / "files" / "store.db").exists()
    with VersionStore(tmp_path / "files", url=url) as store:
        latest = store.latest_version(run.id)
        assert latest is not None
        assert_states_equal(store.load_version(latest), make_state(0))


def test_opening_removes_temp_dirs_and_version_dirs_without_rows(
    tmp_path: Path, make_state, peft_config
) -> None:
    with VersionStore(tmp_path / "s") as store:
        run = store.open_run("r", {}, "tiny")
        store.save_version(run.id, 0, make_state(0), peft_config, {})
    versions = tmp_path / "s" / "runs" / "r" / "versions"
    (versions / ".tmp-v0001-dead").mkdir()  # crash mid-write
    (versions / "v0001").mkdir()  # crash between rename and commit
    with VersionStore(tmp_path / "s") as store:
        assert [p.name for p in store.consistency.removed_temp_dirs] == [".tmp-v0001-dead"]
        assert [p.name for p in store.consistency.removed_orphan_dirs] == ["v0001"]
        assert _dirs(store, "r") == ["v0000"]
        assert store.save_version(run.id, 1, make_state(1), peft_config, {}).number == 1


def test_a_version_dir_no_crash_explains_is_kept_and_reported(
    tmp_path: Path, make_state, peft_config
) -> None:
    with VersionStore(tmp_path / "s") as store:
        run = store.open_run("r", {}, "tiny")
        store.save_version(run.id, 0, make_state(0), peft_config, {})
    versions = tmp_path / "s" / "runs" / "r" / "versions"
    (versions / "v0001").mkdir()  # what a crash leaves: the next number
    (versions / "v0005").mkdir()  # not: a gap no save of this database makes
    with VersionStore(tmp_path / "s") as store:
        assert [p.name for p in store.consistency.removed_orphan_dirs] == ["v0001"]
        assert [p.name for p in store.consistency.unexplained_version_dirs] == ["v0005"]
        assert _dirs(store, "r") == ["v0000", "v0005"]


def test_another_databases_versions_under_the_same_root_are_never_deleted(
    tmp_path: Path, make_state, peft_config
) -> None:
    root = tmp_path / "s"
    with VersionStore(root, url=f"sqlite:///{tmp_path / 'a.db'}") as first:
        run = first.open_run("r", {}, "tiny")
        for n in range(3):
            first.save_version(run.id, n, make_state(n), peft_config, {})
    hour_ago = datetime.now(UTC).timestamp() - 3600  # written well before the other run began
    for d in (root / "runs" / "r" / "versions").iterdir():
        os.utime(d, (hour_ago, hour_ago))
    # The default database, same root, same run name: refused, nothing written.
    with (
        VersionStore(root) as other,
        pytest.raises(StoreError, match="holds versions of a run of that name"),
    ):
        other.open_run("r", {}, "tiny")
    with VersionStore(root) as other:  # opened again: not its run, so not its folder
        assert not other.consistency.removed_orphan_dirs
    assert sorted(p.name for p in (root / "runs" / "r" / "versions").iterdir()) == [
        "v0000",
        "v0001",
        "v0002",
    ]
    with VersionStore(root, url=f"sqlite:///{tmp_path / 'a.db'}") as first:
        run = first.find_run("r")
        assert [first.load_version(v) is not None for v in first.list_versions(run.id)] == [
            True
        ] * 3


def test_version_whose_dir_vanished_is_reported_and_fails_to_load(
    tmp_path: Path, make_state, peft_config
) -> None:
    with VersionStore(tmp_path / "s") as store:
        run = store.open_run("r", {}, "tiny")
        info = store.save_version(run.id, 0, make_state(0), peft_config, {})
    for f in store.version_dir(info).iterdir():
        f.unlink()
    store.version_dir(info).rmdir()
    with VersionStore(tmp_path / "s") as store:
        assert store.consistency.missing_version_dirs == (store.version_dir(info),)
        with pytest.raises(StoreError, match="missing"):
            store.load_version(info)


def test_a_new_database_beside_an_old_runs_versions_is_refused_before_anything_is_written(
    tmp_path: Path, make_state, peft_config
) -> None:
    first = VersionStore(tmp_path)
    run = first.open_run("r", {}, "tiny")
    first.save_version(run.id, 0, make_state(0), peft_config, {})
    first.close()
    (tmp_path / "store.db").unlink()  # the database lost, the versions kept
    again = VersionStore(tmp_path)
    with pytest.raises(StoreError, match=r"holds versions of a run of that name.*another run-name"):
        again.open_run("r", {}, "tiny")
    assert again.open_run("other", {}, "tiny").name == "other"
    again.close()


def test_an_example_count_the_strategy_accepts_fits_the_column_on_every_database():
    # The strategy accepts claims up to MAX_NUM_EXAMPLES (2**53); INTEGER is 32-bit on
    # PostgreSQL and MySQL, where a claim of 3e9 crashed the round's save.
    from sqlalchemy.dialects import mysql, postgresql
    from sqlalchemy.schema import CreateTable

    from collm_fl.store.models import Participation

    for dialect in (postgresql.dialect(), mysql.dialect()):
        ddl = str(CreateTable(Participation.__table__).compile(dialect=dialect))
        assert "num_examples BIGINT" in ddl


def test_two_stores_opening_the_same_new_run_at_once_both_get_it(tmp_path, monkeypatch):
    """SQLite's default transactions take no lock before an insert: two processes that both
    looked for a new run before either inserted it both inserted it, and the second failed on
    the name's unique constraint instead of resuming the run."""
    import contextlib
    import threading

    looked = threading.Barrier(2, timeout=1.0)  # (a store under the lock never gets here twice)
    select = repository.select

    def select_then_meet(*args, **kwargs):
        with contextlib.suppress(threading.BrokenBarrierError):
            looked.wait()  # both stores have looked before either inserts, if nothing locks
        return select(*args, **kwargs)

    stores = [VersionStore(tmp_path / "s"), VersionStore(tmp_path / "s")]
    monkeypatch.setattr(repository, "select", select_then_meet)  # (after their own repairs)
    got: dict[int, object] = {}

    def open_it(i: int) -> None:
        try:
            got[i] = stores[i].open_run("r", {}, "tiny").id
        except StoreError as e:
            got[i] = e

    threads = [threading.Thread(target=open_it, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in stores:
        s.close()
    assert got[0] == got[1] and isinstance(got[0], int), got


def test_a_save_that_failed_after_its_rename_does_not_block_the_next(
    store, make_state, peft_config, monkeypatch
):
    """A folder fsync failing after the version's rename left its folder with no row: the next
    save picked the same number and refused for good ("already exists")."""
    from collm_fl.store import adapter_io

    run = store.open_run("r", {}, "tiny")
    store.save_version(run.id, 0, make_state(0), peft_config, {})
    fsync = adapter_io._fsync_dir
    failed = []

    def fails_once_after_the_rename(folder):
        if not failed and (folder / "v0001").exists():
            failed.append(folder)
            raise OSError("fsync: input/output error")
        fsync(folder)

    monkeypatch.setattr(adapter_io, "_fsync_dir", fails_once_after_the_rename)
    with pytest.raises(StoreError, match="input/output error"):
        store.save_version(run.id, 1, make_state(1), peft_config, {})
    assert failed and (failed[0] / "v0001").exists()  # (the case: renamed, no row)
    info = store.save_version(run.id, 1, make_state(2), peft_config, {})
    assert info.number == 1
    state = store.load_version(info)
    np.testing.assert_array_equal(state[sorted(state)[0]], make_state(2)[sorted(state)[0]])
    # A folder no save of this store left (the root may be shared with another database) stays.
    other = failed[0] / "v0002"
    other.mkdir()
    with pytest.raises(StoreError, match="already exists"):
        store.save_version(run.id, 2, make_state(3), peft_config, {})
    assert other.exists()
