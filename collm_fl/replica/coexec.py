"""Co-execution: the replica's trainer thread, training the next adapter on the serving base.

The trainer runs LoRA micro-steps on the *training* adapter of the shared :class:`MultiLoraModules`
under ``lora_context(train())``, while the engine thread serves through the serving slots. Before
every micro-step it asks the SLO guard (:func:`training_decision`) whether it may run, with how
many threads, and what share of serving's time the step may borrow; when it must yield it waits on
a change of the engine's serving state (``InferenceEngine.wait_for_change``, counted from
before the decision, so a change while it decided is not missed) or the guard's re-check timeout.

Steps take turns with serving at layer granularity: every LoRA layer of a step (and the LM head),
forward and backward, calls the step's checkpoint, which waits while the engine has work and is
not resting for training, and drops the step (the optimizer has not stepped) when the round's
deadline passes. So a step runs on serving's idle moments, and a request arriving mid-step waits
at most one layer. Time spent on requests that have all missed their TTFT SLO earns no goodput:
while a step runs and every request the engine holds is late (none overdue), the engine rests
and the step — planned or backfill — takes the core (``InferenceEngine.want_late_turn``) until a
fresh request arrives. A planned step that falls behind its round's plan (the planned steps left, at
the training share, need most of the time left) asks the engine to rest for it: the share of
serving's time the allocation gave, no more, and only while behind — idle moments first, borrowed
time as late as the plan allows. The engine lends only up to its ``max_lend_share`` (replica
``--max-lend-share``; 0 by default: then no plan counts as behind and training runs on idle
moments alone, see ``InferenceEngine.lend_to_training``). Backfill steps never borrow. (Kernel
priorities cannot do this: a step at the lowest priority gets almost nothing from a busy core,
also from every other process on it, and an unprivileged thread cannot raise its priority
again.)

Thread budget (2 cores): the engine thread uses 1 compute thread; the trainer uses 1 while
requests are present and both when the replica is idle (one compute thread per core interferes
least, docs/replica.md; ``torch.set_num_threads`` is per thread).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch

from collm_fl.adapters import AdapterState
from collm_fl.data.tokenize import batch_to
from collm_fl.errors import ConfigError, WorkFailed
from collm_fl.models import model_device
from collm_fl.policies.slo_guard import (
    GuardDecision,
    GuardInputs,
    behind_schedule,
    shared_threads,
    training_decision,
)
from collm_fl.replica.affinity import available_cpus, lower_thread_priority
from collm_fl.replica.engine import InferenceEngine
from collm_fl.replica.lora_layers import (
    MultiLoraModules,
    checkpoint_output_layer,
    lora_context,
    train,
)
from collm_fl.replica.metrics import SLO

log = logging.getLogger(__name__)

GATE_RECHECK_S = 0.25  # a step waiting for its turn re-checks its deadline and plan this often

T = TypeVar("T")


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
    # Its first step waits this long after submission (the allocation's turns: the replicas of a
    # light round train one after another; the deadline still counts from submission).
    start_after_s: float = 0.0
    # The federation run the round belongs to: a job of a later round of the same run supersedes
    # this one (see CoTrainer.submit).
    run: str | None = None
    # Set when nobody waits for the outcome any more (the caller left, or a later round of its
    # run superseded it): a running job stops at its step's next layer (that step dropped), with
    # the steps done (a job not started yet is cancelled, or fails with JobSuperseded, instead).
    abandoned: threading.Event = field(default_factory=threading.Event, compare=False, repr=False)
    # Set (with ``abandoned``) when a later round of its run superseded it.
    superseded: threading.Event = field(default_factory=threading.Event, compare=False, repr=False)


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
    backfilled: int = 0  # of ``steps``, how many ran as backfill (on idle or late-only cycles)
    abandoned_step: bool = False  # the deadline came mid-step: that step was dropped, not applied
    lent_seconds: float = 0.0  # time serving rested for this job while it was behind its plan
    late_seconds: float = 0.0  # time serving rested for its steps while all its work was late
    # the finished steps' compute alone, their waits for serving within the layers left out:
    # the replica's speed, which a step timed while serving shared the core overstates
    step_cost_seconds: float = 0.0


class _DeadlineReached(Exception):
    """Raised at a LoRA layer boundary when the round's deadline passes mid-step."""


