"""Swap stall: inter-token gaps of running requests while the served adapter keeps changing.

Three ways to change the adapter of a serving model, each serving the same batch of long greedy
requests while a new version arrives every ``interval_s``:

- ``shadow-swap`` (ours): the replica's engine keeps decoding while ``Replica.push_version``
  persists, shadow-loads, canary-checks and promotes the version in another thread.
- ``stop-the-world-reload``: a serving loop over a ``PeftModel`` with no shadow slots pauses
  decoding between two steps, loads the new PEFT directory (``load_adapter``), activates it and
  deletes the old one, then resumes.
- ``merge-unmerge``: the same loop serving a merged adapter pauses, ``unmerge_adapter()``, copies
  the new weights in, ``merge_adapter()``, resumes.

Every token event is timestamped by a reader thread per request (``time.monotonic``); a gap is
"in a swap" when it overlaps a swap's window. Fairness: same model, prompts, batch size and
request length; the decode thread and the swap thread each use 1 torch thread (2 cores).
"""

from __future__ import annotations

import functools
import itertools
import logging
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

import numpy as np
import torch

from collm_fl.adapters import AdapterState, LoraSpec
from collm_fl.bench.replica_decode import (
    GreedyDecoder,
    LatencyStats,
    StepGate,
    adapter_shapes,
    latency_stats,
    prompt_ids,
    random_adapter_state,
    run_in_thread,
)
from collm_fl.models import load_base_model
from collm_fl.replica.requests import GenerationRequest, RequestHandle
from collm_fl.replica.runtime import Replica, ReplicaConfig
from collm_fl.replica.sampling import SamplingParams
from collm_fl.store.adapter_io import read_adapter_dir, write_adapter_dir
from collm_fl.training import set_adapter_state

log = logging.getLogger(__name__)

SHADOW, RELOAD, MERGE = "shadow-swap", "stop-the-world-reload", "merge-unmerge"
SWAP_METHODS = (SHADOW, RELOAD, MERGE)
WARM_TOKENS = 3  # swaps start once every request has streamed this many tokens
MAX_TIMELINE_POINTS = 1500  # per method, kept in the JSON for the plot (bucket maxima)


class SwapTimeline(TypedDict):
    gaps: list[list[float]]  # [seconds since the measured window began, gap ms]
    windows: list[list[float]]  # [start, end] of each swap, seconds since the window began


class SwapMethodResult(TypedDict):
    method: str
    swaps: int
    swap_ms: LatencyStats  # how long each swap operation took (its window)
    decode_step_ms: float  # median inter-token gap outside swaps: the normal decode step
    in_swap: LatencyStats  # inter-token gaps that overlap a swap window
    outside: LatencyStats  # all other gaps of the measured window
    max_gap_over_step: float  # in_swap.max_ms / decode_step_ms (1 = no stall beyond a step)
    timeline: SwapTimeline


class SwapBenchmark(TypedDict):
    requests: int
    max_tokens: int
    interval_s: float
    duration_s: float  # of the swapping phase
    quiet_s: float  # decoding without swaps before it (part of the "outside" gaps)
    decode_threads: int
    swap_threads: int
    methods: list[SwapMethodResult]


@dataclass
class _Run:
    """What one method's run collected."""

    token_times: list[list[float]]
    windows: list[tuple[float, float]] = field(default_factory=list)
    start: float = 0.0
    end: float = 0.0


class _TokenClock:
    """Per-request token timestamps, written by one reader thread per request."""

    def __init__(self, n: int) -> None:
        self.times: list[list[float]] = [[] for _ in range(n)]
        self.warm = threading.Event()  # every request streamed WARM_TOKENS (or finished)
        self.done = threading.Event()  # every request finished
        self._lock = threading.Lock()
        self._warm_rows = 0
        self._done_rows = 0

    def read_handle(self, i: int, handle: RequestHandle) -> None:
        try:
            for event in handle:
                if event.token_id is not None:
                    self._record(i)
        finally:
            self._finish()

    def read_queue(self, i: int, tokens: queue.SimpleQueue[int | None]) -> None:
        try:
            while tokens.get() is not None:
                self._record(i)
        finally:
            self._finish()

    def _record(self, i: int) -> None:
        self.times[i].append(time.monotonic())
        if len(self.times[i]) == WARM_TOKENS:
            with self._lock:
                self._warm_rows += 1
                if self._warm_rows == len(self.times):
                    self.warm.set()

    def _finish(self) -> None:
        with self._lock:
            self._done_rows += 1
            if self._done_rows == len(self.times):
                self.done.set()
                self.warm.set()  # nobody waits for warm-up of requests that are over


@dataclass(frozen=True)
class _Schedule:
    quiet_s: float  # decoding without swaps first: the reference decode steps
    duration_s: float  # then a swap every interval_s for this long
    interval_s: float

    @property
    def swaps(self) -> int:
        return max(1, int(self.duration_s / self.interval_s))


