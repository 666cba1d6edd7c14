"""The version store: runs, rounds, participations and events in SQL; adapter versions on disk.

Layout under ``root``::

    store.db                              (default database; any SQLAlchemy URL works)
    runs/<run name>/versions/v0000/       (PEFT directory: adapter_config.json + safetensors)
    runs/<run name>/versions/v0001/ ...

Disk and database agree by construction: a version directory is written atomically *before* its
row is inserted, and removed again if the insert fails. The one gap (a crash after the rename and
before the commit) leaves a directory with no row, which :meth:`VersionStore.check_consistency`
removes when the store opens. Callers get frozen dataclasses, never ORM rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import re
import shutil
import threading
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TypeVar, get_args

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from collm_fl.adapters import AdapterState
from collm_fl.errors import StoreError
from collm_fl.store.adapter_io import cleanup_partial_dirs, read_adapter_dir, write_adapter_dir
from collm_fl.store.db import make_engine, session_scope
from collm_fl.store.models import Base, Event, Participation, Round, Run, Version
from collm_fl.store.records import (
    ConfigValue,
    ConsistencyReport,
    EventInfo,
    ParticipationInfo,
    ParticipationRecord,
    ParticipationStatus,
    RoundInfo,
    RoundRecord,
    RoundStatus,
    RunInfo,
    RunStatus,
    VersionInfo,
)

log = logging.getLogger(__name__)

_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_VERSION_DIR = re.compile(r"v(\d{4,})")
_InfoT = TypeVar("_InfoT")
MTIME_SLACK_S = 2.0  # file times and the database's clock may round differently
# Settings a run's stored versions depend on, fixed for its life: their shape and scale, and the
# central held-out set their losses were measured on (the quality gate compares new versions'
# losses with the stored ones).
RESUME_FIXED_KEYS = frozenset(
    {"lora-rank", "lora-alpha", "lora-targets"}
    | {"data", "central-heldout", "central-eval-samples", "seq-len", "seed"}
    | {"quantization"}  # other base weights: stored losses would not compare with new ones
)
# Event of a resume with settings other than the run started with: {"changed": {k: was/now}}.
CONFIG_CHANGED = "config-changed"


class VersionStore:
    """Runs, rounds and adapter versions of federated LoRA fine-tuning; one writer per run."""

    def __init__(self, root: Path, url: str | None = None) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = url if url is not None else f"sqlite:///{self.root / 'store.db'}"
        self._engine = make_engine(self.url)
        self._write_lock = threading.Lock()
        self._failed_saves: set[Path] = set()  # version folders a failed save left behind
        # The root's disk lock is held for every version write (directory and row) and for the
        # repair on open, by any process: so a repair never runs while a write is under way (a
        # reader opened mid-write must not delete the writer's temp dir or its just-renamed
        # version), and a store opened between writes finds nothing of a live writer to repair.
        # The lock dies with its process, so a crashed writer's leftovers are repaired on the
        # next open.
        self._lock_file: IO[str] | None = None
        try:
            self._lock_file = open(self.root / ".writer.lock", "a+")  # noqa: SIM115
            with self._disk_lock(wait=False) as locked:
                if locked:
                    self.consistency = self.check_consistency()
                else:
                    log.debug("store %s: a version is being written: skipping repair", self.root)
                    self.consistency = ConsistencyReport()
        except BaseException:  # (a repair that failed: no open engine or lock file left behind)
            self.close()
            raise

    @contextlib.contextmanager
    def _disk_lock(self, wait: bool) -> Iterator[bool]:
        """Hold the root's disk lock for the block (``wait=False``: yields False if taken)."""
        if self._lock_file is None:
            raise StoreError(f"the store at {self.root} is closed")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)

    def close(self) -> None:
        self._engine.dispose()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def __enter__(self) -> VersionStore:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # ---- runs ---------------------------------------------------------------------------------

    def open_run(self, name: str, config: Mapping[str, ConfigValue], base_model: str) -> RunInfo:
        """Create the run ``name`` or resume it; resuming on another base model is refused.

        Under the root's disk lock: two processes opening the same new run at once (SQLite's
        default transactions take no lock before the insert) would both insert it, and the
        second fail on the name's unique constraint instead of resuming it."""
        if not _RUN_NAME.fullmatch(name):
            raise StoreError(
                f"run name {name!r} must be 1-128 characters of letters, digits, '.', '_' or '-' "
                "and start with a letter or digit"
            )
        config_json = _dumps(dict(config), f"run {name!r} config")
        # (and this store's write lock: its threads share the lock file, whose flock they would
        # each take and release as their own)
        with self._write_lock, self._disk_lock(wait=True):
            return self._open_run(name, config, config_json, base_model)

    def _open_run(
        self, name: str, config: Mapping[str, ConfigValue], config_json: str, base_model: str
    ) -> RunInfo:
        with session_scope(self._engine) as s:
            run = s.scalar(select(Run).where(Run.name == name))
            if run is None:
                versions = self.root / "runs" / name / "versions"
                if versions.is_dir() and any(versions.iterdir()):
                    raise StoreError(
                        f"run {name!r} is not in this store's database ({self.url}), but "
                        f"{versions} holds versions of a run of that name (from another or a "
                        "deleted database): choose another run-name or output-dir, or move that "
                        "folder away"
                    )
                run = Run(name=name, config_json=config_json, base_model=base_model)
                s.add(run)
                s.flush()
                log.info("created run %r (id %d) on %s", name, run.id, base_model)
            elif run.base_model != base_model:
                raise StoreError(
                    f"run {name!r} was started on base model {run.base_model!r}; "
                    f"cannot resume it on {base_model!r}"
                )
            else:
                stored = json.loads(run.config_json)
                changed = sorted(
                    k for k in set(stored) | set(config) if stored.get(k) != config.get(k)
                )
                fixed = [k for k in changed if k in RESUME_FIXED_KEYS]
                if fixed:
                    was = ", ".join(f"{k}={stored.get(k)!r}" for k in fixed)
                    now = ", ".join(f"{k}={config.get(k)!r}" for k in fixed)
                    raise StoreError(
                        f"run {name!r} was started with {was}; its versions cannot be resumed "
                        f"with {now} (use another run name)"
                    )
                if changed:
                    log.warning(
                        "resuming run %r with changed settings: %s", name, ", ".join(changed)
                    )
                    # Stored with each resume (the run's row keeps the settings it started
                    # with): the rounds of this attempt are aggregated and gated with these.
                    was_now = {k: {"was": stored.get(k), "now": config.get(k)} for k in changed}
                    payload = _dumps({"changed": was_now}, f"run {name!r} changed settings")
                    s.add(Event(run_id=run.id, kind=CONFIG_CHANGED, payload_json=payload))
                log.info("resuming run %r (id %d)", name, run.id)
            return _run_info(run)

    def find_run(self, name: str) -> RunInfo:
        """The run called ``name``; StoreError listing the known runs if there is none."""
        with session_scope(self._engine) as s:
            run = s.scalar(select(Run).where(Run.name == name))
            if run is None:
                known = sorted(s.scalars(select(Run.name)))
                raise StoreError(f"no run named {name!r} in {self.url} (runs: {known or 'none'})")
            return _run_info(run)

    def get_run(self, run_id: int) -> RunInfo:
        with session_scope(self._engine) as s:
            return _run_info(_require_run(s, run_id))

    def set_run_status(self, run_id: int, status: RunStatus) -> None:
        _check_choice(status, RunStatus, "run status")
        with session_scope(self._engine) as s:
            _require_run(s, run_id).status = status

    def end_run(
        self,
        run_id: int,
        status: RunStatus,
        kind: str,
        payload: Mapping[str, object],
        only_if: RunStatus | None = None,
    ) -> bool:
        """Set the run's ``status`` and record its ending event in one transaction (a crash
        between the two would leave a run finished or failed with no event saying why); with
        ``only_if``, only a run in that status changes. Returns whether it changed."""
        _check_choice(status, RunStatus, "run status")
        payload_json = _dumps(dict(payload), f"event {kind!r} payload")
        with session_scope(self._engine) as s:
            run = _require_run(s, run_id)
            if only_if is not None and run.status != only_if:
                return False
            run.status = status
            s.add(Event(run_id=run_id, kind=kind, payload_json=payload_json))
            return True

    # ---- versions -----------------------------------------------------------------------------

    def save_version(
        self,
        run_id: int,
        round_number: int,
        state: AdapterState,
        peft_config: Mapping[str, object],
        metrics: Mapping[str, float],
        eval_loss: float | None = None,
        round: RoundRecord | None = None,
        participations: Sequence[ParticipationRecord] = (),
    ) -> VersionInfo:
        """Store ``state`` as the run's next version (0 if it is the first and round 0).

        With ``round`` (number ``round_number``) the round and its ``participations`` are
        recorded in the same transaction as the version, as the round that saved it: a crash
        leaves both or neither.
        """
        if round_number < 0:
            raise StoreError(f"round_number must be >= 0, got {round_number}")
        if round is not None:
            _check_choice(round.status, RoundStatus, "round status")
            if round.number != round_number:
                raise StoreError(f"round {round.number} cannot save a version of {round_number}")
        metrics_json = _dumps({k: float(v) for k, v in metrics.items()}, "version metrics")
        with self._write_lock, self._disk_lock(wait=True):
            with session_scope(self._engine) as s:
                run_name = _require_run(s, run_id).name
                latest = _latest_version_row(s, run_id)
                if latest is not None and round_number < latest.round_number:
                    raise StoreError(
                        f"run {run_name!r}: round {round_number} is older than the latest version "
                        f"v{latest.number} (round {latest.round_number})"
                    )
                parent = latest.number if latest is not None else None
            number = parent + 1 if parent is not None else (0 if round_number == 0 else 1)
            rel = f"runs/{run_name}/versions/v{number:04d}"
            dest = self.root / rel
            if dest in self._failed_saves and self._has_version_row(run_id, number) is False:
                # Left by a save of this store that failed after its rename (an fsync of the
                # folder, an interrupt): no row names it. (A folder of no save of ours is left
                # alone: the root may be shared with another database.)
                log.warning("run %r: removing %s, left by a save that failed", run_name, dest)
                shutil.rmtree(dest)
            self._failed_saves.discard(dest)
            try:
                sha = write_adapter_dir(dest, state, peft_config)  # no row inserted if it raises
            except BaseException:
                if dest.exists():  # (renamed into place, then failed: the next save removes it)
                    self._failed_saves.add(dest)
                raise
            row = Version(
                run_id=run_id,
                number=number,
                round_number=round_number,
                path=rel,
                sha256=sha,
                metrics_json=metrics_json,
                eval_loss=eval_loss,
                parent_number=parent,
            )
            try:
                with session_scope(self._engine) as s:
                    s.add(row)
                    if round is not None:
                        s.flush()  # the version's id, for the round row
                        rec = dataclasses.replace(round, version_number=number)
                        _add_round(s, run_id, rec, row.id, participations)
            except BaseException:
                # Keep disk and database in agreement. A commit can raise after it took effect
                # (a connection lost during COMMIT, an interrupt just after it): the directory
                # goes only when the row is known not to be there. (When the database cannot
                # say, the directory stays: the check on the store's next open removes it if no
                # row names it.)
                if self._has_version_row(run_id, number) is False:
                    shutil.rmtree(dest, ignore_errors=True)
                    log.error(
                        "run %r: insert of version %d failed; removed %s", run_name, number, dest
                    )
                else:
                    log.error(
                        "run %r: the insert of version %d raised, but its row may be stored: "
                        "kept %s",
                        run_name,
                        number,
                        dest,
                    )
                raise
        log.info("run %r: saved version %d (round %d) at %s", run_name, number, round_number, rel)
        return _version_info(row)

    def _has_version_row(self, run_id: int, number: int) -> bool | None:
        """Whether the run's version ``number`` has its row (None: the database cannot say)."""
        try:
            with session_scope(self._engine) as s:
                q = select(Version.id).where(Version.run_id == run_id, Version.number == number)
                return s.scalar(q) is not None
        except Exception:  # (the caller is already handling a failure: this must not mask it)
            log.exception("run id %d: cannot tell whether version %d is stored", run_id, number)
            return None

    def latest_version(self, run_id: int) -> VersionInfo | None:
        with session_scope(self._engine) as s:
            row = _latest_version_row(s, run_id)
            return _version_info(row) if row is not None else None

    def get_version(self, run_id: int, number: int) -> VersionInfo:
        with session_scope(self._engine) as s:
            row = _version_row(s, run_id, number)
            return _version_info(row)

    def list_versions(self, run_id: int) -> list[VersionInfo]:
        with session_scope(self._engine) as s:
            q = select(Version).where(Version.run_id == run_id).order_by(Version.number)
            return [_version_info(r) for r in s.scalars(q)]

    def version_dir(self, info: VersionInfo) -> Path:
        """The absolute PEFT directory of a version (loadable by ``PeftModel.from_pretrained``)."""
        return self.root / info.path

    def load_version(self, info: VersionInfo) -> AdapterState:
        """The adapter state of a version, after checking its sha256 against the database."""
        state, _config = read_adapter_dir(self.version_dir(info), verify_sha256=info.sha256)
        return state

    # ---- rounds, participations, events -------------------------------------------------------

    def record_round(self, run_id: int, round: RoundRecord) -> RoundInfo:
        return self.record_round_result(run_id, round, ())

    def record_participation(
        self,
        run_id: int,
        round_number: int,
        node_id: int,
        status: ParticipationStatus,
        reason: str | None = None,
        num_examples: int | None = None,
        train_loss: float | None = None,
        metrics: Mapping[str, float] | None = None,
    ) -> None:
        rec = ParticipationRecord(node_id, status, reason, num_examples, train_loss, metrics or {})
        with session_scope(self._engine) as s:
            _require_run(s, run_id)
            s.add(_participation_row(run_id, round_number, rec))

    def record_round_result(
        self, run_id: int, round: RoundRecord, participations: Sequence[ParticipationRecord]
    ) -> RoundInfo:
        """Write a round and its participations in one transaction: all of them or none."""
        _check_choice(round.status, RoundStatus, "round status")
        with session_scope(self._engine) as s:
            _require_run(s, run_id)
            version_id = None
            if round.version_number is not None:
                version_id = _version_row(s, run_id, round.version_number).id
            row = _add_round(s, run_id, round, version_id, participations)
            s.flush()
            return _round_info(row, round.version_number)

    def list_rounds(self, run_id: int) -> list[RoundInfo]:
        with session_scope(self._engine) as s:
            q = (
                select(Round, Version.number)
                .outerjoin(Version, Round.version_id == Version.id)
                .where(Round.run_id == run_id)
                .order_by(Round.number)
            )
            return [_round_info(r, vnum) for r, vnum in s.execute(q)]

    def last_completed_round(self, run_id: int) -> int:
        """The highest recorded round number (whatever its status), 0 if none: resume after it."""
        with session_scope(self._engine) as s:
            q = select(func.max(Round.number)).where(Round.run_id == run_id)
            return int(s.scalar(q) or 0)

    def participations(
        self, run_id: int, round_number: int | None = None
    ) -> list[ParticipationInfo]:
        with session_scope(self._engine) as s:
            q = select(Participation).where(Participation.run_id == run_id)
            if round_number is not None:
                q = q.where(Participation.round_number == round_number)
            q = q.order_by(Participation.round_number, Participation.id)
            return [_participation_info(p) for p in s.scalars(q)]

    def record_event(self, run_id: int, kind: str, payload: Mapping[str, object]) -> EventInfo:
        """Store a decision or observation (e.g. an allocation decision) with a JSON payload."""
        payload_json = _dumps(dict(payload), f"event {kind!r} payload")
        with session_scope(self._engine) as s:
            _require_run(s, run_id)
            row = Event(run_id=run_id, kind=kind, payload_json=payload_json)
            s.add(row)
            s.flush()
            return _event_info(row)

    def events(self, run_id: int, kind: str | None = None) -> list[EventInfo]:
        with session_scope(self._engine) as s:
            q = select(Event).where(Event.run_id == run_id)
            if kind is not None:
                q = q.where(Event.kind == kind)
            return [_event_info(e) for e in s.scalars(q.order_by(Event.at, Event.id))]

    # ---- recovery -----------------------------------------------------------------------------

    def check_consistency(self) -> ConsistencyReport:
        """Remove interrupted writes and the one uncommitted version dir a crash can leave (the
        number after a run's latest row); report rows missing their dir and leave, reported,
        any other version dir without a row (another database's run of the same name?)."""
        runs_root = self.root / "runs"
        temps: list[Path] = []
        if runs_root.is_dir():
            for versions_dir in sorted(runs_root.glob("*/versions")):
                temps += cleanup_partial_dirs(versions_dir)
        with session_scope(self._engine) as s:
            runs = s.execute(select(Run.id, Run.name, Run.created_at)).all()
            rows = s.execute(
                select(Version.run_id, Version.path, Version.number, Version.created_at)
            ).all()
        known = {name: run_id for run_id, name, _ in runs}
        # What a crash can leave: the run's next version, written after its latest row (or after
        # the run's own row when it has none).
        since = {run_id: _epoch(created) for run_id, _, created in runs}
        paths_by_run: dict[int, set[str]] = {}
        latest_by_run: dict[int, int] = {}
        for run_id, path, number, created in rows:
            paths_by_run.setdefault(run_id, set()).add(path)
            if number > latest_by_run.get(run_id, -1):
                latest_by_run[run_id], since[run_id] = number, _epoch(created)
        orphans: list[Path] = []
        unknown: list[Path] = []
        missing: list[Path] = []
        # Only runs of this database: another database may share the root with other run names.
        for name, run_id in sorted(known.items()):
            versions_dir = runs_root / name / "versions"
            recorded = paths_by_run.get(run_id, set())
            latest = latest_by_run.get(run_id)
            crash_left = {latest + 1} if latest is not None else {0, 1}  # the next save's number
            if versions_dir.is_dir():
                for d in sorted(versions_dir.iterdir()):
                    rel = f"runs/{name}/versions/{d.name}"
                    m = _VERSION_DIR.fullmatch(d.name)
                    if not d.is_dir() or m is None or rel in recorded:
                        continue
                    written = d.stat().st_mtime + MTIME_SLACK_S
                    if int(m.group(1)) in crash_left and written >= since[run_id]:
                        log.warning("removing %s: version directory without a database row", d)
                        shutil.rmtree(d)
                        orphans.append(d)
                    else:
                        log.error(
                            "%s has no row in %s and is not what a crash leaves: kept (is the "
                            "root shared with another database?)",
                            d,
                            self.url,
                        )
                        unknown.append(d)
            for rel in sorted(recorded):
                if not (self.root / rel).is_dir():
                    log.error("version directory %s is missing; loading it will fail", rel)
                    missing.append(self.root / rel)
        return ConsistencyReport(tuple(temps), tuple(orphans), tuple(missing), tuple(unknown))


