"""Workload generation: open-loop load on an OpenAI-compatible endpoint, and its serving metrics.

``arrivals`` (synthetic arrival processes) and ``trace`` (Azure-format traces) say *when* requests
go out and how long they are; ``client`` builds and replays them; ``goodput`` turns the per-request
results into goodput, SLO attainment and latency percentiles. ``run_load_cli`` strings them
together for the command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path

from collm_fl.api.urls import normalize_url
from collm_fl.errors import ConfigError
from collm_fl.loadgen.arrivals import ARRIVAL_KINDS, MAX_ARRIVALS, arrival_times
from collm_fl.loadgen.client import (
    STOPPED_DUE,
    FillerPrompts,
    ReplayProgress,
    RequestResult,
    RequestSpec,
    TokenizerPrompts,
    build_requests,
    read_results_jsonl,
    replay,
    write_results_jsonl,
)
from collm_fl.loadgen.goodput import (
    LoadSummary,
    SLOSpec,
    meets_slo,
    served_quality_at,
    slo_from_unloaded,
    summarize_results,
    time_to_quality,
)
from collm_fl.loadgen.trace import (
    Trace,
    TraceRow,
    load_azure_trace,
    mean_rate,
    scale_trace,
    trace_duration,
    write_sample_trace,
)
from collm_fl.logs import silence_lost_terminal
from collm_fl.reports import write_text_atomic

__all__ = [
    "ARRIVAL_KINDS",
    "FillerPrompts",
    "LoadSummary",
    "ReplayProgress",
    "RequestResult",
    "RequestSpec",
    "SLOSpec",
    "TokenizerPrompts",
    "Trace",
    "TraceRow",
    "arrival_times",
    "build_requests",
    "format_summary",
    "load_azure_trace",
    "meets_slo",
    "read_results_jsonl",
    "replay",
    "run_load_cli",
    "scale_trace",
    "served_quality_at",
    "slo_from_unloaded",
    "summarize_results",
    "time_to_quality",
    "write_results_jsonl",
    "write_sample_trace",
]

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 10.0


def run_load_cli(
    target: str,
    model: str,
    kind: str,
    rate: float,
    duration_s: float,
    trace: str | None,
    out: Path,
    ttft_slo: float,
    tpot_slo: float,
    prompt_tokens: int,
    output_tokens: int,
    api_key: str | None,
    seed: int,
    chat: bool,
    *,
    timeout_s: float = 120.0,
    max_in_flight: int = 256,
    ignore_eos: bool = False,
    tokenizer: str | None = None,
) -> int:
    """Replay a schedule against ``target`` and write ``requests.jsonl`` and ``summary.json``.

    The schedule is ``kind`` arrivals at ``rate`` for ``duration_s`` with fixed lengths, or, given a
    ``trace``, its requests rescaled to ``rate`` (``rate`` 0 keeps the recorded timing) and cut
    to ``duration_s`` (rates are then per the time it ran, if shorter), with
    ``prompt_tokens``/``output_tokens`` as the length caps. Prompt lengths are words, or with
    ``tokenizer`` (a model as ``collm replica --model`` takes it) that model's tokens. Returns 0,
    or 1 when no request succeeded; bad arguments raise ConfigError / DataFormatError.
    """
    for flag, value in (("--ttft-slo", ttft_slo), ("--tpot-slo", tpot_slo)):
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{flag} must be a finite number > 0, got {value}")
    if seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {seed}")
    # None is "not given"; an empty name is a mistake (an unset shell variable), not a request
    # for the default: it would silently replay Poisson arrivals, or count words, instead.
    for flag, name, what, absent in (
        ("--trace", trace, "a trace CSV", "to replay --arrivals"),
        ("--tokenizer", tokenizer, "a model", "to count prompt lengths in words"),
    ):
        if name is not None and not name.strip():
            raise ConfigError(
                f"{flag} must name {what}, got an empty value {name!r} (leave it out {absent})"
            )
    slo = SLOSpec(ttft_s=ttft_slo, tpot_s=tpot_slo)
    target = normalize_url(target, "target")  # ".../v1", as OpenAI clients take it, is fine
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {out} exists and is not a directory")
    for flag, value in (("--prompt-tokens", prompt_tokens), ("--output-tokens", output_tokens)):
        if value < 1:
            what = "the length of every request"
            if trace is not None:
                what = "the length cap with --trace"
            raise ConfigError(f"{flag} must be >= 1 ({what}), got {value}")
    # Prompts of this run's own (a prefix cache holds none of them from an earlier run), made once
    # the schedule has been checked (a tokenizer may need fetching).
    prompt_tag = secrets.token_hex(2)

    def prompts() -> Callable[[int], str]:
        if tokenizer is None:
            return FillerPrompts(tag=prompt_tag)  # (lengths in words)
        from collm_fl.models import load_tokenizer

        return TokenizerPrompts(load_tokenizer(tokenizer), tag=prompt_tag)

    if trace is not None:
        if not (math.isfinite(duration_s) and duration_s > 0):
            raise ConfigError(f"--duration must be a finite number > 0, got {duration_s}")
        if not (math.isfinite(rate) and rate >= 0):
            raise ConfigError(
                f"--rate must be a finite number >= 0 (0: the trace's own timing), got {rate}"
            )
        rows = load_azure_trace(trace)
        if rate > 0 and mean_rate(rows) <= 0:
            raise ConfigError(
                f"--rate {rate:g}: {trace} spans no time (one request, or all at one instant), "
                "so it has no rate to rescale; --rate 0 replays it as recorded"
            )
        whole = scale_trace(rows, rate if rate > 0 else None, None, prompt_tokens, output_tokens)
        # Rates are per the time the replay stands for: --duration, or less when the (scaled)
        # trace ends before it; judged on the whole trace, not on what the cut left (a lull just
        # before the cut would read as the trace's end).
        measured_s = trace_duration(whole, duration_s)
        schedule: Sequence[TraceRow] | list[float] = whole.before(duration_s)
    else:
        if kind not in ARRIVAL_KINDS:
            raise ConfigError(
                f"--arrivals: unknown arrival process {kind!r}; expected one of "
                f"{', '.join(ARRIVAL_KINDS)} (or --trace)"
            )
        # Checked here, under the flags' names (arrival_times names its own parameters).
        if not (math.isfinite(rate) and rate > 0):
            raise ConfigError(f"--rate must be a finite number > 0, got {rate}")
        if not (math.isfinite(duration_s) and duration_s > 0):
            raise ConfigError(f"--duration must be a finite number > 0, got {duration_s}")
        if rate * duration_s > MAX_ARRIVALS:
            raise ConfigError(
                f"--rate × --duration = {rate * duration_s:.0f} requests exceeds {MAX_ARRIVALS} "
                "(lower the rate or the duration)"
            )
        schedule = [float(t) for t in arrival_times(kind, rate, duration_s, seed)]
        measured_s = duration_s
    if not schedule:
        what = (
            f"{trace} before --duration {duration_s:g}"
            if trace is not None
            else (f"--arrivals {kind} at --rate {rate:g} for --duration {duration_s:g}")
        )
        raise ConfigError(f"no request to send: {what} schedules none (raise the rate or duration)")
    specs = build_requests(schedule, prompt_tokens, output_tokens, prompts(), chat=chat)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"out: cannot create {out}: {e}") from e
    log.info("replaying %d requests over %.1fs against %s", len(specs), measured_s, target)
    stopped_at: list[float] = []  # seconds into the schedule when Ctrl-C / SIGTERM came

    async def run() -> list[RequestResult]:
        loop = asyncio.get_running_loop()
        stop, abandon = asyncio.Event(), asyncio.Event()
        # The loop time the schedule's offsets count from, as the replay publishes it: a clock
        # of our own, started before the replay sorts the requests and builds its clients, would
        # count that setup into the time the run is measured over.
        schedule_start: list[float] = []

        def on_signal(sig: signal.Signals) -> None:
            if sig == hangup:  # (the terminal is gone: what follows is written nowhere)
                silence_lost_terminal()
            if stop.is_set():  # a second one: give up on those in flight, keep what was measured
                abandon.set()
                log.warning(
                    "%s: abandoning the requests in flight; writing what was measured", sig.name
                )
                return
            # (before the replay started: nothing of the schedule ran)
            since = loop.time() - schedule_start[0] if schedule_start else 0.0
            stopped_at.append(max(0.0, since))
            stop.set()
            log.warning(
                "%s: sending no more requests; waiting for those in flight (at most %.0fs; "
                "again to abandon them)",
                sig.name,
                timeout_s,
            )

        for sig in signals:
            loop.add_signal_handler(sig, on_signal, sig)
        try:
            return await replay(
                target,
                model,
                specs,
                api_key=api_key,
                timeout_s=timeout_s,
                max_in_flight=max_in_flight,
                progress=_progress_printer(slo),
                progress_every_s=PROGRESS_EVERY_S,
                stop=stop,
                abandon=abandon,
                ignore_eos=ignore_eos,
                on_start=schedule_start.append,
            )
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)

    # A hang-up (the terminal or SSH session gone) ends the run as SIGTERM does, what was
    # measured written, unless it is ignored (nohup).
    signals = [signal.SIGINT, signal.SIGTERM]
    hangup = getattr(signal, "SIGHUP", None)
    if hangup is not None and signal.getsignal(hangup) is not signal.SIG_IGN:
        signals.append(hangup)
    # asyncio puts back Python's defaults, not the handlers the process had (the CLI's SIGTERM
    # one, which exits cleanly): those are restored once the replay is over.
    previous = {sig: signal.getsignal(sig) for sig in signals}
    try:
        results = asyncio.run(run())
    finally:
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)
    if stopped_at:  # what ran is measured over the time it ran
        measured_s = max(min(measured_s, stopped_at[0]), 1e-3)
        # Requests the replay saw due only after the signal (its loop was busy) are not misses
        # of the time measured: those due before it, never sent, are.
        results = [
            r
            for r in results
            if not (r.error == STOPPED_DUE and r.sent_at is not None and r.sent_at >= stopped_at[0])
        ]
    summary = summarize_results(results, slo, measured_s)
    config = {
        "interrupted_at_s": stopped_at[0] if stopped_at else None,
        "target": target,
        "model": model,
        "schedule": "trace" if trace is not None else kind,
        "trace": trace,
        "rate": rate,
        "duration_s": duration_s,
        "seed": seed,
        "chat": chat,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "ttft_slo_s": ttft_slo,
        "tpot_slo_s": tpot_slo,
        "timeout_s": timeout_s,
        "max_in_flight": max_in_flight,
        "ignore_eos": ignore_eos,
        "tokenizer": tokenizer,
        "prompt_tag": prompt_tag,
    }
    summary_json = json.dumps({"config": config, **asdict(summary)}, indent=2)
    # The two files are one run's: a signal while they are written (seconds for a long run's
    # requests) waits until both are, so no new requests.jsonl sits beside an old summary.json.
    with _signals_held(signals):
        write_results_jsonl(results, out / "requests.jsonl")
        write_text_atomic(out / "summary.json", summary_json + "\n")
    print(format_summary(summary, slo))
    print(f"wrote {out / 'requests.jsonl'} and {out / 'summary.json'}")
    if stopped_at:
        print(
            f"interrupted after {stopped_at[0]:.1f}s: {len(results)} of {len(specs)} requests "
            "sent; the figures above are over that time",
            file=sys.stderr,
        )
        return 130
    if summary.ok == 0:
        first = next((f"{r.status}: {r.error}" for r in results if r.error), "none given")
        log.error("no request succeeded (%s); the first error: %s", summary.errors, first)
        return 1
    return 0


@contextlib.contextmanager
def _signals_held(signals: list[signal.Signals]) -> Iterator[None]:
    """Hold ``signals`` back for the block (from the main thread, which alone may set handlers):
    one that comes meanwhile is raised again, to the handler as it was, once the block is done.
    (Blocking them with a signal mask would not do: the kernel gives a signal sent to the
    process to any thread not blocking it, and Python then runs its handler in the main thread
    all the same.)"""
    came: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda signum, _frame: came.append(signum)) for sig in signals
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        if came:
            signal.raise_signal(came[0])


def _progress_printer(slo: SLOSpec) -> Callable[[ReplayProgress], None]:
    # Counted as requests finish (each once): recounting every finished request at each tick
    # would take the replay's event loop longer and longer as a run grows, delaying sends and
    # the timing of the chunks it reads.
    seen, errors, met = 0, 0, 0

    def show(p: ReplayProgress) -> None:
        nonlocal seen, errors, met
        new = p.completed[seen:]
        seen = len(p.completed)
        errors += sum(r.status != "ok" for r in new)
        met += sum(meets_slo(r, slo) for r in new)
        print(
            f"[{p.elapsed_s:6.0f}s] sent {p.sent}  done {len(p.completed)}  errors {errors}  "
            f"dropped {p.dropped}  in flight {p.in_flight}  "
            f"goodput {met / max(p.elapsed_s, 1e-9):.2f} req/s",
            file=sys.stderr,
            flush=True,
        )

    return show


def _over_run(summary: LoadSummary) -> str:
    """The throughput until the last answer, where that came after the schedule ended."""
    last = summary.last_done_s
    if last is None or last <= summary.duration_s + 0.5:
        return ""
    return (
        f" per second of schedule; {summary.throughput_over_run_rps:.3f} req/s over the "
        f"{last:.0f}s until the last request ended"
    )


def format_summary(summary: LoadSummary, slo: SLOSpec) -> str:
    """A short, human-readable table of a run's summary."""

    def ms(value: float | None) -> str:
        return f"{value * 1000:9.1f}" if value is not None else f"{'-':>9}"

    errors = ", ".join(f"{k} {v}" for k, v in summary.errors.items()) or "none"
    versions = ", ".join(f"{k}: {v}" for k, v in summary.adapter_versions.items()) or "-"
    ttft = f"{ms(summary.ttft_p50_s)} {ms(summary.ttft_p90_s)} {ms(summary.ttft_p99_s)}"
    tpot = f"{ms(summary.tpot_p50_s)} {ms(summary.tpot_p90_s)} {ms(summary.tpot_p99_s)}"
    e2e = f"{ms(summary.e2e_p50_s)} {ms(summary.e2e_p90_s)} {ms(summary.e2e_p99_s)}"
    lines = [
        f"requests         {summary.requests} in {summary.duration_s:.0f}s "
        f"(ok {summary.ok}; failed: {errors})",
        f"SLO              TTFT <= {slo.ttft_s * 1000:.0f} ms, TPOT <= {slo.tpot_s * 1000:.0f} ms",
        f"SLO attainment   {summary.slo_attainment:.1%}",
        f"goodput          {summary.goodput_rps:.3f} req/s",
        f"throughput       {summary.throughput_rps:.3f} req/s, "
        f"{summary.output_tokens_per_s:.1f} output tokens/s{_over_run(summary)}",
        f"{'latency (ms)':<16} {'p50':>9} {'p90':>9} {'p99':>9}",
        f"{'  TTFT':<16} {ttft}",
        f"{'  TPOT':<16} {tpot}",
        f"{'  E2E':<16} {e2e}",
        f"adapter versions {versions}",
    ]
    return "\n".join(lines)