class _CallerLeft(_DeadlineReached):
    """Raised at a LoRA layer boundary when the job's caller left mid-step (``abandoned``)."""


class TrainerStopped(WorkFailed):
    """The trainer was stopped before the job finished."""


class JobSuperseded(WorkFailed):
    """A later round of the job's run was submitted before the job started: it never runs (its
    round is over; the trainer is the new round's)."""


@dataclass(eq=False)
class _Queued:
    """A submitted job until the trainer is done with it."""

    job: TrainJob
    future: Future[TrainOutcome]
    submitted: float  # the trainer clock's reading at submission (the deadline counts from it)
    # Its future has left PENDING (started, cancelled, or answered as superseded): read and set
    # under the trainer's submit lock only, so that exactly one thread takes it out of PENDING.
    claimed: bool = False


class _Worker:
    """The thread that runs the trainer's micro-steps, one at a time, at nice ``nice``.

    Started by whoever starts the trainer (a new thread inherits its creator's nice value, and an
    unprivileged thread cannot lower it again), so it can run at serving's priority.
    """

    def __init__(self, name: str, nice: int) -> None:
        self._calls: queue.Queue[tuple[Callable[[], object], Future[object]] | None] = queue.Queue()
        self._nice = nice
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def native_id(self) -> int | None:
        return self._thread.native_id

    def run(self, fn: Callable[[], T]) -> T:
        fut: Future[object] = Future()
        self._calls.put((fn, fut))
        return fut.result()  # type: ignore[return-value]  # raises what fn raised

    def stop(self) -> None:
        self._calls.put(None)

    def _loop(self) -> None:
        lower_thread_priority(self._nice)  # before any torch call: its OpenMP team inherits it
        while (item := self._calls.get()) is not None:
            fn, fut = item
            try:
                fut.set_result(fn())
            except BaseException as e:  # handed to the caller of run()
                fut.set_exception(e)


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
        lend_early: bool = False,
    ) -> None:
        self.modules = modules
        self.model = model
        self.device = model_device(model)  # batches come from the CPU; the model may be on a GPU
        self.engine = engine
        self.batches = batches
        self.slo = slo
        self.total_threads = total_threads or len(available_cpus())
        self.nice = nice  # the step worker's nice value (see replica.affinity); 0 = serving's
        # A plan borrows serving's time from the round's start (True) or only as late as it
        # can and still meet the deadline (False; see slo_guard.behind_schedule).
        self.lend_early = lend_early
        checkpoint_output_layer(model)  # steps give way around the LM head too
        self._share = 0.0
        self.set_share(training_share)
        self._jobs: queue.Queue[_Queued | None] = queue.Queue()
        self._live: list[_Queued] = []  # queued or running (under _submit_lock)
        self._thread: threading.Thread | None = None
        self._worker: _Worker | None = None  # runs the micro-steps (started by start())
        self._stopping = threading.Event()
        # a job waiting for its start: set by stop(), a cancel or a later round's submission
        self._wake = threading.Event()
        self._submit_lock = threading.Lock()
        self._step_ewma = 0.0  # wall seconds per micro-step (paces the guard's re-checks)
        self._waited_s = 0.0  # the current step's waits at its layers for serving to give way
        # compute seconds per micro-step (what the plan needs), by the threads it ran on
        self._step_costs: dict[int, float] = {}
        self.clock: Callable[[], float] = time.monotonic  # the deadline's clock (tests replace it)
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
        self.engine.notify_change()  # wake a yielding trainer to re-decide

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("trainer already started")
        self._worker = _Worker("collm-trainer-step", self.nice)
        self._thread = threading.Thread(target=self._loop, name="collm-trainer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._submit_lock:
            self._stopping.set()
        self._wake.set()
        self._jobs.put(None)
        self.engine.notify_change()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._worker is not None:
            self._worker.stop()

    def submit(self, job: TrainJob) -> Future[TrainOutcome]:
        """Queue ``job``; jobs run one at a time, in order of submission.

        A job of a later round supersedes the queued and running jobs of earlier rounds of its
        run (``TrainJob.run``): their rounds are over, and the new round's deadline must not
        pass while they wait for their starts or train. One not started yet fails at once with
        :class:`JobSuperseded`; a running one stops at its step's next layer, with the steps
        done. Jobs of the same round (a retry) queue behind each other as before.
        """
        if job.steps < 0 or job.backfill_steps < 0:
            raise ConfigError(
                f"steps and backfill steps must be >= 0, got {job.steps} and {job.backfill_steps}"
            )
        if not 0 < job.learning_rate < 1:
            raise ConfigError(f"learning rate must be in (0, 1), got {job.learning_rate}")
        if not 0 <= job.start_after_s <= job.deadline_s:  # (NaN too)
            raise ConfigError(
                f"start_after_s must be in [0, deadline_s={job.deadline_s:g}], "
                f"got {job.start_after_s}"
            )
        if job.start_after_s and job.exclusive:
            raise ConfigError("start_after_s is for co-executing jobs (exclusive pauses serving)")
        fut: Future[TrainOutcome] = Future()
        superseded: list[_Queued] = []
        with self._submit_lock:  # (a job queued after stop() would wait for ever)
            if self._stopping.is_set():
                fut.set_exception(TrainerStopped("replica is shutting down"))
            else:
                superseded = self._supersede_earlier_rounds(job)
                # Its deadline counts from now: a job queued behind another (a retry, the next
                # round) must not train for its whole deadline once it starts.
                entry = _Queued(job, fut, self.clock())
                self._live.append(entry)
                self._jobs.put(entry)
        # (answered outside the lock: a callback of the future may submit again)
        for entry in superseded:
            log.info(
                "round %d: training job superseded by round %d before it started",
                entry.job.round_number,
                job.round_number,
            )
            entry.future.set_exception(
                JobSuperseded(
                    f"the training job of round {entry.job.round_number} was superseded by "
                    f"round {job.round_number} before it started"
                )
            )
        return fut

    def _supersede_earlier_rounds(self, job: TrainJob) -> list[_Queued]:
        """Abandon the live jobs of ``job``'s run from earlier rounds (caller holds the submit
        lock): a running one stops at its step's next layer; those not started are claimed and
        returned, for the caller to answer."""
        not_started: list[_Queued] = []
        earlier = [
            e
            for e in self._live
            if e.job.run == job.run
            and e.job.round_number < job.round_number
            and not e.job.superseded.is_set()
        ]
        for entry in earlier:
            entry.job.superseded.set()
            entry.job.abandoned.set()
            if self._claim(entry):  # not started (nor cancelled): it never runs
                not_started.append(entry)
        if earlier:
            self._wake.set()  # (one waiting for its start re-checks)
            self.engine.notify_change()  # (so does a running one yielding to serving)
        return not_started

    def _claim(self, entry: _Queued) -> bool:
        """Take a job's future out of PENDING (caller holds the submit lock): True if it is now
        running; False if it was cancelled or already claimed."""
        if entry.claimed:
            return False
        entry.claimed = True
        return entry.future.set_running_or_notify_cancel()  # (False: cancelled)

    # ---- trainer thread ----

    def _loop(self) -> None:
        while not self._stopping.is_set():
            entry = self._jobs.get()
            if entry is None:
                break
            try:
                self._run_entry(entry)
            finally:
                with self._submit_lock:
                    self._live.remove(entry)
        while not self._jobs.empty():  # fail what was never started
            entry = self._jobs.get_nowait()
            if entry is None:
                continue
            with self._submit_lock:
                unanswered = self._claim(entry)
                self._live.remove(entry)
            if unanswered:
                entry.future.set_exception(TrainerStopped("replica is shutting down"))

    def _run_entry(self, entry: _Queued) -> None:
        """Run a queued job once its start comes, unless it was cancelled or superseded."""
        job, fut = entry.job, entry.future
        self._await_start(entry)
        with self._submit_lock:  # (submit() may have answered it as superseded meanwhile)
            if not self._claim(entry):
                return
        if self._stopping.is_set():  # (stopped while it waited for its start)
            fut.set_exception(TrainerStopped("replica is shutting down"))
            return
        self.running_job = True
        try:
            fut.set_result(self._run(job, entry.submitted))
        except TrainerStopped as e:  # the replica is shutting down: no failure of the job
            log.info("training job for round %d stopped: %s", job.round_number, e)
            fut.set_exception(e)
        except Exception as e:  # the job fails; the trainer (and serving) carry on
            log.exception("training job for round %d failed", job.round_number)
            fut.set_exception(e)
        finally:
            self.running_job = False

    def _await_start(self, entry: _Queued) -> None:
        """Wait until the job's start (``start_after_s`` after its submission), or until it is
        cancelled, abandoned (superseded) or the trainer stops. Meanwhile the replica reports no
        training running. (The wait is in real time, measured on ``self.clock``: a test's
        frozen clock never starts it.)"""
        job, fut = entry.job, entry.future
        if job.start_after_s <= 0:
            return
        self._wake.clear()
        fut.add_done_callback(lambda _: self._wake.set())  # (cancelled while waiting)
        if self._stopping.is_set() or job.abandoned.is_set():  # (its wake was cleared above)
            return
        log.info(
            "round %d: training starts in %.1fs (its turn)",
            job.round_number,
            job.start_after_s - (self.clock() - entry.submitted),
        )
        while not (fut.done() or job.abandoned.is_set() or self._stopping.is_set()):
            left = job.start_after_s - (self.clock() - entry.submitted)
            if left <= 0:
                return
            self._wake.wait(left)

    def _run(self, job: TrainJob, submitted: float) -> TrainOutcome:
        before = self.engine.stats()
        try:
            return self._train(job, submitted, before.lent_s, before.late_rest_s)
        finally:
            self.engine.lend_to_training(0.0)

    def _train(
        self, job: TrainJob, started: float, lent_before: float, late_before: float
    ) -> TrainOutcome:
        """``started``: when the job was submitted (its deadline counts from then)."""
        wall0 = time.monotonic()
        abort_at = started + job.deadline_s
        self.modules.set_training_state(job.start_state)
        params = self.modules.training_parameters()
        # As a device trains (collm_fl.training.train_steps): torch's default decay of 0.01 would
        # make a replica's steps other steps than a device's, which the server weighs alike.
        optimizer = torch.optim.AdamW(params, lr=job.learning_rate, weight_decay=0.0)
        loss_sum, tokens, steps, train_s, yielded_s, yields = 0.0, 0, 0, 0.0, 0.0, 0
        cost_s = 0.0  # the finished steps' own compute (their waits for serving left out)
        deadline_hit = abandoned = False
        why_yielded: Counter[str] = Counter()
        planned = job.steps
        total = job.steps + (0 if job.exclusive else job.backfill_steps)
        while steps < total:
            if self._stopping.is_set():
                raise TrainerStopped("replica is shutting down")
            if job.abandoned.is_set():
                log.info("round %d: %s: stopped at %d steps", job.round_number, _why(job), steps)
                break
            seen = self.engine.change_count()  # before the decision reads the serving state
            time_left = job.deadline_s - (self.clock() - started)
            # (an exclusive job's steps run on every thread; a co-executed one's are costed on
            # those serving leaves them)
            threads = self.total_threads if job.exclusive else None
            if time_left <= 0 or not self._step_fits(time_left, 1.0, threads):
                deadline_hit = True
                log.info(
                    "round %d: deadline %s after %d/%d steps",
                    job.round_number,
                    "reached"
                    if time_left <= 0
                    else f"too close for another step ({time_left:.1f}s)",
                    steps,
                    total,
                )
                break
            # A planned step that cannot end in time at the share serving would lend it is run
            # like backfill: on idle moments only, at full speed.
            lend_cap = min(self._share, self.engine.max_lend_share)
            as_backfill = steps >= planned or (
                lend_cap > 0 and not self._step_fits(time_left, lend_cap)
            )
            decision = (
                GuardDecision(True, self.total_threads, 0.0, "exclusive: serving is paused")
                if job.exclusive
                else training_decision(
                    self._guard_inputs(self._behind(planned - steps, time_left)),
                    backfill=as_backfill,
                )
            )
            self.engine.lend_to_training(decision.lend_share if decision.run else 0.0)
            if not decision.run:
                why_yielded[decision.reason] += 1
                t0 = time.monotonic()
                remaining = job.deadline_s - (self.clock() - started)
                # A change since the decision read the state (serving went idle meanwhile)
                # ends the wait at once: the notification is not lost.
                self.engine.wait_for_change(seen, max(0.0, min(decision.wait_s, remaining)))
                yielded_s += time.monotonic() - t0
                yields += 1
                continue
            t0 = time.monotonic()
            self.engine.want_late_turn(not job.exclusive)
            try:
                checkpoint = self._checkpoint(
                    abort_at, 0 if as_backfill else planned - steps, job.abandoned
                )
                loss, n, cpu_s = self._step(optimizer, params, checkpoint, decision.threads)
            except _DeadlineReached as e:
                # The optimizer has not stepped: the adapter is the last finished step's.
                optimizer.zero_grad(set_to_none=True)
                train_s += time.monotonic() - t0
                abandoned = True
                deadline_hit = not isinstance(e, _CallerLeft)
                log.info(
                    "round %d: %s during step %d: dropped it (%d/%d steps done)",
                    job.round_number,
                    _why(job) if isinstance(e, _CallerLeft) else "deadline reached",
                    steps + 1,
                    steps,
                    total,
                )
                break
            finally:
                self.engine.want_late_turn(False)
            t1 = time.monotonic()
            # Its cost: the worker's CPU time on one thread, else the wall time less the waits
            # at its layers while serving had the core (a burst mid-step is not its cost).
            cost = cpu_s if cpu_s is not None else t1 - t0 - self._waited_s
            self._note_step(t0, t1, cost, decision.threads)
            cost_s += max(0.0, cost)
            train_s += t1 - t0
            loss_sum += loss * n
            tokens += n
            steps += 1
        self.steps_total += steps
        self.tokens_total += tokens
        after = self.engine.stats()
        log.info(
            "round %d: trained %d/%d steps (%d of %d backfill) in %.1fs (%.1fs in steps), "
            "yielded %.1fs, serving lent %.1fs, rested %.1fs with only late requests: %s",
            job.round_number,
            steps,
            total,
            max(0, steps - planned),
            total - planned,
            time.monotonic() - wall0,
            train_s,
            yielded_s,
            after.lent_s - lent_before,
            after.late_rest_s - late_before,
            ", ".join(f"{k} x{n}" for k, n in why_yielded.most_common()) or "never",
        )
        return TrainOutcome(
            state=self.modules.get_training_state(),
            steps=steps,
            loss=loss_sum / max(tokens, 1),
            tokens=tokens,
            seconds=time.monotonic() - wall0,
            train_seconds=train_s,
            step_cost_seconds=cost_s,
            yielded_seconds=yielded_s,
            yields=yields,
            deadline_hit=deadline_hit,
            backfilled=max(0, steps - planned),
            abandoned_step=abandoned,
            lent_seconds=after.lent_s - lent_before,
            late_seconds=after.late_rest_s - late_before,
        )

    def _step_fits(self, time_left: float, rate: float, threads: int | None = None) -> bool:
        """Whether a step can end before the deadline with ``rate`` of the core (its measured
        compute time / rate <= the time left; unknown cost: yes). One that cannot would be
        dropped at the deadline, its compute wasted. Costed as :meth:`_plan_step_cost`: on the
        threads a step gets while serving has work."""
        cost = self._plan_step_cost() if threads is None else self._step_cost(threads)
        if cost <= 0:
            return True
        return rate > 0 and cost / rate <= time_left

    def _step(
        self,
        optimizer: torch.optim.Optimizer,
        params: list[torch.nn.Parameter],
        checkpoint: Callable[[], None],
        threads: int,
    ) -> tuple[float, int, float | None]:
        """One micro-step on the step worker: (loss, tokens, compute seconds).

        The compute seconds are the worker's CPU time when one compute thread runs the whole step
        (its cost however long it waited for the core); None with more threads.
        """
        if self._worker is None:
            raise RuntimeError("trainer not started")

        def step() -> tuple[float, int, float | None]:
            torch.set_num_threads(threads)  # per thread
            cpu0 = time.thread_time()
            loss, n = self._micro_step(optimizer, params, checkpoint)
            return loss, n, time.thread_time() - cpu0 if threads == 1 else None

        return self._worker.run(step)

    def _checkpoint(
        self, abort_at: float, planned_left: int = 0, left: threading.Event | None = None
    ) -> Callable[[], None]:
        """What every LoRA layer of a micro-step calls, forward and backward: stop there at
        shutdown or the deadline, and give way to serving — wait while the engine has work and
        is not resting for training (``InferenceEngine.wait_for_training_turn``).

        A planned step (``planned_left``: the round's planned steps left, this one included)
        that falls behind the plan while it waits asks serving to lend it its share; the loan
        ends with the step (the next decision sets it again). Once ``left`` is set (the job's
        caller left) the step stops at its next layer, dropped: nobody waits for its result.
        """

        self._waited_s = 0.0  # this step's waits for its turn (see _train's cost)

        def check() -> None:
            while True:
                if self._stopping.is_set():
                    raise TrainerStopped("replica is shutting down")
                if left is not None and left.is_set():
                    raise _CallerLeft
                time_left = abort_at - self.clock()
                if time_left <= 0:
                    raise _DeadlineReached
                t0 = time.monotonic()
                turn = self.engine.wait_for_training_turn(GATE_RECHECK_S)
                self._waited_s += time.monotonic() - t0
                if turn:
                    return
                if planned_left and self._behind(planned_left, time_left):
                    self.engine.lend_to_training(self._share)

        return check

    def _micro_step(
        self,
        optimizer: torch.optim.Optimizer,
        params: list[torch.nn.Parameter],
        checkpoint: Callable[[], None] | None = None,
    ) -> tuple[float, int]:
        batch = batch_to(next(self.batches), self.device)
        with lora_context(train(checkpoint)):
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
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        if not torch.isfinite(norm):  # (clipping by an infinite norm makes every weight NaN)
            optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(f"non-finite gradient norm {norm.item()}")
        optimizer.step()
        return float(loss.item()), int((batch["labels"][:, 1:] != -100).sum())

    def _behind(self, planned_left: int, time_left: float) -> bool:
        """Whether the round's plan is behind (``slo_guard.behind_schedule``) at this speed, at
        the share the engine will lend it (the allocation's, at most ``max_lend_share``): a plan
        judged at a larger share than it borrows starts borrowing too late to catch up.

        Never while the engine lends nothing (``max_lend_share`` 0, the default): judged at the
        full share, a plan counted as behind (its first step always did), and the guard ran its
        step "taking the share" — none lent — past its TTFT and TPOT rules."""
        share = min(self._share, max(self.engine.max_lend_share, 0.0))
        return behind_schedule(
            planned_left, self._plan_step_cost(), share, time_left, early=self.lend_early
        )

    def _note_step(self, t0: float, t1: float, cost_s: float, threads: int) -> None:
        """Time a finished step: its wall time (paces re-checks) and its cost on ``threads``."""
        self._step_ewma = _ewma(self._step_ewma, t1 - t0)
        self._step_costs[threads] = _ewma(self._step_costs.get(threads, 0.0), cost_s)

    def _step_cost(self, threads: int) -> float:
        """Compute seconds of a step on ``threads`` threads (0: none timed yet).

        Kept per thread count: a step on every thread of an idle replica is timed by its wall
        time, one beside serving by its CPU time on one thread, and one average of both
        underestimated the one-thread steps a plan borrows for. Before a step was timed on
        ``threads``, an upper bound from the others: a step timed on ``m`` threads takes at most
        ``m / threads`` times as long on fewer, and no longer on more."""
        if threads in self._step_costs:
            return self._step_costs[threads]
        return min((c * max(m / threads, 1.0) for m, c in self._step_costs.items()), default=0.0)

    def _plan_step_cost(self) -> float:
        """The cost a plan is judged at: a step on the threads it gets while serving has work
        (``slo_guard.shared_threads``), as a step behind its plan runs."""
        return self._step_cost(shared_threads(self.total_threads))

    def _guard_inputs(self, behind: bool = False) -> GuardInputs:
        s = self.engine.stats()
        return GuardInputs(
            queue_depth=s.queue_depth,
            running=s.running,
            oldest_waiting_s=s.oldest_waiting_s,
            decode_step_s=s.decode_step_s,
            training_share=self._share,
            train_step_s=self._step_ewma,
            ttft_slo_s=self.slo.ttft_s,
            tpot_slo_s=self.slo.tpot_s,
            total_threads=self.total_threads,
            behind_schedule=behind,
            only_late=s.only_late,
        )


def _why(job: TrainJob) -> str:
    """Why an abandoned job stops (for the log)."""
    return "a later round superseded it" if job.superseded.is_set() else "its caller left"


def _ewma(old: float, new: float) -> float:
    return new if old == 0 else 0.8 * old + 0.2 * new
