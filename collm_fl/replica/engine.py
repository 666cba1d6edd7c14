"""Iteration-level (continuous) batching on CPU through unmerged multi-LoRA slots.

One engine thread loops: admit waiting requests (each pins the current adapter slot *at
admission*, so its version is fixed then), prefill the newcomers as one left-padded batch, run one
batched decode step for every running row, emit tokens, and drop finished rows. Every forward runs
under ``lora_context(serve(slot of each row))``, so rows of one batch may use different versions.

The running rows share one left-padded KV cache (``collm_fl.replica.batch.RunningBatch``), so
padding never shifts RoPE and a row's tokens equal its tokens when run alone; it changes only when
membership does.

Threads: the replica runs one compute thread per core (``torch.set_num_threads(1)`` per compute
thread interferes least with a training thread; docs/replica.md); pass ``num_threads`` and the
engine thread applies it to itself when it starts. Nothing here sets it for the process (with
torch's OpenMP backend the setting is per thread: other threads keep their own).
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedTokenizerBase

from collm_fl.errors import ConfigError
from collm_fl.models import model_device
from collm_fl.policies.scheduling import (
    DEFAULT_DEFER_LIMIT_S,
    SCHEDULES,
    PrefillCost,
    PrefillFit,
    Running,
    Waiting,
    admission_order,
    only_late,
)
from collm_fl.replica.batch import Row, RunningBatch, cache_layers_select, dynamic_layers
from collm_fl.replica.lora_layers import MultiLoraModules, lora_context, serve
from collm_fl.replica.requests import (
    FINISH_CANCELLED,
    FINISH_ERROR,
    EngineStoppedError,
    GenerationRequest,
    InvalidPromptError,
    PromptTooLongError,
    QueueFullError,
    RequestHandle,
    TokenEvent,
)
from collm_fl.replica.sampling import (
    make_generator,
    sample_next,
)
from collm_fl.replica.slots import AdapterSlots

log = logging.getLogger(__name__)

EWMA_ALPHA = 0.2  # weight of the newest sample in the recent-timing averages
# Lending time to a co-execution trainer behind its round's plan (lend_to_training): the engine
# rests at most this long at a time (a long prefill is not followed by one stall a request would
# notice), and never lends more than this share, whatever it is configured to.
MAX_LEND_REST_S = 0.5
LEND_SHARE_LIMIT = 0.9
# Resting for a training step while all work is late (want_late_turn): how often the engine
# re-checks whether a request it holds has become overdue (nothing else notifies that).
LATE_RECHECK_S = 0.25


@dataclass(frozen=True)
class EngineStats:
    """A consistent snapshot of the engine's load, for the SLO guard and the co-execution loop."""

    queue_depth: int  # submitted, not yet admitted (nor cancelled)
    running: int  # admitted, not yet finished
    oldest_waiting_s: float  # age of the oldest waiting request (0 if none)
    tokens_generated: int  # total since start
    decode_step_s: float  # EWMA of one batched decode step's seconds
    prefill_s_per_token: float  # the fitted prefill seconds per padded token (PrefillCost)
    requests_finished: int  # total since start, any finish reason
    busy_s: float  # total seconds spent in engine steps since start (serving's compute time)
    admitted_late: int = 0  # admitted after their TTFT SLO had already passed (total)
    lent_s: float = 0.0  # seconds the engine rested for a trainer behind its plan (total)
    # Every request held is late and none overdue ("slo" schedule only; see want_late_turn).
    only_late: bool = False
    late_rest_s: float = 0.0  # seconds the engine rested for training while all it held was late
    prefill_fixed_s: float = 0.0  # the fitted prefill seconds per batched forward


