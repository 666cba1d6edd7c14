"""Co-execution: the replica's trainer thread, training the next adapter on the serving base.

The trainer runs LoRA micro-steps on the *training* adapter of the shared :class:`MultiLoraModules`
under ``lora_context(train())``, while the engine thread serves through the serving slots. Before
every micro-step it asks the SLO guard (:func:`training_decision`) whether it may run and with how
many threads; when it must yield it waits on the engine's ``busy_changed`` condition (woken when
serving load changes) with the guard's re-check timeout.

Thread budget (2 cores): the engine thread uses 1 compute thread; the trainer uses 1 while
requests are present and both when the replica is idle (DESIGN.md: one compute thread per core
interferes least; ``torch.set_num_threads`` is per thread).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import torch

from collm_fl.adapters import AdapterState
from collm_fl.data.tokenize import batch_to
from collm_fl.errors import CollmError, ConfigError
from collm_fl.models import model_device
from collm_fl.policies.slo_guard import (
    GuardDecision,
    GuardInputs,
    behind_schedule,
    training_decision,
)
from collm_fl.replica.affinity import available_cpus, lower_thread_priority
from collm_fl.replica.engine import InferenceEngine
from collm_fl.replica.lora_layers import MultiLoraModules, lora_context, train
from collm_fl.replica.metrics import SLO

log = logging.getLogger(__name__)

BUSY_WINDOW_S = 10.0


@dataclass(frozen=True)
class TrainJob:
    """A round's training budget for this replica."""

    start_state: Mapping[str, np.ndarray]  # the global adapter the round starts from
    steps: int
    learning_rate: float
    deadline_s: float  # stop early (with the steps done) when the round's deadline passes
    round_number: int = 0
    exclusive: bool = False  # serving is paused by the caller: no SLO guard, every thread
    backfill_steps: int = 0  # more steps after ``steps``, each run only while serving is idle


@dataclass(frozen=True)
class TrainOutcome:
    state: AdapterState
    steps: int  # micro-steps actually run (< job.steps when the deadline cut it short)
    loss: float  # token-weighted mean training loss
    tokens: int
    seconds: float  # wall time of the job
    train_seconds: float  # time inside micro-steps
    yielded_seconds: float  # time spent yielding to serving
    yields: int
    deadline_hit: bool
    backfilled: int = 0  # of ``steps``, how many ran as backfill (on idle cycles)


class TrainerStopped(CollmError):
    """The trainer was stopped before the job finished."""


