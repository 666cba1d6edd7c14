"""Version store: adapter versions as PEFT directories on disk, run history in SQL."""

from collm_fl.store.adapter_io import cleanup_partial_dirs, read_adapter_dir, write_adapter_dir
from collm_fl.store.records import (
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
from collm_fl.store.repository import VersionStore

__all__ = [
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