# ---- helpers: rows in, dataclasses out ---------------------------------------------------------


def _require_run(s: Session, run_id: int) -> Run:
    run = s.get(Run, run_id)
    if run is None:
        raise StoreError(f"no run with id {run_id}")
    return run


def _latest_version_row(s: Session, run_id: int) -> Version | None:
    q = select(Version).where(Version.run_id == run_id).order_by(Version.number.desc()).limit(1)
    return s.scalar(q)


def _version_row(s: Session, run_id: int, number: int) -> Version:
    q = select(Version).where(Version.run_id == run_id, Version.number == number)
    row = s.scalar(q)
    if row is None:
        raise StoreError(f"run id {run_id} has no version {number}")
    return row


def _add_round(
    s: Session,
    run_id: int,
    round: RoundRecord,
    version_id: int | None,
    participations: Sequence[ParticipationRecord],
) -> Round:
    row = Round(
        run_id=run_id,
        number=round.number,
        started_at=round.started_at,
        finished_at=round.finished_at,
        status=round.status,
        num_ok=round.num_ok,
        num_rejected=round.num_rejected,
        num_failed=round.num_failed,
        train_loss=round.train_loss,
        eval_loss=round.eval_loss,
        eval_perplexity=round.eval_perplexity,
        version_id=version_id,
        seconds=round.seconds,
        metrics_json=_dumps(dict(round.metrics), f"round {round.number} metrics"),
    )
    s.add(row)
    for p in participations:
        s.add(_participation_row(run_id, round.number, p))
    return row


