"""The edge replica: one base model, serving + shadow + training adapters, and its local versions.

``Replica`` owns the long-lived pieces (model, multi-LoRA modules, slots, engine, trainer,
metrics, local version directory) and offers the operations the HTTP and control APIs expose:
serve, push a version (persist → shadow → validate → promote), roll back, train a round's budget,
report load. A restarted replica serves the latest version it had stored.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from collm_fl.adapters import AdapterState, LoraSpec
from collm_fl.data import DataSpec, load_client_data
from collm_fl.data.tokenize import iterate_batches, tokenize_samples
from collm_fl.errors import (
    AdapterValidationError,
    ConfigError,
    StoreError,
    VersionConflictError,
    VersionNotStoredError,
)
from collm_fl.models import check_seq_len, load_base_model, model_device
from collm_fl.policies.scheduling import DEFAULT_DEFER_LIMIT_S
from collm_fl.replica.coexec import CoTrainer, TrainJob, TrainOutcome
from collm_fl.replica.engine import InferenceEngine
from collm_fl.replica.lora_layers import inject_multi_lora
from collm_fl.replica.merged import MergedVersion
from collm_fl.replica.metrics import SLO, LoadReport, LoadWindow, ReplicaMetrics
from collm_fl.replica.slots import AdapterSlots, canary_check, validate_adapter_state
from collm_fl.reports import write_text_atomic
from collm_fl.store.adapter_io import (
    cleanup_partial_dirs,
    read_adapter_dir,
    remove_adapter_dir,
    write_adapter_dir,
)

log = logging.getLogger(__name__)

_VERSION_DIR = re.compile(r"v(\d{4,})")
ASIDE_PREFIX = ".aside-"  # a stored version set aside while the same version is pushed again
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
ROLLED_BACK = "ROLLED_BACK"  # in a run's folder: the version a rollback serves, until a push
SERVING_RUN = "SERVING_RUN"  # in the store: the run served last (a restart resumes it)


def _rolled_back_to(run_dir: Path) -> int | None:
    """The version a rollback in ``run_dir`` served last, if it is still the one to serve."""
    try:
        return int((run_dir / ROLLED_BACK).read_text().strip())
    except (OSError, ValueError):
        return None


def _served_run(store_dir: Path) -> str | None:
    """The run recorded as served last in ``store_dir``, if any."""
    try:
        return (store_dir / SERVING_RUN).read_text().strip() or None
    except OSError:
        return None


DEFAULT_RUN = "default"
MAX_VERSION = 10**9  # versions count rounds; a larger number is a client bug, not a version
# How a pushed version reaches serving. "shadow" (CoLLM-FL): loaded and validated in a free slot
# while serving goes on, then promoted between two decode steps. The other two exist for the
# baselines of `collm bench goodput` and stop the world: "reload" pauses serving, reads the
# version back from its stored PEFT directory, loads, validates and promotes it, then resumes;
# "merge" pauses serving, unmerges the previous merged version and merges the new one into the
# base weights (no LoRA cost per token; every new request gets it on slot -1; requests in flight
# go on with the new weights, as in any merged-weights server that updates in place).
SWAP_MODES = ("shadow", "reload", "merge")


@dataclass(frozen=True)
class ReplicaConfig:
    """Everything a replica process needs; built from CLI flags by ``collm replica``."""

    model: str = "tiny"
    quantization: str = "none"  # "none" | "4bit" | "8bit" (bitsandbytes, CUDA only)
    device: str = "cpu"  # "cpu" | "cuda" | "cuda:N" | "auto" (CUDA when available)
    lora: LoraSpec = field(default_factory=LoraSpec)
    store_dir: str = "replica-store"  # this replica's received versions (PEFT dirs)
    # Versions of the served run kept on disk (newest first; the served one always); 0 = all.
    # The central store keeps every version; a replica keeps enough to restart and roll back.
    keep_versions: int = 16
    served_model_name: str = ""  # model id clients use; "" = the base model's name
    data: DataSpec | None = None  # the site's private data; None = this replica cannot train
    partition_id: int = 0
    num_partitions: int = 1
    seq_len: int = 128
    train_batch_size: int = 4
    slo: SLO = field(default_factory=SLO)
    max_batch_size: int = 8
    max_queue: int = 64
    # Admission order (collm_fl.policies.scheduling): "slo" admits the requests that can still
    # meet the TTFT SLO first, none deferred longer than ``defer_limit_s``; "fcfs" as vLLM.
    schedule: str = "slo"
    defer_limit_s: float = DEFAULT_DEFER_LIMIT_S
    # Share of serving's time the engine may rest for a trainer behind its round's plan (up to
    # the allocation's training share); 0 = training runs on serving's idle moments alone.
    max_lend_share: float = 0.0
    # ... from the round's start until its plan is done, not as late as the plan allows.
    lend_early: bool = False
    num_slots: int = 4
    training_share: float = 0.5
    serve_threads: int = 1
    # Nice value (0..19) of the thread running training steps. Steps give way to serving at every
    # layer themselves (collm_fl.replica.coexec); a higher value also puts them behind every
    # other process on the replica's cores, which can starve the round's plan under load.
    trainer_nice: int = 0
    # A canary forward through the shadow slot before promotion (catches adapters that are finite
    # but blow up activations). Off by default: on 2 cores it costs about one small prefill and
    # competes with decoding; keys, shapes, config and finiteness are always checked.
    canary: bool = False
    seed: int = 0

    @property
    def model_id(self) -> str:
        return self.served_model_name or self.model


@dataclass(frozen=True)
class SwapResult:
    version: int
    previous: int | None
    load_ms: float  # persist + validate + write into the shadow slot + canary
    promoted_at: float  # time.time()


class Replica:
    """One co-executing replica (see module docstring)."""

    def __init__(self, cfg: ReplicaConfig) -> None:
        self.cfg = cfg
        self.started_at = time.time()
        self.loaded = load_base_model(cfg.model, quantization=cfg.quantization, device=cfg.device)
        self.model = self.loaded.model
        self.device = model_device(self.model)
        self.tokenizer = self.loaded.tokenizer
        self.modules = inject_multi_lora(self.model, cfg.lora, num_slots=cfg.num_slots)
        self.slots = AdapterSlots(self.modules)
        self.engine = InferenceEngine(
            self.model,
            self.tokenizer,
            self.modules,
            self.slots,
            max_batch_size=cfg.max_batch_size,
            max_queue=cfg.max_queue,
            num_threads=cfg.serve_threads,
            schedule=cfg.schedule,
            ttft_slo_s=cfg.slo.ttft_s,
            defer_limit_s=cfg.defer_limit_s,
            max_lend_share=cfg.max_lend_share,
        )
        self.metrics = ReplicaMetrics()
        self.load_window = LoadWindow(cfg.slo)
        self.store_dir = Path(cfg.store_dir).resolve()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.run = DEFAULT_RUN  # the federation run whose versions are served
        self._push_lock = threading.Lock()  # one version load at a time
        self._pause_lock = threading.Lock()
        self._pauses = 0  # nested stop-the-world sections in progress (baseline modes only)
        eos = self.tokenizer.eos_token_id or 0
        self._canary = torch.tensor([[eos] * 4], device=self.device)  # (1, 4)
        self.merged = MergedVersion(self.model, self.modules, self.slots, self._canary)
        self.trainer: CoTrainer | None = None
        self.num_train_rows = 0
        if cfg.data is not None:
            check_seq_len(self.model, cfg.seq_len)
            data = load_client_data(cfg.data, cfg.partition_id, cfg.num_partitions, self.tokenizer)
            blocks = tokenize_samples(data.train, self.tokenizer, cfg.seq_len)
            batches = iterate_batches(blocks, cfg.train_batch_size, seed=cfg.seed)
            self.num_train_rows = int(blocks.input_ids.shape[0])
            self.trainer = CoTrainer(
                self.modules,
                self.model,
                self.engine,
                batches,
                cfg.slo,
                cfg.training_share,
                nice=cfg.trainer_nice,
                lend_early=cfg.lend_early,
            )
            log.info("private data: %s (%d training rows)", data.name, blocks.input_ids.shape[0])

    # ---- lifecycle ----

    def start(self) -> None:
        self.recover()
        self.engine.start()
        if self.trainer is not None:
            self.trainer.start()
        self.metrics.training_share.set(self.training_share)

    def stop(self) -> None:
        if self.trainer is not None:
            self.trainer.stop()
        self.engine.stop()

    def recover(self) -> int | None:
        """Serve the newest valid stored version (after a restart); returns its number.

        Versions are kept per federation run (``<store-dir>/<run>/vNNNN``); the run served last
        (``SERVING_RUN`` in the store) is the one resumed, else the one written to most recently.
        A rollback's version (``ROLLED_BACK`` in the run's folder, until a newer version is
        pushed) comes first.
        """
        runs = [p for p in self.store_dir.iterdir() if p.is_dir() and _RUN_NAME.fullmatch(p.name)]
        for run_dir in runs:
            for tmp in cleanup_partial_dirs(run_dir):
                log.warning("removed an interrupted version write: %s", tmp)
            _settle_aside(run_dir)
        # (A push of another run that failed, or the clean-up above, touches that run's folder:
        # its time alone would resume a run no longer served.)
        served = _served_run(self.store_dir)
        runs.sort(key=lambda p: (p.name == served, p.stat().st_mtime), reverse=True)
        for run_dir in runs:
            stored = sorted(self.stored_versions(run_dir.name), reverse=True)
            rolled_back = _rolled_back_to(run_dir)
            if rolled_back in stored:  # served last: the versions above it were rolled back from
                stored = [rolled_back, *(v for v in stored if v != rolled_back)]
            for number in stored:
                try:
                    state, config = read_adapter_dir(self.version_dir(number, run_dir.name))
                    self._load_and_promote(state, config, number, run_dir.name)
                    log.info("recovered: serving run %r version %d", run_dir.name, number)
                    return number
                except (StoreError, AdapterValidationError, KeyError, ValueError, TypeError) as e:
                    # (The last three: an adapter_config.json that is JSON but not a LoRA config.)
                    log.error("stored version %d is unusable (%s); trying an older one", number, e)
        log.info("no stored version: serving the base model until a version arrives")
        return None

    # ---- versions ----

    def version_dir(self, number: int, run: str | None = None) -> Path:
        return self.store_dir / (run or self.run) / f"v{number:04d}"

    def stored_versions(self, run: str | None = None) -> list[int]:
        run_dir = self.store_dir / (run or self.run)
        if not run_dir.is_dir():
            return []
        return sorted(
            int(m.group(1))
            for p in run_dir.iterdir()
            if p.is_dir() and (m := _VERSION_DIR.fullmatch(p.name))
        )

    @property
    def served_version(self) -> int | None:
        return self.slots.current_version

    def push_version(
        self,
        state: Mapping[str, np.ndarray],
        peft_config: Mapping[str, object],
        version: int,
        run: str = DEFAULT_RUN,
        mode: str = "shadow",
    ) -> SwapResult:
        """Persist, shadow-load, validate and promote ``version`` of ``run``; serving never pauses.

        Re-pushing the served version is a no-op; an older version of the served run is refused
        (use :meth:`rollback`); a version of another run starts that run's lineage here.
        ``mode`` "reload" or "merge" swaps with serving paused instead (baselines; see
        ``SWAP_MODES``); requests that arrive meanwhile wait and then complete.
        """
        if mode not in SWAP_MODES:
            raise ConfigError(f"mode must be one of {SWAP_MODES}, got {mode!r}")
        if not 0 <= version <= MAX_VERSION:
            raise ConfigError(f"version must be in [0, {MAX_VERSION}], got {version}")
        if not _RUN_NAME.fullmatch(run):
            raise ConfigError(f"run name {run!r} must be letters, digits, '.', '_' or '-'")
        with self._push_lock:
            current = self.served_version if run == self.run else None
            if current is not None and version == current:
                return SwapResult(version, current, 0.0, time.time())
            if current is not None and version < current:
                raise VersionConflictError(
                    f"version {version} is older than the served version {current} of run "
                    f"{run!r}; use rollback to serve an older version"
                )
            started = time.perf_counter()
            problems = self._config_problems(peft_config)
            if not problems:  # nothing reaches the disk before it is known to fit this model
                spec = LoraSpec.from_peft_config_dict(peft_config)
                expected = self.modules.expected_shapes()
                problems = validate_adapter_state(state, spec, self.modules.spec, expected)
            if problems:
                self.metrics.swaps.labels("rejected").inc()
                raise AdapterValidationError(problems)
            vdir = self.version_dir(version, run)
            vdir.parent.mkdir(parents=True, exist_ok=True)
            aside = None
            if vdir.exists():  # stored before (a retry, a version rolled back from): set aside
                aside = vdir.with_name(f"{ASIDE_PREFIX}{vdir.name}-{uuid.uuid4().hex[:8]}")
                vdir.rename(aside)  # (a crash from here on: put back at start if still missing)
            try:
                write_adapter_dir(vdir, dict(state), peft_config)
                previous = self._swap(state, peft_config, version, run, mode, vdir)
            except BaseException:
                # Not served, so not stored: a restart must not serve what was refused here; a
                # copy stored before goes back (a rollback to it still finds it). The write's or
                # the swap's error is the one raised.
                with contextlib.suppress(StoreError, OSError):
                    if vdir.exists():
                        remove_adapter_dir(vdir)
                with contextlib.suppress(OSError):
                    if aside is not None:
                        aside.rename(vdir)
                raise
            # A newer version serves now: a restart serves the newest again, not a rollback's.
            with contextlib.suppress(FileNotFoundError):
                (vdir.parent / ROLLED_BACK).unlink()
            self._remember_run(run)
            if aside is not None:
                try:
                    remove_adapter_dir(aside)
                except StoreError as e:  # served and stored all the same; a restart removes it
                    log.warning("could not remove the old copy of version %d: %s", version, e)
            self._prune_versions(run)
            return SwapResult(version, previous, 1e3 * (time.perf_counter() - started), time.time())

    def _swap(
        self,
        state: Mapping[str, np.ndarray],
        peft_config: Mapping[str, object],
        version: int,
        run: str,
        mode: str,
        vdir: Path,
    ) -> int | None:
        """Serve the stored ``version`` in ``mode`` (``SWAP_MODES``); the one it replaced.

        Leaving a merged version for a slot and failing to load the new one merges the old one
        back: serving goes on with what it served, never with the plain base.
        """
        if mode == "merge":
            return self._merge(state, version, run)
        merged = self.merged.current
        # A reload takes its slot before it pauses: only serving unpins slots.
        reserved = self.slots.reserve_free_slot() if mode == "reload" else None
        # Paused throughout for a reload (nothing is served between the old and the new), only
        # around the unmerge for a shadow load (which loads beside serving).
        with self.serving_paused() if mode == "reload" else contextlib.nullcontext():
            try:
                if mode == "reload":
                    try:
                        self.merged.clear()
                        stored, stored_config = read_adapter_dir(vdir)  # as a restart would
                    except BaseException:
                        if reserved is not None:
                            self.slots.unreserve(reserved)
                        raise
                    return self._load_and_promote(
                        stored, stored_config, version, run, reserved=reserved
                    )
                if merged is not None:
                    with self.serving_paused():
                        self.merged.clear()
                return self._load_and_promote(state, peft_config, version, run)
            except BaseException:
                if merged is not None and self.merged.current is None:
                    with self.serving_paused():
                        self.merged.replace(merged[1], merged[0])
                raise

    def _remember_run(self, run: str) -> None:
        """Record ``run`` as the one served (``SERVING_RUN``), where another one was."""
        if _served_run(self.store_dir) == run:
            return
        try:
            write_text_atomic(self.store_dir / SERVING_RUN, f"{run}\n")
        except OSError as e:  # served all the same; a restart falls back on the folders' times
            log.warning("could not record the served run %r: %s", run, e)

    def _prune_versions(self, run: str) -> None:
        """Delete ``run``'s stored versions beyond the newest ``keep_versions`` (never the served
        one). Without this a long-lived replica's disk grows by one adapter per round, forever."""
        keep = self.cfg.keep_versions
        if keep <= 0:
            return
        stored = self.stored_versions(run)
        for number in stored[: max(0, len(stored) - keep)]:
            if number == self.served_version:
                continue
            try:
                remove_adapter_dir(self.version_dir(number, run))
            except StoreError as e:  # serving is unaffected; the next push tries again
                log.warning("could not prune stored version %d: %s", number, e)

    @contextlib.contextmanager
    def serving_paused(self) -> Iterator[None]:
        """Stop the world for the block: no decode step runs; queued requests wait (baselines).

        Nests: serving resumes when the outermost block exits.
        """
        with self._pause_lock:
            self._pauses += 1
            if self._pauses == 1:
                self.engine.pause()
        try:
            yield
        finally:
            with self._pause_lock:
                self._pauses -= 1
                if self._pauses == 0:
                    self.engine.resume()

    def _merge(self, state: Mapping[str, np.ndarray], version: int, run: str) -> int | None:
        """Serve ``version`` merged into the base weights (stop-the-world; see ``SWAP_MODES``)."""
        t0 = time.perf_counter()
        with self.serving_paused():
            try:
                previous = self.merged.replace(state, version)
            except AdapterValidationError:
                self.metrics.swaps.labels("rejected").inc()
                raise
        self.run = run
        self.metrics.swap_seconds.observe(time.perf_counter() - t0)
        self.metrics.swaps.labels("promoted").inc()
        self.metrics.served_version.set(version)
        return previous

    def rollback(self, version: int) -> SwapResult:
        """Serve a previously stored version of the served run again (through the shadow slot)."""
        with self._push_lock:
            if version not in self.stored_versions():
                raise VersionNotStoredError(
                    f"version {version} of run {self.run!r} is not stored here"
                )
            started = time.perf_counter()
            state, config = read_adapter_dir(self.version_dir(version))
            # Remembered before it is served: a restart serves this version again, not the
            # newest stored one (which was rolled back from; a later push clears it). Written
            # after, a crash between the two served the version rolled back from again.
            marker = self.version_dir(version).parent / ROLLED_BACK
            before = marker.read_text() if marker.exists() else None
            write_text_atomic(marker, f"{version}\n")
            merged = self.merged.current
            try:
                if merged is not None:
                    with self.serving_paused():
                        self.merged.clear()
                previous = self._load_and_promote(state, config, version, self.run)
            except BaseException:
                # Not served: serving goes on with what it served (merged back, as ``_swap``
                # does, never the plain base), and the marker is as it was.
                if merged is not None and self.merged.current is None:
                    with self.serving_paused():
                        self.merged.replace(merged[1], merged[0])
                with contextlib.suppress(OSError):
                    if before is None:
                        marker.unlink(missing_ok=True)
                    else:
                        write_text_atomic(marker, before)
                raise
            return SwapResult(version, previous, 1e3 * (time.perf_counter() - started), time.time())

    def _load_and_promote(
        self,
        state: Mapping[str, np.ndarray],
        peft_config: Mapping[str, object],
        version: int,
        run: str,
        reserved: int | None = None,
    ) -> int | None:
        try:
            spec = LoraSpec.from_peft_config_dict(peft_config)
        except BaseException:
            if reserved is not None:  # load_shadow owns the reservation only once called
                self.slots.unreserve(reserved)
            raise
        t0 = time.perf_counter()
        # The swap runs beside the engine thread: one compute thread, so serving keeps its core.
        torch.set_num_threads(1)

        def canary(slot: int) -> None:
            canary_check(self.model, self.modules, slot, self._canary)

        try:
            shadow = self.slots.load_shadow(
                state,
                version,
                spec,
                validate_fn=canary if self.cfg.canary else None,
                reserved=reserved,
            )
        except AdapterValidationError:
            self.metrics.swaps.labels("rejected").inc()
            raise
        previous = shadow.promote()
        self.run = run
        self.metrics.swap_seconds.observe(time.perf_counter() - t0)
        self.metrics.swaps.labels("promoted").inc()
        self.metrics.served_version.set(version)
        return previous

    def _config_problems(self, peft_config: Mapping[str, object]) -> list[str]:
        try:
            spec = LoraSpec.from_peft_config_dict(peft_config)
        except (KeyError, TypeError, ValueError, AdapterValidationError, ConfigError) as e:
            return [f"adapter_config is not a valid LoRA config: {e}"]
        mine = self.cfg.lora
        problems = []
        if spec.rank != mine.rank:
            problems.append(f"rank {spec.rank} != replica rank {mine.rank}")
        if spec.alpha != mine.alpha:
            problems.append(f"lora_alpha {spec.alpha} != replica lora_alpha {mine.alpha}")
        if set(spec.target_modules) != set(mine.target_modules):
            problems.append(
                f"target_modules {spec.target_modules} != replica {mine.target_modules}"
            )
        return problems

    # ---- training and load ----

    @property
    def training_share(self) -> float:
        return self.trainer.share if self.trainer is not None else 0.0

    def set_training_share(self, share: float) -> None:
        if self.trainer is None:
            raise ConfigError("this replica has no training data (start it with --data)")
        self.trainer.set_share(share)
        self.metrics.training_share.set(share)

    def train(
        self,
        steps: int,
        learning_rate: float,
        deadline_s: float,
        round_number: int,
        start_state: Mapping[str, np.ndarray] | None = None,
        exclusive: bool = False,
        backfill_steps: int = 0,
        base_version: int | None = None,
        start_after_s: float = 0.0,
        base_run: str | None = None,
    ) -> TrainOutcome:
        """Train a round's budget from ``start_state`` (default: the served version).

        ``base_version``: the version the caller means by "the served one"; if another is served
        when the start state is read (a push landed meanwhile), VersionConflictError; so too if
        ``base_run`` is given and another run's versions are served.

        ``backfill_steps`` more steps run after ``steps``, each only while no request is queued
        or running (co-execution only); ``start_after_s``: the job's first step waits this long
        (co-execution only; the allocation's turns). ``exclusive`` (baselines only): serving is
        paused for the whole job and training takes every core, with no SLO guard; a merged
        version is unmerged first (training needs the plain base) and merged back after.
        """
        if not exclusive:
            return self.submit_training(
                steps,
                learning_rate,
                deadline_s,
                round_number,
                start_state,
                backfill_steps,
                base_version,
                start_after_s,
                base_run,
            ).result()
        if start_after_s:
            raise ConfigError("start_after_s is for co-executing jobs (exclusive pauses serving)")
        if self.trainer is None:
            raise ConfigError("this replica has no training data (start it with --data)")
        # No version change mid-job; training needs the plain base (merged back after).
        with self._push_lock, self.serving_paused(), self.merged.lifted():
            job = TrainJob(
                self._served_state(base_version, locked=True, run=base_run)
                if start_state is None
                else start_state,
                steps,
                learning_rate,
                deadline_s,
                round_number,
                exclusive=True,
            )
            outcome = self.trainer.submit(job).result()
        self._count_training(outcome)
        return outcome

    def submit_training(
        self,
        steps: int,
        learning_rate: float,
        deadline_s: float,
        round_number: int,
        start_state: Mapping[str, np.ndarray] | None = None,
        backfill_steps: int = 0,
        base_version: int | None = None,
        start_after_s: float = 0.0,
        base_run: str | None = None,
    ) -> Future[TrainOutcome]:
        """Queue a co-executing job (as :meth:`train`, not exclusive) without waiting for it: the
        future resolves once it has ended and been counted in the metrics, so that a caller on
        an event loop can await it without holding a thread for the whole job.

        The job is of the served run (``base_run`` if given): it supersedes that run's jobs of
        earlier rounds (``CoTrainer.submit``), one not started failing with ``JobSuperseded``."""
        if self.trainer is None:
            raise ConfigError("this replica has no training data (start it with --data)")
        if self.merged.current is not None:
            raise ConfigError("a merged version is served: train with exclusive=True")
        job = TrainJob(
            self._served_state(base_version, run=base_run) if start_state is None else start_state,
            steps,
            learning_rate,
            deadline_s,
            round_number,
            backfill_steps=backfill_steps,
            start_after_s=start_after_s,
            run=self.run if base_run is None else base_run,
        )
        counted: Future[TrainOutcome] = Future()

        def count(job_future: Future[TrainOutcome]) -> None:
            # (``counted`` may have been cancelled by a caller that stopped waiting: then its
            # result goes nowhere, but the steps trained are counted all the same.)
            try:
                outcome = job_future.result()
            except BaseException as e:  # (a cancelled job's CancelledError too)
                if counted.set_running_or_notify_cancel():
                    counted.set_exception(e)
                return
            try:
                self._count_training(outcome)
            finally:  # (the caller is answered whatever the metrics do)
                if counted.set_running_or_notify_cancel():
                    counted.set_result(outcome)

        def drop_if_unwanted(waiter: Future[TrainOutcome]) -> None:
            if waiter.cancelled():  # nobody waits for it: a job not started yet never runs,
                queued.cancel()
                job.abandoned.set()  # and a running one stops at its next layer

        queued = self.trainer.submit(job)
        queued.add_done_callback(count)
        counted.add_done_callback(drop_if_unwanted)
        return counted

    def _count_training(self, outcome: TrainOutcome) -> None:
        self.metrics.training_steps.inc(outcome.steps)
        self.metrics.training_tokens.inc(outcome.tokens)

    def _served_state(
        self, expected: int | None = None, locked: bool = False, run: str | None = None
    ) -> AdapterState:
        """The adapter new requests get (merged or in its slot), as float32 numpy.

        Read under the push lock (``locked``: the caller holds it), so no version lands between
        checking ``expected`` (and ``run``, the run it is a version of) and reading, and no load
        rewrites the slot being read.
        """
        with contextlib.nullcontext() if locked else self._push_lock:
            if expected is not None and self.served_version != expected:
                raise VersionConflictError(
                    f"replica serves version {self.served_version}, not base_version {expected}"
                )
            if run is not None and self.run != run:
                raise VersionConflictError(f"replica serves run {self.run!r}, not base_run {run!r}")
            if self.merged.state is not None:
                return self.merged.state
            slot = self.slots.current_slot
            if slot < 0:
                raise ConfigError("no adapter version is served yet: push one before training")
            return self.modules.read_slot(slot)

    def load_report(self, reset: bool) -> LoadReport:
        s = self.engine.stats()
        steps = self.trainer.steps_total if self.trainer is not None else 0
        return self.load_window.report(
            s.queue_depth, s.running, self.training_share, steps, reset, serving_busy_s=s.busy_s
        )


def _settle_aside(run_dir: Path) -> None:
    """After a crash mid re-push: a version set aside goes back where its new copy never landed
    (a rollback to it still finds it), and is dropped where the new copy did."""
    for aside in sorted(run_dir.glob(f"{ASIDE_PREFIX}v*")):
        target = run_dir / aside.name[len(ASIDE_PREFIX) :].rsplit("-", 1)[0]
        if not _VERSION_DIR.fullmatch(target.name) or not aside.is_dir():
            continue
        if target.exists():
            remove_adapter_dir(aside)
        else:
            aside.rename(target)
            log.warning("put back %s, set aside by an interrupted re-push", target.name)