class CoTrainer:
    """Runs training jobs on the replica's training adapter, yielding to serving."""

    def __init__(
        self,
        modules: MultiLoraModules,
        model: torch.nn.Module,
        engine: InferenceEngine,
        batches: Iterator[Mapping[str, torch.Tensor]],
        slo: SLO,
        training_share: float = 0.5,
        total_threads: int | None = None,
        nice: int = 0,
    ) -> None:
        self.modules = modules
        self.model = model
        self.device = model_device(model)  # batches come from the CPU; the model may be on a GPU
        self.engine = engine
        self.batches = batches
        self.slo = slo
        self.total_threads = total_threads or len(available_cpus())
        self.nice = nice  # the trainer thread's priority below serving (see replica.affinity)
        self._share = 0.0
        self.set_share(training_share)
        self._jobs: queue.Queue[tuple[TrainJob, Future[TrainOutcome]] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._busy: deque[tuple[float, float]] = deque()  # (start, end) of recent micro-steps
        self._step_ewma = 0.0
        self.steps_total = 0
        self.tokens_total = 0
        self.running_job = False

    # ---- control (any thread) ----

    @property
    def share(self) -> float:
        return self._share

    def set_share(self, share: float) -> None:
        if not 0.0 <= share <= 1.0:
            raise ConfigError(f"training share must be in [0, 1], got {share}")
        self._share = float(share)
        with self.engine.busy_changed:  # wake a yielding trainer to re-decide
            self.engine.busy_changed.notify_all()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("trainer already started")
        self._thread = threading.Thread(target=self._loop, name="collm-trainer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        self._jobs.put(None)
        with self.engine.busy_changed:
            self.engine.busy_changed.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: TrainJob) -> Future[TrainOutcome]:
        if job.steps < 0 or job.backfill_steps < 0:
            raise ConfigError(
                f"steps and backfill steps must be >= 0, got {job.steps} and {job.backfill_steps}"
            )
        if not 0 < job.learning_rate < 1:
            raise ConfigError(f"learning rate must be in (0, 1), got {job.learning_rate}")
        fut: Future[TrainOutcome] = Future()
        self._jobs.put((job, fut))
        return fut

    # ---- trainer thread ----

    def _loop(self) -> None:
        lower_thread_priority(self.nice)  # before any torch call: its OpenMP team inherits it
        while not self._stopping.is_set():
            item = self._jobs.get()
            if item is None:
                break
            job, fut = item
            if not fut.set_running_or_notify_cancel():
                continue
            self.running_job = True
            try:
                fut.set_result(self._run(job))
            except Exception as e:  # the job fails; the trainer (and serving) carry on
                log.exception("training job for round %d failed", job.round_number)
                fut.set_exception(e)
            finally:
                self.running_job = False
        while not self._jobs.empty():  # fail what was never started
            item = self._jobs.get_nowait()
            if item is not None:
                item[1].set_exception(TrainerStopped("replica is shutting down"))

    def _run(self, job: TrainJob) -> TrainOutcome:
        started = time.monotonic()
        self.modules.set_training_state(job.start_state)
        params = self.modules.training_parameters()
        optimizer = torch.optim.AdamW(params, lr=job.learning_rate)
        loss_sum, tokens, steps, train_s, yielded_s, yields = 0.0, 0, 0, 0.0, 0.0, 0
        deadline_hit = False
        why_yielded: Counter[str] = Counter()
        planned = job.steps
        total = job.steps + (0 if job.exclusive else job.backfill_steps)
        while steps < total:
            if self._stopping.is_set():
                raise TrainerStopped("replica is shutting down")
            if time.monotonic() - started >= job.deadline_s:
                deadline_hit = True
                log.info(
                    "round %d: deadline reached after %d/%d steps",
                    job.round_number,
                    steps,
                    total,
                )
                break
            decision = (
                GuardDecision(True, self.total_threads, 0.0, "exclusive: serving is paused")
                if job.exclusive
                else training_decision(
                    self._guard_inputs(
                        behind_schedule(
                            planned - steps,
                            self._step_ewma,
                            self._share,
                            job.deadline_s - (time.monotonic() - started),
                        )
                    ),
                    backfill=steps >= planned,
                )
            )
            if not decision.run:
                why_yielded[decision.reason] += 1
                t0 = time.monotonic()
                remaining = job.deadline_s - (t0 - started)
                with self.engine.busy_changed:
                    self.engine.busy_changed.wait(timeout=max(0.0, min(decision.wait_s, remaining)))
                yielded_s += time.monotonic() - t0
                yields += 1
                continue
            torch.set_num_threads(decision.threads)
            t0 = time.monotonic()
            loss, n = self._micro_step(optimizer, params)
            t1 = time.monotonic()
            self._note_step(t0, t1)
            train_s += t1 - t0
            loss_sum += loss * n
            tokens += n
            steps += 1
        self.steps_total += steps
        self.tokens_total += tokens
        log.info(
            "round %d: trained %d/%d steps (%d of %d backfill) in %.1fs (%.1fs in steps), "
            "yielded %.1fs: %s",
            job.round_number,
            steps,
            total,
            max(0, steps - planned),
            total - planned,
            time.monotonic() - started,
            train_s,
            yielded_s,
            ", ".join(f"{k} x{n}" for k, n in why_yielded.most_common()) or "never",
        )
        return TrainOutcome(
            state=self.modules.get_training_state(),
            steps=steps,
            loss=loss_sum / max(tokens, 1),
            tokens=tokens,
            seconds=time.monotonic() - started,
            train_seconds=train_s,
            yielded_seconds=yielded_s,
            yields=yields,
            deadline_hit=deadline_hit,
            backfilled=max(0, steps - planned),
        )

    def _micro_step(
        self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]
    ) -> tuple[float, int]:
        batch = batch_to(next(self.batches), self.device)
        with lora_context(train()):
            out = self.model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                labels=batch["labels"],
            )
        loss = out.loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss {loss.item()}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return float(loss.item()), int((batch["labels"][:, 1:] != -100).sum())

    def _note_step(self, t0: float, t1: float) -> None:
        self._busy.append((t0, t1))
        self._step_ewma = (
            (t1 - t0) if self._step_ewma == 0 else 0.8 * self._step_ewma + 0.2 * (t1 - t0)
        )

    def busy_fraction(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        window = max(BUSY_WINDOW_S, 10 * self._step_ewma)
        while self._busy and self._busy[0][1] < now - window:
            self._busy.popleft()
        busy = sum(min(e, now) - max(s, now - window) for s, e in self._busy)
        return max(0.0, busy) / window

    def _guard_inputs(self, behind: bool = False) -> GuardInputs:
        s = self.engine.stats()
        return GuardInputs(
            queue_depth=s.queue_depth,
            running=s.running,
            oldest_waiting_s=s.oldest_waiting_s,
            decode_step_s=s.decode_step_s,
            training_share=self._share,
            busy_fraction=self.busy_fraction(),
            train_step_s=self._step_ewma,
            ttft_slo_s=self.slo.ttft_s,
            tpot_slo_s=self.slo.tpot_s,
            total_threads=self.total_threads,
            preemptible=self.nice > 0,
            behind_schedule=behind,
        )
