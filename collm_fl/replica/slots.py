"""Serving slots on one base: which adapter version new requests get, and shadow loading.

A replica keeps S serving slots (see ``lora_layers.MultiLoraLinear``). One is *current*: every new
request is admitted on it. A new version is loaded into a free slot as a *shadow*, validated there
off the request path, and then promoted with a pointer swap; a rejected shadow is discarded without
ever touching the current slot ("load and validate the new adapter before evicting the old one").

Consistency rule: a request decodes entirely with the slot and version it was admitted on
(:meth:`AdapterSlots.acquire` pins the slot until :meth:`AdapterSlots.release`), and a slot is
never rewritten while any request pins it or while it is current. So a promotion between two
decode steps changes what *new* requests get and never mixes two versions inside one request.

Before the first promotion no version is loaded: requests run on the base model (slot ``-1``,
version ``None``). Rollback is the caller's: ``load_shadow(previous_state, ...).promote()``.

Baselines that merge an adapter into the base weights (``Replica.push_version(mode="merge")``)
call :meth:`AdapterSlots.set_merged`: new requests then get slot ``-1`` (no unmerged adapter on
top) labelled with the merged version, until :meth:`AdapterSlots.clear_merged`. No slot may be
loaded while a version is merged (the base under it would be wrong).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType

import numpy as np
import torch
from torch import nn

from collm_fl.adapters import LoraSpec
from collm_fl.errors import AdapterValidationError, CollmError
from collm_fl.models import model_device
from collm_fl.replica.lora_layers import NO_SLOT, MultiLoraModules, lora_context, serve

log = logging.getLogger(__name__)

DEFAULT_LOAD_TIMEOUT_S = 30.0
HISTORY_LEN = 16  # promotions remembered for the control API


class NoFreeSlotError(CollmError):
    """Every serving slot is current or pinned by in-flight requests, past the load timeout."""


class ShadowStateError(CollmError):
    """A shadow slot was promoted or discarded after it had already been promoted or discarded."""


@dataclass(frozen=True)
class SlotInfo:
    """One slot as the control API reports it."""

    index: int
    version: int | None
    refcount: int  # in-flight requests pinned to it
    role: str  # "current" | "shadow" | "idle" (holds an older version or nothing)


def validate_adapter_state(
    state: Mapping[str, np.ndarray],
    spec: LoraSpec,
    replica_spec: LoraSpec,
    expected_shapes: Mapping[str, tuple[int, int]],
) -> list[str]:
    """Every problem that keeps ``state`` from being served on this replica (empty: fine)."""
    problems: list[str] = []
    if spec.rank != replica_spec.rank:
        problems.append(f"rank {spec.rank} != replica rank {replica_spec.rank}")
    if spec.alpha != replica_spec.alpha:
        problems.append(f"alpha {spec.alpha} != replica alpha {replica_spec.alpha}")
    if set(spec.target_modules) != set(replica_spec.target_modules):
        problems.append(
            f"target_modules {sorted(spec.target_modules)} != replica "
            f"{sorted(replica_spec.target_modules)}"
        )
    problems += [f"missing key {k}" for k in sorted(set(expected_shapes) - set(state))]
    problems += [f"unexpected key {k}" for k in sorted(set(state) - set(expected_shapes))]
    for key in sorted(set(state) & set(expected_shapes)):
        value = state[key]
        if tuple(value.shape) != tuple(expected_shapes[key]):
            problems.append(f"{key}: shape {tuple(value.shape)}, expected {expected_shapes[key]}")
        elif not np.issubdtype(value.dtype, np.floating):
            problems.append(f"{key}: dtype {value.dtype} is not floating point")
        else:
            # As it will be served and stored: float32 (a float64 value past 3.4e38 is inf there).
            with np.errstate(over="ignore"):
                value32 = np.asarray(value, dtype=np.float32)
            if not np.isfinite(value32).all():
                bad = int((~np.isfinite(value32)).sum())
                problems.append(f"{key}: {bad} non-finite values (in float32)")
    return problems


def canary_check(
    model: nn.Module, modules: MultiLoraModules, slot: int, input_ids: torch.Tensor
) -> None:
    """One forward through ``slot`` on ``input_ids`` (b, L); raises if any logit is not finite."""
    if not 0 <= slot < modules.num_slots:
        raise IndexError(f"slot must be in [0, {modules.num_slots}), got {slot}")
    device = model_device(model)
    with torch.inference_mode(), lora_context(serve([slot] * input_ids.shape[0], device)):
        logits = model(input_ids=input_ids.to(device)).logits  # (b, L, V)
    if not bool(torch.isfinite(logits).all()):
        bad = int((~torch.isfinite(logits)).sum())
        raise AdapterValidationError([f"canary forward produced {bad} non-finite logits"])


class AdapterSlots:
    """Which slot is current, which are pinned, and the shadow loads; thread-safe (one lock)."""

    def __init__(self, modules: MultiLoraModules):
        self.modules = modules
        self.num_slots = modules.num_slots
        self._cond = threading.Condition()  # guards everything below; notified when a slot frees
        self._current = NO_SLOT
        self._versions: list[int | None] = [None] * self.num_slots
        self._refcounts = [0] * self.num_slots
        self._reserved = [False] * self.num_slots  # held by a ShadowSlot being loaded/validated
        self._history: list[tuple[int, float]] = []
        self._merged: int | None = None  # the version merged into the base weights, if any

    @property
    def current_slot(self) -> int:
        with self._cond:
            return self._current

    @property
    def current_version(self) -> int | None:
        with self._cond:
            return self._merged if self._current == NO_SLOT else self._versions[self._current]

    @property
    def merged_version(self) -> int | None:
        """The version merged into the base weights (None: the base is the plain base)."""
        with self._cond:
            return self._merged

    @property
    def history(self) -> list[tuple[int, float]]:
        """(version, promoted_at as time.time()) of the recent promotions, oldest first."""
        with self._cond:
            return list(self._history)

    def acquire(self) -> tuple[int, int | None]:
        """Pin the current slot for a new request: (slot, version); (-1, None) if none loaded."""
        with self._cond:
            slot = self._current
            if slot == NO_SLOT:
                return NO_SLOT, self._merged
            self._refcounts[slot] += 1
            return slot, self._versions[slot]

    def release(self, slot: int) -> None:
        """Unpin ``slot`` once its request has run its last forward."""
        if slot == NO_SLOT:
            return
        with self._cond:
            if self._refcounts[slot] <= 0:
                raise RuntimeError(f"release of slot {slot} that no request holds")
            self._refcounts[slot] -= 1
            if self._refcounts[slot] == 0:
                self._cond.notify_all()

    def pinned(self) -> int:
        """In-flight requests pinned to a serving slot (requests on slot -1 are not counted)."""
        with self._cond:
            return sum(self._refcounts)

    def set_merged(self, version: int) -> int | None:
        """New requests get the base (slot -1) labelled ``version``, now merged into it.

        The caller has merged the weights (``MultiLoraModules.merge_into_base``) with serving
        paused; returns the version it replaced for new requests.
        """
        with self._cond:
            previous = self._merged if self._current == NO_SLOT else self._versions[self._current]
            self._current = NO_SLOT
            self._merged = version
            self._history = [*self._history, (version, time.time())][-HISTORY_LEN:]
            self._cond.notify_all()  # the previous current slot is free once unpinned
        log.info("serving version %d merged into the base, replacing version %s", version, previous)
        return previous

    def clear_merged(self) -> None:
        """The base weights are plain again (the caller unmerged them)."""
        with self._cond:
            self._merged = None

    def snapshot(self) -> list[SlotInfo]:
        with self._cond:
            return [self._info(i) for i in range(self.num_slots)]

    def load_shadow(
        self,
        state: Mapping[str, np.ndarray],
        version: int,
        spec: LoraSpec,
        validate_fn: Callable[[int], None] | None = None,
        timeout: float = DEFAULT_LOAD_TIMEOUT_S,
        reserved: int | None = None,
    ) -> ShadowSlot:
        """Validate ``state``, write it into a free slot, run ``validate_fn(slot)``; not yet served.

        Raises ``AdapterValidationError`` (every problem at once, before anything is written, or
        the ``validate_fn`` failure) or ``NoFreeSlotError`` when no slot frees up within
        ``timeout`` seconds. Either way the current slot is untouched. ``reserved``: a slot
        :meth:`reserve_free_slot` returned, used instead of waiting for one (and given back on
        any failure).
        """
        try:
            problems = validate_adapter_state(
                state, spec, self.modules.spec, self.modules.expected_shapes()
            )
            if problems:
                raise AdapterValidationError(problems)
            if self.merged_version is not None:
                raise ShadowStateError(
                    f"version {self.merged_version} is merged into the base: unmerge it before "
                    "loading a slot"
                )
        except BaseException:
            if reserved is not None:
                self.unreserve(reserved)
            raise
        slot = self.reserve_free_slot(timeout) if reserved is None else reserved
        shadow = ShadowSlot(self, slot, version)
        try:
            started = time.perf_counter()
            self.modules.write_slot(slot, state)
            written = time.perf_counter() - started
            if validate_fn is not None:
                validate_fn(slot)
        except AdapterValidationError:
            shadow.discard()
            raise
        except Exception as e:  # a canary may fail in any way; all of them reject the version
            shadow.discard()
            raise AdapterValidationError([f"validation of version {version} failed: {e}"]) from e
        log.info("version %d in shadow slot %d (write %.2f ms)", version, slot, 1e3 * written)
        return shadow

    def reserve_free_slot(self, timeout: float = DEFAULT_LOAD_TIMEOUT_S) -> int:
        """A slot no request pins and nothing serves, held for a load (NoFreeSlotError after
        ``timeout`` seconds). Only serving frees a pinned slot: reserve before pausing it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                free = [
                    i
                    for i in range(self.num_slots)
                    if i != self._current and self._refcounts[i] == 0 and not self._reserved[i]
                ]
                if free:
                    # Prefer an empty slot, so older versions stay readable as long as possible.
                    slot = min(free, key=lambda i: self._versions[i] is not None)
                    self._reserved[slot] = True
                    self._versions[slot] = None  # its old contents are about to be overwritten
                    return slot
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NoFreeSlotError(
                        f"no free serving slot within {timeout:.1f}s: "
                        + ", ".join(repr(s) for s in (self._info(i) for i in range(self.num_slots)))
                    )
                self._cond.wait(left)

    def _promote(self, slot: int, version: int) -> int | None:
        with self._cond:
            previous = None if self._current == NO_SLOT else self._versions[self._current]
            self._reserved[slot] = False
            self._versions[slot] = version
            self._current = slot  # the swap: new requests get this slot from now on
            self._history = [*self._history, (version, time.time())][-HISTORY_LEN:]
            self._cond.notify_all()  # the previous current slot may be free already
        log.info("promoted version %d (slot %d), replacing version %s", version, slot, previous)
        return previous

    def unreserve(self, slot: int) -> None:
        """Give back a slot :meth:`reserve_free_slot` returned and no load took."""
        self._discard(slot)

    def _discard(self, slot: int) -> None:
        with self._cond:
            self._reserved[slot] = False
            self._versions[slot] = None
            self._cond.notify_all()

    def _info(self, i: int) -> SlotInfo:
        role = "current" if i == self._current else "shadow" if self._reserved[i] else "idle"
        return SlotInfo(i, self._versions[i], self._refcounts[i], role)


class ShadowSlot:
    """A loaded and validated version waiting in its own slot; promote it or discard it.

    Used as a context manager, a shadow that was not promoted is discarded on exit.
    """

    def __init__(self, slots: AdapterSlots, slot: int, version: int):
        self._slots = slots
        self.slot = slot
        self.version = version
        self._state = "loaded"  # -> "promoted" | "discarded"
        self._lock = threading.Lock()

    @property
    def state(self) -> str:
        return self._state

    def promote(self) -> int | None:
        """Make this version current for new requests; returns the version it replaced."""
        with self._lock:
            if self._state != "loaded":
                raise ShadowStateError(f"version {self.version} is already {self._state}")
            self._state = "promoted"
        return self._slots._promote(self.slot, self.version)

    def discard(self) -> None:
        """Free the slot without serving it; a no-op once discarded."""
        with self._lock:
            if self._state == "discarded":
                return
            if self._state == "promoted":
                raise ShadowStateError(f"version {self.version} is already promoted")
            self._state = "discarded"
        self._slots._discard(self.slot)

    def __enter__(self) -> ShadowSlot:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._state == "loaded":
            self.discard()
