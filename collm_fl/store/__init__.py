"""Version store: adapter versions as PEFT directories on disk, run history in SQL.

``VersionStore`` (SQLAlchemy) is imported on first use, so the adapter-directory helpers (all a
replica needs) load without SQLAlchemy installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from collm_fl.store.adapter_io import cleanup_partial_dirs, read_adapter_dir, write_adapter_dir
from collm_fl.store.records import (
    RUN_FAILED,
    RUN_FINISHED,
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

if TYPE_CHECKING:
    from collm_fl.store.repository import VersionStore

__all__ = [
    "RUN_FAILED",
    "RUN_FINISHED",
    "ConsistencyReport",
    "EventInfo",
    "ParticipationInfo",
    "ParticipationRecord",
    "ParticipationStatus",
    "RoundInfo",
    "RoundRecord",
    "RoundStatus",
    "RunInfo",
    "RunStatus",
    "VersionInfo",
    "VersionStore",
    "cleanup_partial_dirs",
    "read_adapter_dir",
    "write_adapter_dir",
]


def __getattr__(name: str) -> object:
    if name == "VersionStore":
        from collm_fl.store.repository import VersionStore

        return VersionStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