def _swap_loop(clock: _TokenClock, swap: Callable[[int], None], schedule: _Schedule) -> _Run:
    """After warm-up and a quiet phase, call ``swap(k)`` every ``interval_s``; record windows."""
    clock.warm.wait()
    run = _Run(token_times=clock.times, start=time.monotonic())
    for k in range(schedule.swaps):
        due = run.start + schedule.quiet_s + (k + 0.5) * schedule.interval_s
        if clock.done.wait(max(0.0, due - time.monotonic())):  # pacing; stops early when done
            break
        started = time.monotonic()
        swap(k)
        run.windows.append((started, time.monotonic()))
    finish = run.start + schedule.quiet_s + schedule.duration_s
    clock.done.wait(max(0.0, finish - time.monotonic()))  # the rest of the last interval
    run.end = time.monotonic()
    return run


def _start_readers(
    clock: _TokenClock, targets: Sequence[Callable[[], None]]
) -> list[threading.Thread]:
    threads = [
        threading.Thread(target=t, name=f"bench-reader-{i}", daemon=True)
        for i, t in enumerate(targets)
    ]
    for t in threads:
        t.start()
    return threads


def _run_shadow(
    model: str,
    spec: LoraSpec,
    states: list[AdapterState],
    requests: int,
    max_tokens: int,
    schedule: _Schedule,
) -> _Run:
    with tempfile.TemporaryDirectory(prefix="collm-bench-swap-") as tmp:
        cfg = ReplicaConfig(
            model=model, lora=spec, data=None, store_dir=tmp, max_batch_size=requests
        )
        replica = Replica(cfg)
        replica.engine.eos_ids = frozenset()  # fixed-length requests (vLLM benchmarks: ignore_eos)
        replica.start()
        try:
            config = spec.to_peft_config_dict(model)
            replica.push_version(states[0], config, 1)
            prompts = prompt_ids(replica.tokenizer, requests)
            length = min(max_tokens, replica.engine.max_model_len - max(map(len, prompts)))
            warm = replica.engine.submit(
                GenerationRequest(prompts[0], SamplingParams(max_tokens=4, temperature=0), "w")
            )
            warm.wait()
            params = SamplingParams(max_tokens=length, temperature=0)
            handles = [
                replica.engine.submit(GenerationRequest(p, params, f"swap-{i}"))
                for i, p in enumerate(prompts)
            ]
            clock = _TokenClock(len(handles))
            readers = _start_readers(
                clock,
                [functools.partial(clock.read_handle, i, h) for i, h in enumerate(handles)],
            )

            def swap(k: int) -> None:
                replica.push_version(states[(k + 1) % len(states)], config, k + 2)

            run = run_in_thread(lambda: _swap_loop(clock, swap, schedule), 1, "bench-swapper")
            for h in handles:
                h.cancel()
            for t in readers:
                t.join()
            return run
        finally:
            replica.stop()


def _run_peft(
    model: str,
    spec: LoraSpec,
    method: str,
    states: list[AdapterState],
    requests: int,
    max_tokens: int,
    schedule: _Schedule,
) -> _Run:
    from peft import PeftModel

    with tempfile.TemporaryDirectory(prefix="collm-bench-peft-") as tmp:
        config = spec.to_peft_config_dict(model)
        dirs = [Path(tmp) / f"v{k + 1:04d}" for k in range(len(states))]
        for d, state in zip(dirs, states, strict=True):  # versions arrive as PEFT directories
            write_adapter_dir(d, state, config)
        loaded = load_base_model(model)
        peft_model = PeftModel.from_pretrained(loaded.model, str(dirs[0]), adapter_name="v1")
        if method == MERGE:
            peft_model.merge_adapter()
        prompts = prompt_ids(loaded.tokenizer, requests)
        context = int(loaded.model.config.max_position_embeddings)
        length = min(max_tokens, context - max(map(len, prompts)))
        pad = loaded.tokenizer.pad_token_id or 0
        decoder = GreedyDecoder(peft_model.get_base_model(), prompts, int(pad))
        gate = StepGate()
        outs: list[queue.SimpleQueue[int | None]] = [queue.SimpleQueue() for _ in prompts]
        clock = _TokenClock(len(prompts))
        stop = threading.Event()
        errors: list[BaseException] = []
        active = ["v1"]

        def emit(tokens: torch.Tensor) -> None:
            for q, tok in zip(outs, tokens.tolist(), strict=True):
                q.put(int(tok))

        def decode_loop() -> None:
            torch.set_num_threads(1)
            try:
                with torch.inference_mode():
                    with gate.step():
                        emit(decoder.prefill())
                    for _ in range(length - 1):
                        if stop.is_set():
                            break
                        with gate.step():
                            tokens = decoder.step()
                        emit(tokens)
            except BaseException as e:  # re-raised by the caller after the run
                errors.append(e)
            finally:
                for q in outs:
                    q.put(None)

        def swap(k: int) -> None:
            index = (k + 1) % len(states)
            if method == RELOAD:
                name = f"v{k + 2}"
                with gate.hold():  # stop the world: nothing decodes until the new one is active
                    peft_model.load_adapter(str(dirs[index]), adapter_name=name)
                    peft_model.set_adapter(name)
                    peft_model.delete_adapter(active[0])
                active[0] = name
            else:
                state, _ = read_adapter_dir(dirs[index])  # read off the pause, like a good stack
                with gate.hold():
                    peft_model.unmerge_adapter()
                    set_adapter_state(peft_model, state, adapter_name="v1")
                    peft_model.merge_adapter()

        decoding = threading.Thread(target=decode_loop, name="bench-decode", daemon=True)
        readers = _start_readers(
            clock, [functools.partial(clock.read_queue, i, q) for i, q in enumerate(outs)]
        )
        decoding.start()
        run = run_in_thread(lambda: _swap_loop(clock, swap, schedule), 1, "bench-swapper")
        stop.set()
        decoding.join()
        for t in readers:
            t.join()
        if errors:
            raise errors[0]
        return run