def _participation_row(run_id: int, round_number: int, p: ParticipationRecord) -> Participation:
    _check_choice(p.status, ParticipationStatus, "participation status")
    return Participation(
        run_id=run_id,
        round_number=round_number,
        node_id=str(p.node_id),
        status=p.status,
        reason=p.reason,
        num_examples=p.num_examples,
        train_loss=p.train_loss,
        metrics_json=_dumps(dict(p.metrics), f"node {p.node_id} metrics"),
    )


def _check_choice(value: str, choices: object, what: str) -> None:
    allowed = get_args(choices)
    if value not in allowed:
        raise StoreError(f"{what} must be one of {', '.join(allowed)}; got {value!r}")


def _dumps(obj: Mapping[str, object], what: str) -> str:
    try:
        return json.dumps(obj, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise StoreError(f"{what} is not JSON-serialisable: {e}") from e


def _utc(dt: datetime) -> datetime:
    # SQLite drops the tzinfo; everything the store writes is UTC.
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


def _from_row(cls: type[_InfoT], row: Base, **overrides: object) -> _InfoT:
    """Build an info dataclass from the row attributes of the same name, plus ``overrides``."""
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    values = {n: overrides[n] if n in overrides else getattr(row, n) for n in names}
    return cls(**values)


def _run_info(r: Run) -> RunInfo:
    return _from_row(RunInfo, r, created_at=_utc(r.created_at), config=json.loads(r.config_json))


def _version_info(v: Version) -> VersionInfo:
    return _from_row(
        VersionInfo, v, created_at=_utc(v.created_at), metrics=json.loads(v.metrics_json)
    )


def _round_info(r: Round, version_number: int | None) -> RoundInfo:
    return _from_row(
        RoundInfo,
        r,
        started_at=_utc(r.started_at),
        finished_at=_utc(r.finished_at),
        version_number=version_number,
        metrics=json.loads(r.metrics_json),
    )


def _participation_info(p: Participation) -> ParticipationInfo:
    return _from_row(
        ParticipationInfo, p, node_id=int(p.node_id), metrics=json.loads(p.metrics_json)
    )


def _event_info(e: Event) -> EventInfo:
    return _from_row(EventInfo, e, at=_utc(e.at), payload=json.loads(e.payload_json))


def _epoch(moment: datetime) -> float:
    """Seconds since the epoch of a stored time (SQLite hands UTC times back without a zone)."""
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
