"""CPU placement of a replica: which cores it may use, and the trainer's lower priority.

Two knobs, both Linux scheduler features:

- ``--cpus`` pins the whole replica process (and every thread it will start) to a set of cores
  with ``sched_setaffinity``, so several replicas on one machine behave like replicas on their
  own hardware instead of all sharing every core.
- The co-execution trainer thread lowers its own priority (``setpriority`` on its thread id,
  a nice value): when serving and training both want a core, the kernel hands it to serving
  within a scheduler tick, instead of serving waiting for the current training micro-step to end.
  Threads the trainer starts (torch's OpenMP team) inherit the value. Lowering a priority needs
  no privilege.
"""

from __future__ import annotations

import logging
import os
import threading

from collm_fl.errors import ConfigError

log = logging.getLogger(__name__)


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """Sorted core ids from ``"0"``, ``"0,2"``, ``"0-3"`` or ``"0-1,4"`` (ConfigError if bad)."""
    cpus: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ConfigError(f"--cpus: expected e.g. 0 or 0,2 or 0-3, got {text!r}") from None
        if first < 0 or last < first:
            raise ConfigError(f"--cpus: bad range {part!r} in {text!r}")
        cpus.update(range(first, last + 1))
    return tuple(sorted(cpus))


def available_cpus() -> tuple[int, ...]:
    """The cores this process may run on."""
    return tuple(sorted(os.sched_getaffinity(0)))


def pin_process(cpus: tuple[int, ...]) -> None:
    """Restrict this process (and the threads it starts later) to ``cpus``."""
    allowed = set(available_cpus())
    missing = [c for c in cpus if c not in allowed]
    if missing:
        raise ConfigError(
            f"--cpus: cores {missing} are not available here (have {sorted(allowed)})"
        )
    os.sched_setaffinity(0, cpus)
    log.info("pinned to cores %s", ",".join(map(str, cpus)))


def lower_thread_priority(nice: int) -> None:
    """Raise the calling thread's nice value to ``nice`` (0..19); never fails the caller."""
    if not 0 <= nice <= 19:
        raise ConfigError(f"trainer nice must be in [0, 19], got {nice}")
    if nice == 0:
        return
    tid = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        if nice > current:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError as e:  # e.g. a sandbox that forbids it: training still runs, unprioritized
        log.warning("could not lower the trainer's priority to nice %d: %s", nice, e)
