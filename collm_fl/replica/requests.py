"""Requests and their handles: what callers of the engine submit and read back.

A ``RequestHandle`` is the caller's side of one request: its events (readable from any thread or
from an asyncio loop), its pinned adapter slot and version, its timing, and ``cancel()``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

from collm_fl.errors import CollmError, WorkFailed
from collm_fl.replica.sampling import SamplingParams

log = logging.getLogger(__name__)

FINISH_STOP = "stop"  # eos token or a stop string
FINISH_LENGTH = "length"  # max_tokens reached
FINISH_CANCELLED = "cancelled"  # RequestHandle.cancel() (client went away)
FINISH_ERROR = "error"  # a forward failed or the engine stopped; RequestHandle.error says why


class QueueFullError(CollmError):
    """The engine's bounded waiting queue is full (HTTP 429/503)."""


class InvalidPromptError(CollmError):
    """The prompt is empty or holds token ids outside the vocabulary (HTTP 400)."""


class PromptTooLongError(InvalidPromptError):
    """prompt tokens + max_tokens exceed the model's context length (HTTP 400)."""


class EngineStoppedError(WorkFailed):
    """A request was submitted to an engine that is not running."""


@dataclass(frozen=True)
class GenerationRequest:
    """One completion request, already tokenized."""

    prompt_ids: list[int]
    params: SamplingParams
    request_id: str


@dataclass(frozen=True)
class TokenEvent:
    """One step of a request's output; the last one has a ``finish_reason``."""

    token_id: int | None  # None on a final event that carries no token (cancelled, error)
    text_delta: str  # new text (UTF-8 complete; stop strings never included)
    finish_reason: str | None  # None while running, else one of the FINISH_* reasons


class RequestHandle:
    """The caller's side of a submitted request: its events, its timing, and cancel().

    Events can be read from any thread (``for ev in handle``) or from an asyncio loop
    (``async for ev in handle.aiter()``), by several readers, each seeing every event.
    """

    def __init__(self, request: GenerationRequest, on_cancel: Callable[[], None] | None = None):
        self.request = request
        self.request_id = request.request_id
        self.num_prompt_tokens = len(request.prompt_ids)
        self.arrival = time.monotonic()  # all timestamps are time.monotonic() seconds
        self.admitted_at: float | None = None
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.slot: int | None = None  # serving slot pinned at admission (-1: base model)
        self.version: int | None = None  # adapter version pinned at admission (None: base)
        self.num_generated = 0
        self.token_ids: list[int] = []
        self.text = ""  # everything emitted so far
        self.finish_reason: str | None = None
        self.error: str | None = None
        self._on_cancel = on_cancel
        self._cancelled = False
        self._cond = threading.Condition()
        self._events: list[TokenEvent] = []
        self._subscribers: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[TokenEvent]]] = []

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def ttft(self) -> float | None:
        """Time to first token (s), from submission."""
        return None if self.first_token_at is None else self.first_token_at - self.arrival

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (s)."""
        if self.finished_at is None or self.first_token_at is None or self.num_generated < 2:
            return None
        return (self.finished_at - self.first_token_at) / (self.num_generated - 1)

    def cancel(self) -> None:
        """Stop generating (the client went away): the row is dropped at the next engine step."""
        self._cancelled = True
        if self._on_cancel is not None:
            self._on_cancel()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the request finished; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self.finished, timeout)

    def events(self, timeout: float | None = None) -> Iterator[TokenEvent]:
        """Every event in order; raises TimeoutError if one takes longer than ``timeout``."""
        i = 0
        while True:
            event = self._event_at(i, timeout)
            i += 1
            yield event
            if event.finish_reason is not None:
                return

    def _event_at(self, i: int, timeout: float | None) -> TokenEvent:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._events) > i, timeout):
                raise TimeoutError(f"request {self.request_id}: no event in {timeout}s")
            return self._events[i]

    def __iter__(self) -> Iterator[TokenEvent]:
        return self.events()

    async def aiter(self) -> AsyncIterator[TokenEvent]:
        """Every event in order, for an asyncio consumer (the engine thread never blocks on it)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        with self._cond:  # replay and subscribe atomically: no event is lost or doubled
            past = list(self._events)
            self._subscribers.append((loop, queue))
        try:
            for event in past:
                yield event
                if event.finish_reason is not None:
                    return
            while True:
                event = await queue.get()
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            with self._cond:
                self._subscribers.remove((loop, queue))

    def _admit(self, slot: int, version: int | None) -> None:
        self.slot, self.version, self.admitted_at = slot, version, time.monotonic()

    def _push(self, event: TokenEvent, error: str | None = None) -> None:
        """Engine thread only: record one event and hand it to every reader."""
        now = time.monotonic()
        with self._cond:
            if event.token_id is not None:
                self.token_ids.append(event.token_id)
                self.num_generated += 1
                if self.first_token_at is None:
                    self.first_token_at = now
            self.text += event.text_delta
            if event.finish_reason is not None:
                self.finished_at, self.finish_reason, self.error = now, event.finish_reason, error
            self._events.append(event)
            subscribers = list(self._subscribers)
            self._cond.notify_all()
        for loop, queue in subscribers:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # that reader's loop is closed: it is gone
                log.debug("request %s: dropped an event for a closed loop", self.request_id)