def _downsample_max(points: list[tuple[float, float]], limit: int) -> list[list[float]]:
    """At most ``limit`` points, keeping the largest gap of each time bucket (spikes survive)."""
    points.sort()
    if len(points) <= limit:
        return [[round(t, 4), round(g, 3)] for t, g in points]
    out = []
    for chunk in np.array_split(np.asarray(points), limit):
        t, g = chunk[int(np.argmax(chunk[:, 1]))]
        out.append([round(float(t), 4), round(float(g), 3)])
    return out


def summarize_run(method: str, run: _Run) -> SwapMethodResult:
    """Split the gaps of the measured window by whether they overlap a swap, and summarize."""
    inside: list[float] = []
    outside: list[float] = []
    points: list[tuple[float, float]] = []
    for times in run.token_times:
        for a, b in itertools.pairwise(times):
            if a < run.start or b > run.end:
                continue
            gap = b - a
            hit = any(a < e and b > s for s, e in run.windows)
            (inside if hit else outside).append(gap)
            points.append((b - run.start, 1e3 * gap))
    out_stats = latency_stats(outside)
    in_stats = latency_stats(inside)
    step = out_stats["p50_ms"]
    return SwapMethodResult(
        method=method,
        swaps=len(run.windows),
        swap_ms=latency_stats([e - s for s, e in run.windows]),
        decode_step_ms=step,
        in_swap=in_stats,
        outside=out_stats,
        max_gap_over_step=in_stats["max_ms"] / step if step > 0 else 0.0,
        timeline=SwapTimeline(
            gaps=_downsample_max(points, MAX_TIMELINE_POINTS),
            windows=[[round(s - run.start, 4), round(e - run.start, 4)] for s, e in run.windows],
        ),
    )


def measure_swap_stall(
    model: str = "smollm2-135m",
    requests: int = 8,
    max_tokens: int = 1024,
    duration_s: float = 8.0,
    interval_s: float = 0.5,
    quiet_s: float = 2.0,
    spec: LoraSpec | None = None,
    methods: Sequence[str] = SWAP_METHODS,
    progress: Callable[[str], None] | None = None,
) -> SwapBenchmark:
    """Inter-token gaps during and outside adapter swaps, for each way of swapping.

    Per method: warm-up (every request streamed a few tokens), ``quiet_s`` of decoding without
    swaps, then a new version every ``interval_s`` for ``duration_s``.
    """
    if requests < 1 or duration_s <= 0 or interval_s <= 0 or quiet_s < 0:
        raise ValueError(f"requests {requests}, duration {duration_s}, interval {interval_s}")
    schedule = _Schedule(quiet_s, duration_s, interval_s)
    unknown = sorted(set(methods) - set(SWAP_METHODS))
    if unknown:
        raise ValueError(f"unknown swap methods {unknown}; choose from {list(SWAP_METHODS)}")
    say = progress or (lambda line: log.info("%s", line))
    spec = spec or LoraSpec()
    shapes = adapter_shapes(model, spec)
    states = [random_adapter_state(shapes, seed) for seed in range(schedule.swaps + 1)]
    results: list[SwapMethodResult] = []
    for method in methods:
        say(f"swap: {method} ({requests} requests, a version every {interval_s:g}s)")
        if method == SHADOW:
            run = _run_shadow(model, spec, states, requests, max_tokens, schedule)
        else:
            run = _run_peft(model, spec, method, states, requests, max_tokens, schedule)
        results.append(summarize_run(method, run))
        r = results[-1]
        say(
            f"swap: {method}: {r['swaps']} swaps, step {r['decode_step_ms']:.1f} ms, max gap in "
            f"swaps {r['in_swap']['max_ms']:.1f} ms, outside {r['outside']['max_ms']:.1f} ms"
        )
    return SwapBenchmark(
        requests=requests,
        max_tokens=max_tokens,
        interval_s=interval_s,
        duration_s=duration_s,
        quiet_s=quiet_s,
        decode_threads=1,
        swap_threads=1,
        methods=results,
    )
