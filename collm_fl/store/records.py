"""Plain records the store takes and returns (never ORM rows)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal

ConfigValue = str | int | float | bool
RoundStatus = Literal["aggregated", "kept-previous", "failed"]
ParticipationStatus = Literal["ok", "rejected", "failed"]
RunStatus = Literal["running", "finished", "failed"]
# Events that close an attempt at a run (launchers read them: `flwr run` exits 0 either way).
RUN_FINISHED, RUN_FAILED = "run-finished", "run-failed"


@dataclass(frozen=True)
class RunInfo:
    id: int
    name: str
    base_model: str
    status: str
    created_at: datetime
    config: dict[str, ConfigValue]  # as stored when the run was first opened


@dataclass(frozen=True)
class VersionInfo:
    id: int
    run_id: int
    number: int  # 0 = initial adapter, then 1, 2, 3...
    round_number: int  # the round that produced it
    path: str  # relative to the store root; see VersionStore.version_dir
    sha256: str  # of adapter_model.safetensors
    created_at: datetime
    metrics: dict[str, float]
    eval_loss: float | None
    parent_number: int | None


@dataclass(frozen=True)
class RoundRecord:
    """What the server reports at the end of a round (input to the store)."""

    number: int
    status: RoundStatus
    started_at: datetime
    finished_at: datetime
    seconds: float
    num_ok: int = 0
    num_rejected: int = 0
    num_failed: int = 0
    train_loss: float | None = None
    eval_loss: float | None = None
    eval_perplexity: float | None = None
    version_number: int | None = None  # the version this round saved, if any
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundInfo:
    run_id: int
    number: int
    status: str
    started_at: datetime
    finished_at: datetime
    seconds: float
    num_ok: int
    num_rejected: int
    num_failed: int
    train_loss: float | None
    eval_loss: float | None
    eval_perplexity: float | None
    version_number: int | None
    metrics: dict[str, float]


@dataclass(frozen=True)
class ParticipationRecord:
    """One node's outcome in a round (input to the store)."""

    node_id: int
    status: ParticipationStatus
    reason: str | None = None  # why it was rejected or failed
    num_examples: int | None = None
    train_loss: float | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ParticipationInfo:
    run_id: int
    round_number: int
    node_id: int
    status: str
    reason: str | None
    num_examples: int | None
    train_loss: float | None
    metrics: dict[str, float]


@dataclass(frozen=True)
class EventInfo:
    id: int
    run_id: int
    at: datetime
    kind: str
    payload: dict[str, object]


@dataclass(frozen=True)
class ConsistencyReport:
    """What opening the store found and fixed (or could not fix) on disk."""

    removed_temp_dirs: tuple[Path, ...] = ()  # interrupted writes
    removed_orphan_dirs: tuple[Path, ...] = ()  # renamed into place but never committed
    missing_version_dirs: tuple[Path, ...] = ()  # a row without its directory; loading it raises
    # Version directories without a row that no crash explains (another database's?): kept.
    unexplained_version_dirs: tuple[Path, ...] = ()