class InferenceEngine:
    """Continuous batching over the replica's shared base model and serving slots."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        modules: MultiLoraModules,
        slots: AdapterSlots,
        max_batch_size: int = 8,
        max_queue: int = 64,
        max_model_len: int | None = None,
        num_threads: int | None = None,
        schedule: str = "fcfs",
        ttft_slo_s: float = 2.0,
        defer_limit_s: float = DEFAULT_DEFER_LIMIT_S,
        max_lend_share: float = 0.0,
    ):
        if max_batch_size < 1 or max_queue < 1:
            raise ConfigError(f"max_batch_size {max_batch_size}, max_queue {max_queue}: need >= 1")
        if schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        if not 0.0 <= max_lend_share <= LEND_SHARE_LIMIT:
            raise ConfigError(
                f"max_lend_share must be in [0, {LEND_SHARE_LIMIT}], got {max_lend_share}"
            )
        if ttft_slo_s <= 0 or defer_limit_s <= 0:
            raise ConfigError(
                f"ttft_slo_s {ttft_slo_s} and defer_limit_s {defer_limit_s} must be > 0"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.modules = modules
        self.slots = slots
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        # Admission order (collm_fl.policies.scheduling): "fcfs", or "slo" — requests that can
        # still meet ``ttft_slo_s`` first, none waiting longer than ``defer_limit_s``.
        self.schedule = schedule
        self.ttft_slo_s = ttft_slo_s
        self.defer_limit_s = defer_limit_s
        self.admitted_late = 0  # requests admitted after their TTFT SLO had already passed
        self.config = getattr(model, "config", None)
        context = getattr(self.config, "max_position_embeddings", 0)
        self.max_model_len = int(max_model_len or context)
        if self.max_model_len < 1:
            raise ConfigError("max_model_len is needed: the model config names no context length")
        self.vocab_size = int(getattr(self.config, "vocab_size", 0) or 0)  # 0: unknown, unchecked
        dynamic_layers(DynamicCache(config=self.config), initialized=False)  # fail early
        self.num_threads = num_threads
        self.eos_ids = _eos_ids(model, tokenizer)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        self.device = model_device(model)  # every input, mask and cache index goes here
        # transformers renamed ``past_key_values`` to ``cache`` (5.x; the old name is deprecated):
        # pass the KV cache under whichever name this version's forward takes.
        forward_params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "past_key_values" if "cache" not in forward_params else "cache"
        # One condition guards the queue and the counters; it is also what the co-execution
        # trainer waits on (``busy_changed``) to learn that serving went idle or busy.
        self.busy_changed = threading.Condition()
        self._changes = 0  # state changes so far: a waiter that read the state misses none
        self._waiting: deque[RequestHandle] = deque()
        self._active = 0  # admitted and not finished
        self._stopping = False
        self._busy_s = 0.0  # written by the engine thread only
        # Serving rests for a trainer behind its plan (lend_to_training) up to this share of its
        # time; 0 = never: training runs on idle moments alone.
        self.max_lend_share = max_lend_share
        self._lent_share = 0.0  # share of the time lent to the trainer now
        self._lent_s = 0.0
        self._late_turn_wanted = False  # a training step runs and may take late work's turn
        self._late_rest_s = 0.0  # finished rests; the one going on started at _late_rest_since
        self._late_rest_since: float | None = None
        # Whose turn the core is (wait_for_training_turn): a co-executed training step waits at
        # every LoRA layer while a step runs or serving has work it is not resting from.
        self._step_gate = threading.Condition()
        self._in_step = False
        self._resting = False
        self._paused = False
        self._step_lock = threading.Lock()  # held while a step runs (pause() waits on it)
        self._thread: threading.Thread | None = None
        self._tokens_generated = 0
        self._finished = 0
        self._decode_ewma = 0.0
        self._prefill_fit = PrefillFit()  # seconds on padded tokens, recent prefills weighing most
        self._prefill_cost = PrefillCost()  # its fit (refreshed with each prefill)
        # Engine-thread state: the running rows and their shared left-padded KV cache.
        self._newcomers: list[Row] = []  # admitted, not yet merged into the running batch
        self._batch = RunningBatch(self.device)

    # ---- lifecycle and submission (any thread) ----

    def start(self) -> None:
        with self.busy_changed:
            if self._thread is not None:
                raise RuntimeError("engine already started")
            self._thread = threading.Thread(target=self._loop, name="collm-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop the loop; requests still waiting or running finish with ``"error"``."""
        with self.busy_changed:
            self._stopping = True
            self._changed()
        self._set_gate()  # a training step waiting for its turn goes on
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a request; raises QueueFullError, InvalidPromptError (PromptTooLongError) or
        EngineStoppedError."""
        if not request.prompt_ids:
            raise InvalidPromptError("prompt must hold at least one token")
        if self.vocab_size and not all(0 <= t < self.vocab_size for t in request.prompt_ids):
            raise InvalidPromptError(f"prompt token ids must be in [0, {self.vocab_size})")
        needed = len(request.prompt_ids) + request.params.max_tokens
        if needed > self.max_model_len:
            raise PromptTooLongError(
                f"prompt ({len(request.prompt_ids)} tokens) + max_tokens "
                f"({request.params.max_tokens}) = {needed} > max_model_len {self.max_model_len}"
            )
        handle = RequestHandle(request, on_cancel=self._wake)
        with self.busy_changed:
            if self._thread is None or self._stopping:
                raise EngineStoppedError("the inference engine is not running")
            if len(self._waiting) >= self.max_queue:
                # A step can last seconds: requests whose clients left meanwhile go now, not
                # at its end, so they never turn a live request away.
                self._drop_cancelled_waiting()
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"{len(self._waiting)} requests already waiting")
            self._waiting.append(handle)
            self._changed()
        return handle

    def stats(self) -> EngineStats:
        with self.busy_changed:
            now = time.monotonic()
            live = [h for h in self._waiting if not h.cancelled]  # (cancelled: leaving)
            oldest = now - live[0].arrival if live else 0.0
            late_rest = self._late_rest_s
            if self._late_rest_since is not None:
                late_rest += now - self._late_rest_since
            return EngineStats(
                queue_depth=len(live),
                running=self._active,
                oldest_waiting_s=oldest,
                tokens_generated=self._tokens_generated,
                decode_step_s=self._decode_ewma,
                prefill_s_per_token=self._prefill_cost.per_token_s,
                prefill_fixed_s=self._prefill_cost.fixed_s,
                requests_finished=self._finished,
                busy_s=self._busy_s,
                admitted_late=self.admitted_late,
                lent_s=self._lent_s,
                only_late=self._only_late(),
                late_rest_s=late_rest,
            )

    def is_idle(self) -> bool:
        """No request is waiting or running."""
        with self.busy_changed:
            return not self._waiting and self._active == 0

    def wait_for_idle(self, timeout: float | None = None) -> bool:
        with self.busy_changed:
            return self.busy_changed.wait_for(self.is_idle, timeout)

    def wait_for_work(self, timeout: float | None = None) -> bool:
        with self.busy_changed:
            return self.busy_changed.wait_for(lambda: not self.is_idle(), timeout)

    def _wake(self) -> None:
        self.notify_change()

    def _changed(self) -> None:  # busy_changed held
        self._changes += 1
        self.busy_changed.notify_all()

    def notify_change(self) -> None:
        """Wake whoever waits for a change (``wait_for_change``): something they decide on
        changed outside the engine (a trainer's share, its shutdown)."""
        with self.busy_changed:
            self._changed()

    def change_count(self) -> int:
        """How many times the serving state changed so far; read it before looking at the
        state, then ``wait_for_change(count)`` wakes on any change since, even one that came
        before the wait began."""
        with self.busy_changed:
            return self._changes

    def wait_for_change(self, since: int, timeout: float) -> bool:
        """Block until the state changed after ``change_count()`` returned ``since``, at most
        ``timeout`` s (False: no change)."""
        with self.busy_changed:
            return self.busy_changed.wait_for(lambda: self._changes != since, timeout)

    def lend_to_training(self, share: float) -> None:
        """Rest after each step so the co-execution trainer gets ``share`` of the time (0: stop).

        Training steps run only on serving's idle moments (``wait_for_training_turn``), so under
        sustained load a round's plan, the allocation's training share, may not be met. A trainer
        behind that plan asks for its share here: after a step of t seconds the engine waits
        t·s/(1−s) (at most ``MAX_LEND_REST_S``), woken early when the loan ends, and the training
        step runs meanwhile. ``share`` is capped at ``max_lend_share`` (0, the default: nothing is
        lent).
        """
        share = min(max(float(share), 0.0), self.max_lend_share)
        with self.busy_changed:
            if share != self._lent_share:
                self._lent_share = share
                self._changed()

    def want_late_turn(self, wanted: bool) -> None:
        """A co-executed training step runs (True) or ended (False): while every request the
        engine holds is late — every waiting one has waited past its TTFT budget, no running one
        got its first token in time — and none is overdue, the engine rests and the step takes the
        core (``wait_for_training_turn``). Serving such work earns no goodput, so the time costs
        none; a fresh request ends the rest at once, an overdue one at the next re-check. Only
        with the ``"slo"`` schedule (``collm_fl.policies.scheduling.only_late``)."""
        with self.busy_changed:
            if wanted != self._late_turn_wanted:
                self._late_turn_wanted = wanted
                self._changed()

    def wait_for_training_turn(self, timeout: float) -> bool:
        """Block until training may use the core, at most ``timeout`` s (False: still not).

        Training's turn: serving is paused or stopping, idle (nothing queued or running), or
        resting for training (``lend_to_training``, ``want_late_turn``) — never while an engine
        step runs. The co-execution trainer calls this at every LoRA layer of a step.
        """
        with self._step_gate:
            return self._step_gate.wait_for(self._training_turn, timeout)

    def _training_turn(self) -> bool:  # _step_gate held
        if self._in_step:
            return False
        if self._paused or self._stopping or self._resting:
            return True
        return not (self._waiting or self._batch.rows or self._newcomers)

    def _set_gate(self, in_step: bool | None = None, resting: bool | None = None) -> None:
        with self._step_gate:
            if in_step is not None:
                self._in_step = in_step
            if resting is not None:
                self._resting = resting
            self._step_gate.notify_all()

    def _rest_for_training(self, busy_s: float) -> None:
        with self.busy_changed:
            share = self._lent_share
            if share <= 0.0 or self._stopping or busy_s <= 0.0:
                return
            t0 = time.monotonic()
            self._set_gate(resting=True)
            try:
                self.busy_changed.wait_for(
                    lambda: self._stopping or self._lent_share == 0.0,
                    timeout=min(MAX_LEND_REST_S, busy_s * share / (1.0 - share)),
                )
            finally:
                self._set_gate(resting=False)
            self._lent_s += time.monotonic() - t0

    def _only_late(self) -> bool:  # busy_changed held
        if self.schedule != "slo":
            return False
        now = time.monotonic()
        rows = [r.handle for r in self._batch.rows]  # replaced, never mutated
        return only_late(
            [Waiting(now - h.arrival, h.num_prompt_tokens) for h in self._waiting],
            [Running(now - h.arrival, h.ttft if h.ttft is not None else 0.0) for h in rows],
            self.ttft_slo_s,
            self.defer_limit_s,
        )

    def _rest_while_late(self) -> None:
        """Rest while a training step wants late work's turn and all work is late."""
        with self.busy_changed:
            if not self._late_turn_wanted or self._stopping or not self._only_late():
                return
            self._late_rest_since = time.monotonic()
            self._set_gate(resting=True)
            try:
                while self._late_turn_wanted and not self._stopping and self._only_late():
                    self.busy_changed.wait(timeout=LATE_RECHECK_S)
            finally:
                self._set_gate(resting=False)
                self._late_rest_s += time.monotonic() - self._late_rest_since
                self._late_rest_since = None

    # ---- the engine thread ----

    def _loop(self) -> None:
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        while True:
            with self.busy_changed:
                self.busy_changed.wait_for(self._has_work)
                if self._stopping:
                    break
            busy = 0.0
            try:
                with self._step_lock, torch.inference_mode():
                    if not self._paused or self._stopping:
                        t0 = time.monotonic()
                        self._set_gate(in_step=True)
                        try:
                            self._step()
                        finally:
                            self._set_gate(in_step=False)  # a training step may go on if idle
                            busy = time.monotonic() - t0
                            self._busy_s += busy
            except Exception as e:  # the loop must survive anything one step does
                log.exception("engine step failed; failing %d requests", len(self._batch))
                self._fail_rows(self._newcomers + self._batch.rows, f"internal error: {e}")
                self._reset_batch()
            self._rest_for_training(busy)
            self._rest_while_late()
        self._fail_rows(self._batch.rows, "engine stopped")
        self._reset_batch()
        with self.busy_changed:
            waiting, self._waiting = list(self._waiting), deque()
            self._finished += len(waiting)
            self._changed()
        for handle in waiting:
            handle._push(TokenEvent(None, "", FINISH_ERROR), "engine stopped")

    def _has_work(self) -> bool:
        if self._stopping:
            return True
        return not self._paused and bool(self._waiting or self._batch.rows)

    def pause(self) -> None:
        """Stop stepping after the current step (requests stay queued/running, nothing fails).

        Only for baselines that must stop the world (a reload, a merge, training with priority);
        CoLLM-FL itself never pauses serving. Returns once the loop is outside any step.
        """
        with self.busy_changed:
            self._paused = True
            self._changed()
        self._set_gate()
        with self._step_lock:  # the step in progress (if any) has finished
            pass

    def resume(self) -> None:
        with self.busy_changed:
            self._paused = False
            self._changed()

    def _step(self) -> None:
        cancelled = [r for r in self._batch.rows if r.handle.cancelled]
        if cancelled:
            for row in cancelled:
                self._finish_row(row, FINISH_CANCELLED)
            # The same rows as finished (a cancel may land meanwhile: it waits for the next step).
            self._batch.keep([i for i, r in enumerate(self._batch.rows) if r not in cancelled])
        self._newcomers = self._admit()
        if self._newcomers:
            self._prefill(self._newcomers)
            self._newcomers = []
        if self._batch.rows:
            self._decode()

    def _admit(self) -> list[Row]:
        rows: list[Row] = []
        with self.busy_changed:
            # Every step, also when no row is free: a request whose client left stops counting
            # as queued.
            self._drop_cancelled_waiting()
            for handle in self._ordered_for_admission():
                if handle.cancelled:  # (cancelled since) never admitted: nothing to release
                    self._finished += 1
                    handle._push(TokenEvent(None, "", FINISH_CANCELLED))
                    continue
                # The version is fixed here, at admission, for the request's whole life.
                slot, version = self.slots.acquire()
                handle._admit(slot, version)
                self._active += 1
                gen = make_generator(handle.request.params)
                rows.append(Row(handle=handle, slot=slot, generator=gen, generated=[]))
            if rows:  # (a trainer waiting on "TTFT at risk" decides anew: the queue moved)
                self._changed()
        return rows

    def _drop_cancelled_waiting(self) -> None:
        """Finish the waiting requests whose clients left (``busy_changed`` held); never
        admitted, they hold nothing to release."""
        cancelled = [h for h in self._waiting if h.cancelled]
        if not cancelled:
            return
        self._waiting = deque(h for h in self._waiting if not h.cancelled)
        self._finished += len(cancelled)
        for handle in cancelled:
            handle._push(TokenEvent(None, "", FINISH_CANCELLED))
        self._changed()

    def _ordered_for_admission(self) -> Iterator[RequestHandle]:
        """Take the requests to admit now off the queue, in order (``busy_changed`` held)."""
        now = time.monotonic()
        if self.schedule == "fcfs":
            admitted = 0
            while self._waiting and len(self._batch) + admitted < self.max_batch_size:
                handle = self._waiting.popleft()
                admitted += 1
                self.admitted_late += now - handle.arrival >= self.ttft_slo_s
                yield handle
            return
        queue = list(self._waiting)  # oldest first
        picked = admission_order(
            [Waiting(now - h.arrival, h.num_prompt_tokens) for h in queue],
            self.max_batch_size - len(self._batch),
            self._prefill_cost,
            self.ttft_slo_s,
            self.defer_limit_s,
        )
        for i in picked:
            self._waiting.remove(queue[i])
            self.admitted_late += now - queue[i].arrival >= self.ttft_slo_s
            yield queue[i]

    def _prefill(self, rows: list[Row]) -> None:
        started = time.perf_counter()
        lengths = [r.handle.num_prompt_tokens for r in rows]
        width = max(lengths)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # (n, L) left-padded
        mask = torch.zeros(len(rows), width, dtype=torch.long)  # (n, L)
        for i, r in enumerate(rows):
            ids[i, width - lengths[i] :] = torch.tensor(r.handle.request.prompt_ids)
            mask[i, width - lengths[i] :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (n, L) true positions; pads at 0
        cache = DynamicCache(config=self.config)
        try:
            with lora_context(serve([r.slot for r in rows], self.device)):
                out = self.model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=positions,
                    **{self._cache_kwarg: cache},
                    use_cache=True,
                    logits_to_keep=1,
                )
            tokens = sample_next(
                _host_logits(out.logits), [r.params for r in rows], [r.generator for r in rows]
            )  # (n,)
        except Exception as e:  # only the newcomers shared this forward
            log.exception("prefill of %d requests failed", len(rows))
            self._fail_rows(rows, f"prefill failed: {e}")
            return
        self._record("prefill", time.perf_counter() - started, len(rows) * width)
        alive = [i for i, r in enumerate(rows) if not self._emit(r, int(tokens[i]))]
        if not alive:
            return
        cache_layers_select(cache, alive)
        self._batch.add([rows[i] for i in alive], cache, mask[alive])

    def _decode(self) -> None:
        started = time.perf_counter()
        rows = self._batch.rows
        ids = torch.tensor([[r.generated[-1]] for r in rows], device=self.device)  # (B, 1)
        positions = torch.tensor([[r.next_position] for r in rows], device=self.device)  # (B, 1)
        with lora_context(serve([r.slot for r in rows], self.device)):
            out = self.model(
                input_ids=ids,
                attention_mask=self._batch.extend_mask(),  # (B, T+1)
                position_ids=positions,
                **{self._cache_kwarg: self._batch.cache},
                use_cache=True,
            )
        tokens = sample_next(
            _host_logits(out.logits), [r.params for r in rows], [r.generator for r in rows]
        )  # (B,)
        self._record("decode", time.perf_counter() - started, 1)
        done = [self._emit(r, int(tokens[i])) for i, r in enumerate(rows)]
        if any(done):
            self._batch.keep([i for i, d in enumerate(done) if not d])

    def _emit(self, row: Row, token: int) -> bool:
        """Record one token, send its text delta, finish the row if due; True when it finished."""
        try:
            delta, finish = row.append(token, self.tokenizer, self.eos_ids)
            with self.busy_changed:
                self._tokens_generated += 1
            row.handle._push(TokenEvent(token, delta, finish))
        except Exception as e:  # e.g. a detokenizer failure: only this request fails
            log.exception("request %s failed after token %d", row.handle.request_id, token)
            self._finish_row(row, FINISH_ERROR, f"detokenization failed: {e}")
            return True
        if finish is not None:
            self._release(row)
        return finish is not None

    # ---- finishing rows ----

    def _finish_row(self, row: Row, reason: str, error: str | None = None) -> None:
        if not row.handle.finished:
            row.handle._push(TokenEvent(None, "", reason), error)
        self._release(row)

    def _release(self, row: Row) -> None:
        self.slots.release(row.slot)
        with self.busy_changed:
            self._active -= 1
            self._finished += 1
            self._changed()

    def _fail_rows(self, rows: list[Row], error: str) -> None:
        for row in list(rows):
            if not row.handle.finished:
                self._finish_row(row, FINISH_ERROR, error)

    def _reset_batch(self) -> None:
        self._newcomers = []
        self._batch.reset()

    def _record(self, kind: str, seconds: float, tokens: int) -> None:
        with self.busy_changed:
            if kind == "decode":
                self._decode_ewma = _ewma(self._decode_ewma, seconds)
            else:
                self._prefill_fit = self._prefill_fit.add(tokens, seconds)
                self._prefill_cost = self._prefill_fit.cost()


def _host_logits(logits: torch.Tensor) -> torch.Tensor:
    """The last position's logits (b, L, V) -> (b, V) as fp32 on the CPU, where sampling runs
    (each request's generator is a CPU one, so its tokens do not depend on the device)."""
    return logits[:, -1].to("cpu", torch.float32)


def _eos_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif isinstance(gen_eos, list | tuple):
        ids.update(int(i) for i in gen_eos)
    return frozenset(ids)


def _ewma(old: float, new: float) -> float:
    return new if old == 0.0 else (1 - EWMA_ALPHA) * old + EWMA_ALPHA * new
