"""The main job, co-executing: federated rounds on replicas that serve a live workload meanwhile.

Starts a local site on Flower's deployment engine (SuperLink, replicas beside SuperNodes), a
gateway in front of the replicas, and an open-loop load generator against the gateway; runs the
federation with ``flwr run``; prints one progress line per round (served version and its held-out
loss, goodput and SLO attainment since the previous round, each replica's training share);
writes a report (markdown, PNG plots, JSON); and stops everything it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import math
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import httpx

from collm_fl.config import RunConfig, Scalar, parse_overrides
from collm_fl.errors import CollmError, ConfigError, StoreError, WorkFailed
from collm_fl.federate import (
    check_node_counts,
    failed_if_interrupted,
    launch_config,
    mark_failed,
    mark_interrupted,
    run_outcome,
)
from collm_fl.launch import LocalFederation, dies_with_parent, executable, replica_flags
from collm_fl.loadgen.arrivals import ARRIVAL_KINDS, arrival_times
from collm_fl.loadgen.client import (
    ReplayProgress,
    RequestResult,
    RequestSpec,
    build_requests,
    replay,
)
from collm_fl.loadgen.goodput import SLOSpec, summarize_results
from collm_fl.logs import silence_lost_terminal
from collm_fl.policies.routing import check_shed_factor
from collm_fl.reports import save_figure, write_text_atomic
from collm_fl.store import VersionStore

log = logging.getLogger(__name__)

ROUND_LINE = re.compile(
    r"round (\d+) \| clients ok (\d+) rejected (\d+) failed (\d+) .*version v(\d+)"
)
PUBLISHED_LINE = re.compile(r"published v(\d+) to (\d+)/(\d+) nodes")
MAX_SCHEDULE_S = 4 * 3600.0  # the load runs until the federation ends (bounded by this)
# ... and by this many requests, all built up front (a prompt each): at 14 req/s and above the
# schedule is shorter than 4 h, and a federation that outlives it runs without load from then on.
MAX_LIVE_REQUESTS = 200_000
DIURNAL_PERIOD_S = 600.0  # --arrivals diurnal: one "day" every 10 minutes
LOAD_TIMEOUT_S = 120.0  # a request not done by then is a timeout (and the load's stop waits that)


@dataclass(frozen=True)
class LiveConfig:
    model: str = "smollm2-135m"
    replicas: int = 2
    devices: int = 0
    rounds: int = 3
    local_steps: int | None = None  # None: the app's (or -c local-steps=...)
    rate: float = 0.5  # requests/s offered to the gateway
    arrivals: str = "bursty"
    prompt_tokens: int = 48
    output_tokens: int = 24
    ttft_slo_s: float = 5.0
    tpot_slo_s: float = 0.5
    out: Path = Path("outputs/live")
    run_config: str = ""  # extra flwr run-config overrides
    seed: int = 0
    max_lend_share: float = 0.0  # the replicas' --max-lend-share
    lend_early: bool = False  # ... and --lend-early
    shed_factor: float = 0.0  # the gateway's --shed-factor (0: off)

    def __post_init__(self) -> None:
        """Checked before anything starts, each problem named by its ``collm live`` flag."""
        problems = []
        if self.arrivals not in ARRIVAL_KINDS:
            problems.append(
                f"--arrivals must be one of {', '.join(ARRIVAL_KINDS)}, got {self.arrivals!r}"
            )
        if self.replicas < 1 or self.devices < 0:
            problems.append(
                f"--replicas must be >= 1 and --devices >= 0, got {self.replicas}, {self.devices}"
            )
        for flag, value in (
            ("--rate", self.rate),
            ("--ttft-slo", self.ttft_slo_s),
            ("--tpot-slo", self.tpot_slo_s),
        ):
            if not (math.isfinite(value) and value > 0):
                problems.append(f"{flag} must be a finite number > 0, got {value}")
        for flag, count in (
            ("--prompt-tokens", self.prompt_tokens),
            ("--output-tokens", self.output_tokens),
            ("--rounds", self.rounds),
            ("--local-steps", 1 if self.local_steps is None else self.local_steps),
        ):
            if count < 1:
                problems.append(f"{flag} must be >= 1, got {count}")
        if self.seed < 0:
            problems.append(f"--seed must be >= 0, got {self.seed}")
        try:
            check_shed_factor(self.shed_factor)
        except ConfigError as e:
            problems.append(str(e))
        if problems:
            raise ConfigError("; ".join(problems))


@dataclass
class RoundRow:
    round: int
    at_s: float
    version: int
    eval_loss: float | None
    clients_ok: int
    clients_failed: int
    requests: int  # sent in the round and finished (by its line; in the report, by the end)
    goodput_rps: float
    slo_attainment: float  # (meaningless when ``requests`` is 0: None in report.json)
    shares: dict[str, float] = field(default_factory=dict)
    # the round's aggregate's loss when it was not promoted (the quality gate kept the previous)
    candidate_loss: float | None = None
    clients_rejected: int = 0  # replies refused by the strategy (bad update, over a bound ...)
    # why ``version`` may not be what every replica serves ("" when it was published to all)
    version_note: str = ""
    # requests the load's schedule had due in the round, finished or not: a round whose
    # requests were all still in flight (when the run was stopped) is not one without arrivals
    sent: int = 0


class _Load:
    """The open-loop workload in a thread; ``snapshot()`` gives the requests finished so far,
    ``stop()`` ends it (requests in flight finish) and returns every request sent or dropped."""

    def __init__(
        self, url: str, cfg: LiveConfig, requests: list[RequestSpec], api_key: str | None = None
    ) -> None:
        self.requests, self.api_key = requests, api_key
        self.ends_at_s = max((r.offset_s for r in requests), default=0.0)  # the last one due
        self.url, self.model = url, cfg.model
        self._completed: tuple[RequestResult, ...] = ()
        self._results: list[RequestResult] = []
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name="collm-live-load", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def snapshot(self) -> tuple[RequestResult, ...]:
        return self._completed

    def due_between(self, since: float, until: float) -> int:
        """How many requests the schedule sends in ``[since, until)`` (seconds after its start)."""
        return sum(1 for r in self.requests if since <= r.offset_s < until)

    def _progress(self, p: ReplayProgress) -> None:
        self._completed = p.completed

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        coro = replay(
            self.url,
            self.model,
            self.requests,
            api_key=self.api_key,
            timeout_s=LOAD_TIMEOUT_S,
            progress=self._progress,
            progress_every_s=1.0,
            stop=self._stop,
        )
        try:
            self._results = self._loop.run_until_complete(coro)
        finally:
            self._loop.close()

    def stop(self, wait: bool = True) -> list[RequestResult]:
        """No more requests; with ``wait``, those in flight finish first (else: the finished)."""
        if self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nothing to stop
                self._loop.call_soon_threadsafe(self._stop.set)
        if wait:
            self._thread.join(timeout=LOAD_TIMEOUT_S + 30)
        return self._results or list(self._completed)


class _Watch:
    """What the monitor saw go wrong. A process of the stack the run cannot finish without
    (``LocalFederation.broken``: the SuperLink, the gateway, SuperNodes below the run's
    ``min-train-nodes``) stops ``flwr run`` (:meth:`died`): Flower would wait for the lost nodes
    for ever, and a dead gateway would be reported as the system's serving. A replica that exits
    is noted (:attr:`lost`): its node fails its rounds, the gateway routes around it."""

    def __init__(self, min_nodes: int = 1) -> None:
        self.min_nodes = min_nodes
        self.failure: str | None = None
        self.lost: list[str] = []  # processes gone that the run went on without
        self._flwr: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()

    def driving(self, proc: subprocess.Popen[str]) -> None:
        with self._lock:
            self._flwr = proc
            if self.failure is not None:
                proc.kill()

    def died(self, failure: str) -> None:
        with self._lock:
            if self.failure is not None:
                return
            self.failure = failure
            if self._flwr is not None and self._flwr.poll() is None:
                self._flwr.kill()
        _say(f"stopping: {failure}")


def _say(line: str) -> None:
    """Progress for the person watching. Best effort: a reader gone (``collm live | tee log``
    and a Ctrl-C, which ends ``tee`` too) must not turn the run's unwinding and its report into
    a broken-pipe traceback; the output goes nowhere from then on."""
    try:
        print(line, flush=True)
    except OSError:  # (BrokenPipeError, EIO of a terminal gone)
        silence_lost_terminal()


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """Hold ``out`` for one run: a second ``collm live`` on it would move the first's stores
    aside and share its run database."""
    with (out / ".collm-live.lock").open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise ConfigError(f"--out {out}: another collm live is running there") from e
        yield


def live_replica_args(cfg: LiveConfig) -> tuple[str, ...]:
    """The ``collm replica`` flags the main job's replicas start with."""
    return (
        "--ttft-slo",
        str(cfg.ttft_slo_s),
        "--tpot-slo",
        str(cfg.tpot_slo_s),
        "--max-lend-share",
        str(cfg.max_lend_share),
        *(("--lend-early",) if cfg.lend_early else ()),
    )


def live_schedule(cfg: LiveConfig) -> list[RequestSpec]:
    """The main job's requests: they run until the federation ends, bounded in time
    (``MAX_SCHEDULE_S``) and in count (``MAX_LIVE_REQUESTS``, all built up front)."""
    schedule_s = min(MAX_SCHEDULE_S, MAX_LIVE_REQUESTS / cfg.rate)
    # A diurnal cycle as long as the schedule (4 h) would show a run of minutes only its rise.
    shape = {"period_s": DIURNAL_PERIOD_S} if cfg.arrivals == "diurnal" else {}
    offsets = arrival_times(cfg.arrivals, cfg.rate, schedule_s, cfg.seed, **shape)
    if len(offsets) == 0:  # (the report would measure a load that never came)
        raise ConfigError(
            f"--rate {cfg.rate:g} req/s sends no request in the load's {schedule_s / 3600:g}-h "
            f"schedule (--arrivals {cfg.arrivals}, --seed {cfg.seed}): raise --rate"
        )
    # (a bursty schedule may hold more than rate × duration)
    return build_requests(offsets[:MAX_LIVE_REQUESTS], cfg.prompt_tokens, cfg.output_tokens)


def run_live(cfg: LiveConfig, app: Path) -> int:
    """Run the co-executing main job; returns flwr's exit code."""
    slo = SLOSpec(cfg.ttft_slo_s, cfg.tpot_slo_s)
    # The schedule first: a bad arrival process, or a rate that sends nothing, fails before
    # anything starts.
    requests = live_schedule(cfg)
    out = cfg.out.resolve()
    # Checked before anything starts; the replicas train as it says (data, LoRA shape, ...).
    fixed: dict[str, Scalar] = {
        "model": cfg.model,  # the replicas are started on --model
        "num-server-rounds": cfg.rounds,
        "output-dir": str(out / "federation"),  # the report reads the run from here
        "run-name": "live",
        "store-url": "",  # the sqlite store in output-dir: the report and reruns read it there
        "ttft-slo-s": cfg.ttft_slo_s,
        "tpot-slo-s": cfg.tpot_slo_s,
    }
    said = parse_overrides(cfg.run_config).get("local-steps")
    if cfg.local_steps is not None and said != cfg.local_steps:  # -c may repeat it, not contradict
        fixed["local-steps"] = cfg.local_steps
    defaults = {"min-train-nodes": cfg.replicas + cfg.devices}
    run_config, run_cfg = launch_config(app, cfg.run_config, defaults, fixed)
    check_node_counts(run_cfg, cfg.replicas + cfg.devices, "--replicas + --devices is")
    from collm_fl.models import check_load_target  # (torch: only once the input is read)

    # (the replicas would each refuse a device or quantization this machine lacks: after the
    # earlier run was moved aside and the stack started)
    check_load_target(run_cfg.quantization, run_cfg.device)
    replica_args = (*replica_flags(run_cfg), *live_replica_args(cfg))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {cfg.out}: cannot create it: {e.strerror or e}") from e
    executable("flwr")  # (ConfigError if missing: before any model loads)
    with _exclusive(out):
        return _run_live(cfg, app, out, slo, requests, run_config, run_cfg, replica_args)


def _run_live(
    cfg: LiveConfig,
    app: Path,
    out: Path,
    slo: SLOSpec,
    requests: list[RequestSpec],
    run_config: str,
    run_cfg: RunConfig,
    replica_args: tuple[str, ...],
) -> int:
    kept = keep_earlier_run(out)
    if kept is not None:
        _say(f"an earlier run's federation and replica stores are kept in {kept}")
    rows: list[RoundRow] = []
    timeline: list[tuple[float, str, int | None, float]] = []  # (t, replica, version, share)
    results: list[RequestResult] = []
    interrupted, code, stopping = False, 1, False
    started = ended = math.nan  # (the load's start and end: set once it ran)
    watch = _Watch(run_cfg.min_train_nodes)
    load: _Load | None = None
    crashed: Exception | None = None  # what ended the job's driving of flwr run, if not flwr
    launched = datetime.now(UTC)
    try:
        with (
            failed_if_interrupted(run_cfg),
            LocalFederation(
                out / "site",
                cfg.replicas,
                cfg.devices,
                model=cfg.model,
                replica_args=replica_args,
                api_key=os.environ.get("COLLM_API_KEY") or None,  # (the stack takes it from there)
            ) as fed,
        ):
            url, _ = fed.start_gateway(
                ttft_slo_s=cfg.ttft_slo_s, tpot_slo_s=cfg.tpot_slo_s, shed_factor=cfg.shed_factor
            )
            _say(
                f"gateway {url}/v1 in front of {len(fed.replicas)} replicas; "
                f"load: {_load_name(cfg)}"
            )
            load = _Load(url, cfg, requests, fed.api_key)
            started, launched = time.monotonic(), datetime.now(UTC)
            stop_monitor = threading.Event()
            monitor = threading.Thread(
                target=_monitor, args=(fed, started, timeline, stop_monitor, watch), daemon=True
            )
            monitor.start()
            load.start()
            try:
                code = _drive_flwr(
                    fed, app, run_config, out, started, load, slo, rows, timeline, watch
                )
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM: report what ran, then stop everything
                interrupted, code = True, 130
                _say("interrupted: writing the report of the rounds so far ...")
            except Exception as e:  # (its log not writable, ...): a failed run, with a report
                if not isinstance(e, CollmError):
                    log.exception("driving flwr run failed")
                crashed = e
                watch.died(f"driving flwr run failed: {type(e).__name__}: {e}")
            finally:
                ended = time.monotonic()  # the schedule's end: what follows is shutting down
                stop_monitor.set()
                # Requests in flight finish against the running replicas (not when interrupted
                # or when the stack broke: the requests finished so far are reported).
                try:
                    results = load.stop(wait=not interrupted and watch.failure is None)
                except KeyboardInterrupt:  # a second signal while they finish: stop waiting
                    interrupted = True
                    results = load.stop(wait=False)
                monitor.join(timeout=10)
    except KeyboardInterrupt:
        # A signal while the stack stopped (up to tens of seconds: streams finishing, processes
        # given their time), or one before the load's end was taken: the processes were stopped
        # all the same, and the rounds so far are still reported.
        if math.isnan(started):
            raise  # (nothing ran yet: nothing to report)
        stopping = not math.isnan(ended)  # (the rounds were over: it came while stopping)
        interrupted = True
        if not stopping:
            ended = time.monotonic()
        if not results and load is not None:
            results = load.stop(wait=False)
    if watch.failure is not None:  # (marked once: a run still shown running)
        mark_failed(run_cfg, watch.failure)
    elif interrupted:  # (the interrupt stopped here never reached the wrapper's check)
        mark_interrupted(run_cfg)
    # Rates are per second of schedule: a federation outliving its load (MAX_SCHEDULE_S,
    # MAX_LIVE_REQUESTS) is not counted as serving nothing after it.
    load_end = load.ends_at_s if load is not None else math.inf
    rows = recount_rounds(rows, results, slo, load_end)
    note = (
        f"Stopped: {watch.failure}. The report covers the rounds so far."
        if watch.failure is not None
        else "Interrupted: the report covers the rounds so far."
        if interrupted and not (stopping and code == 0)
        else ""
    )
    if stopping:  # (what ran before it is reported as it ended)
        note = f"{note} A signal came while the stack stopped: its processes were killed.".strip()
    lost = [g for g in watch.lost if watch.failure is None or g not in watch.failure]
    if lost:
        note = " ".join([note, *(f"{g}; the run went on without it." for g in lost)]).strip()
    if 0 < load_end < ended - started:
        note = " ".join(
            [
                note,
                f"The load's schedule ended at {load_end:.0f} s, before the federation: "
                "goodput is per second of it.",
            ]
        ).strip()
    duration = _per_second_of(0.0, ended - started, load_end)
    report = _report(cfg, out, rows, list(timeline), results, slo, duration, note)
    _say(f"report: {report}")
    if watch.failure is not None:  # (the cause, whatever signal came after it)
        if isinstance(crashed, CollmError):
            raise crashed  # (with its own exit code)
        raise WorkFailed(watch.failure) from crashed
    if interrupted:
        raise KeyboardInterrupt  # (the CLI's exit code for it, once everything is stopped)
    return run_outcome(run_cfg, code, launched, log_hint=f"see {out / 'flwr-run.log'}")


def _drive_flwr(
    fed: LocalFederation,
    app: Path,
    run_config: str,
    out: Path,
    started: float,
    load: _Load,
    slo: SLOSpec,
    rows: list[RoundRow],
    timeline: list[tuple[float, str, int | None, float]],
    watch: _Watch | None = None,
) -> int:
    cmd = fed.flwr_run_command(run_config, app)
    env = fed.env()
    if env is not None:  # its round lines are read as they come: not held in a pipe's buffer
        env["PYTHONUNBUFFERED"] = "1"
    popen = subprocess.Popen(
        cmd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",  # (a ClientApp's stray bytes must not end the job)
        preexec_fn=dies_with_parent(),  # a SIGKILLed job must not leave its run driving on
        start_new_session=True,  # a Ctrl-C reaches the job, which stops it (LocalFederation.spawn)
    )
    if watch is not None:
        watch.driving(popen)
    with _killed_on_exit(popen) as proc, (out / "flwr-run.log").open("w") as logf:
        last_t = 0.0
        published: dict[int, tuple[int, int]] = {}  # version -> (nodes that took it, nodes)
        assert proc.stdout is not None
        for line in proc.stdout:
            logf.write(line)
            logf.flush()  # the log is for someone watching the run
            if p := PUBLISHED_LINE.search(line):
                published[int(p[1])] = (int(p[2]), int(p[3]))
                continue
            m = ROUND_LINE.search(line)
            if not m:
                continue
            now = time.monotonic() - started
            done = [r for r in load.snapshot() if r.sent_at is not None and r.sent_at >= last_t]
            summary = summarize_results(done, slo, _per_second_of(last_t, now, load.ends_at_s))
            rnd, ok, rejected, failed, version = (int(m[i]) for i in range(1, 6))
            loss = _float_after(line, "central eval loss ")
            kept = "kept previous" in line  # the loss is the unpromoted aggregate's, if any
            served_loss = next((r.eval_loss for r in reversed(rows) if r.version == version), None)
            shares = round_shares(timeline, last_t, now)
            rows.append(
                RoundRow(
                    rnd,
                    now,
                    version,
                    served_loss if kept else loss,
                    ok,
                    failed,
                    summary.requests,
                    summary.goodput_rps,
                    summary.slo_attainment,
                    shares,
                    candidate_loss=loss if kept else None,
                    clients_rejected=rejected,
                    version_note=_version_note(version, kept, published),
                    sent=load.due_between(last_t, now),
                )
            )
            share_text = " ".join(f"{k} {v:.2f}" for k, v in sorted(shares.items())) or "-"
            if kept:
                candidate = "none" if loss is None else f"{loss:.3f}"
                loss_text = f"kept; the round's aggregate: {candidate}"
            else:
                loss_text = "-" if loss is None else f"{loss:.3f}"
            served = _load_text(
                summary.requests,
                summary.goodput_rps,
                summary.slo_attainment,
                schedule_over=last_t >= load.ends_at_s,
                sent=rows[-1].sent,
            )
            label = f"served v{version}" if not rows[-1].version_note else f"v{version}"
            note = f", {rows[-1].version_note}" if rows[-1].version_note else ""
            _say(
                f"round {rnd} | {label} (central loss {loss_text}{note}) | {served} | "
                f"training share {share_text} | {now:.0f}s"
            )
            last_t = now
        return proc.wait()


def _version_note(version: int, kept: bool, published: dict[int, tuple[int, int]]) -> str:
    """Why the round's ``version`` may not be what the replicas serve ("" when it is): the server
    publishes each new version right after the round (``publish-versions``); a node that missed
    it takes it with its next train message."""
    if version in published:
        took, nodes = published[version]
        return "" if took >= nodes else f"published to {took} of {nodes} nodes"
    if kept:
        return ""  # (the version served before the round)
    return "not published: the nodes take it with the next round's training"


@contextlib.contextmanager
def _killed_on_exit(proc: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    """``proc`` for the block; still running after it (an error, Ctrl-C), it is killed: the run
    must not outlive the job that started it."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


EARLIER_RUN_DIRS = ("federation", "site")  # the server's store; the replicas' stores and logs
# ... and what a run writes beside them, which must not be read as the next run's
EARLIER_RUN_FILES = (
    *("report.md", "report.json", "live.png", "flwr-run.log"),
    *("quality.md", "quality.json", "quality.png"),  # (scripts/quickstart.sh writes them after)
)


def keep_earlier_run(out: Path) -> Path | None:
    """Move an earlier run's stores and report out of the way; where they went (None: there was
    none).

    Each run is a new federation: a server store left in place would be resumed (and a finished
    run trains nothing), and replicas would recover the old run's last version and refuse the
    new run's first as older. Its report goes with them: left beside a new run that is then
    interrupted, it would read as that run's.
    """
    names = (*EARLIER_RUN_DIRS, *EARLIER_RUN_FILES)
    earlier = [out / name for name in names if (out / name).exists()]
    if not earlier:
        return None
    aside = out / "previous" / datetime.now().strftime("%Y%m%dT%H%M%S.%f")
    aside.mkdir(parents=True)
    for path in earlier:
        path.rename(aside / path.name)
    return aside


def recount_rounds(
    rows: list[RoundRow],
    results: Sequence[RequestResult],
    slo: SLOSpec,
    load_end_s: float = math.inf,
) -> list[RoundRow]:
    """Each round's serving figures again, from every request's final outcome: the progress line
    counted the requests finished by the round's end, so one still in flight then (often a
    slow one, an SLO miss) was in no round. A request belongs to the round it was sent in; the
    rates are per second of the round within the load's schedule (``load_end_s``)."""
    recounted, since = [], 0.0
    for row in rows:
        sent = [r for r in results if r.sent_at is not None and since <= r.sent_at < row.at_s]
        s = summarize_results(sent, slo, _per_second_of(since, row.at_s, load_end_s))
        recounted.append(
            replace(
                row,
                requests=s.requests,
                goodput_rps=s.goodput_rps,
                slo_attainment=s.slo_attainment,
            )
        )
        since = row.at_s
    return recounted


def _per_second_of(since: float, until: float, load_end_s: float) -> float:
    """The seconds a round's rates are per: the round within the load's schedule; a round after
    the schedule's end (its last requests sent a little late) is per its own length."""
    within = min(until, load_end_s) - since
    return max(within if within > 0 else until - since, 1e-9)


def _load_name(cfg: LiveConfig) -> str:
    if cfg.arrivals == "diurnal":
        return f"diurnal at {cfg.rate} req/s on average (a {DIURNAL_PERIOD_S:.0f}-s cycle)"
    return f"{cfg.arrivals} at {cfg.rate} req/s"


def _load_text(
    requests: int,
    goodput_rps: float,
    slo_attainment: float,
    schedule_over: bool = False,
    sent: int = 0,
) -> str:
    """A round's serving figures; a round in which no request finished says why (none arrived:
    bursty loads have gaps longer than a round, the schedule may have ended; or those ``sent``
    are still in flight) instead of reading as 0 % SLO attainment."""
    if requests == 0:
        if sent > 0:
            return f"{sent} sent, none finished yet"
        if schedule_over:
            return "no requests: the load schedule ended before this round"
        return "no requests arrived since the previous round"
    return (
        f"{requests} requests, goodput {goodput_rps:.2f} req/s, "
        f"SLO attainment {100 * slo_attainment:.0f}%"
    )


def _float_after(line: str, marker: str) -> float | None:
    i = line.find(marker)
    if i < 0:
        return None
    token = line[i + len(marker) :].split()[0]
    try:
        return float(token)
    except ValueError:
        return None


def round_shares(
    timeline: Sequence[tuple[float, str, int | None, float]], since: float, until: float
) -> dict[str, float]:
    """Each replica's mean training share over the samples in ``[since, until)`` (a replica with
    no sample there, e.g. its /health too slow while it trained, is left out): the share its
    training held in the round, not what the next round's allocation may already have set."""
    samples: dict[str, list[float]] = {}
    for t, name, _, share in list(timeline):
        if since <= t < until:
            samples.setdefault(name, []).append(share)
    return {name: sum(v) / len(v) for name, v in samples.items()}


def _monitor(
    fed: LocalFederation,
    started: float,
    timeline: list[tuple[float, str, int | None, float]],
    stop: threading.Event,
    watch: _Watch | None = None,
) -> None:
    """Once a second: every process of the stack still running (else ``watch.died``), and each
    replica's served version and training share (the allocation's share while it trains, 0
    while it does not)."""
    with httpx.Client(timeout=2.0) as client:
        while not stop.wait(1.0):
            if watch is not None and not stop.is_set():
                before = len(watch.lost)
                fatal = fed.check(watch.min_nodes, watch.lost)
                if fatal is not None:
                    watch.died(fatal)
                    return
                for gone in watch.lost[before:]:
                    _say(f"warning: {gone}; the run goes on without it")
            for node in fed.replicas:
                try:
                    h = client.get(node.api_url + "/health").json()
                except (httpx.HTTPError, ValueError):
                    continue
                # the allocation's share while its round's job runs
                share = float(h.get("training_share", 0.0)) if h.get("training") else 0.0
                timeline.append(
                    (
                        time.monotonic() - started,
                        f"replica{node.index}",
                        h.get("adapter_version"),
                        share,
                    )
                )


def _report(
    cfg: LiveConfig,
    out: Path,
    rows: list[RoundRow],
    timeline: list[tuple[float, str, int | None, float]],
    results: list[RequestResult],
    slo: SLOSpec,
    duration_s: float,
    note: str = "",
) -> Path:
    losses: dict[int, float] = {}
    store_root = out / "federation"
    if (store_root / "store.db").exists():
        with VersionStore(store_root) as store:
            try:
                run = store.find_run("live")
            except StoreError:  # (interrupted before the ServerApp created its run)
                run = None
            if run is not None:
                losses = {
                    v.number: v.eval_loss
                    for v in store.list_versions(run.id)
                    if v.eval_loss is not None
                }
    summary = summarize_results(results, slo, duration_s)
    data = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "slo": asdict(slo),
        "rounds": [_undefined_attainment_none(asdict(r)) for r in rows],
        "summary": _undefined_attainment_none(asdict(summary)),
        "loss_by_version": losses,
        "timeline": timeline,
        "note": note,
    }
    write_text_atomic(out / "report.json", json.dumps(data, indent=2, default=str))
    lines = [
        "# CoLLM-FL live run",
        "",
        f"{cfg.replicas} replicas of `{cfg.model}` behind the gateway, load {_load_name(cfg)} "
        f"({cfg.prompt_tokens}-token prompts, {cfg.output_tokens} output tokens), "
        f"SLO TTFT {cfg.ttft_slo_s}s / TPOT {cfg.tpot_slo_s}s, {cfg.rounds} rounds"
        + (
            f"; the gateway refuses (503) a request predicted to miss {cfg.shed_factor:g} × "
            "the TTFT SLO on every replica (`--shed-factor`), counted as a miss."
            if cfg.shed_factor
            else "."
        ),
        "",
        *((f"**{note}**", "") if note else ()),
        "| round | at (s) | served version | its central loss | clients ok/rejected/failed "
        "| requests "
        "| goodput (req/s) | SLO attainment | training share |",
        "|---:|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for r in rows:
        served_loss = losses.get(r.version, r.eval_loss)  # the store's, when it has the run
        loss = "-" if served_loss is None else f"{served_loss:.4f}"
        if r.candidate_loss is not None:
            loss += f" (round's aggregate {r.candidate_loss:.4f}, not promoted)"
        shares = ", ".join(f"{k} {v:.2f}" for k, v in sorted(r.shares.items()))
        served = (
            "- | -" if r.requests == 0 else f"{r.goodput_rps:.3f} | {100 * r.slo_attainment:.0f}%"
        )
        requests = f"0 ({r.sent} sent, none finished)" if r.requests == 0 and r.sent else r.requests
        version = f"v{r.version}" + (f" ({r.version_note})" if r.version_note else "")
        lines.append(
            f"| {r.round} | {r.at_s:.0f} | {version} | {loss} | "
            f"{r.clients_ok}/{r.clients_rejected}/{r.clients_failed} | {requests} | {served} "
            f"| {shares} |"
        )
    if any(r.requests == 0 and not r.sent for r in rows):
        lines += [
            "",
            f"A round with 0 requests had no arrivals: {cfg.arrivals} load has gaps longer than a "
            f"round, or the load schedule ({MAX_LIVE_REQUESTS} requests at most, 4 h) had ended; "
            "its goodput and SLO attainment are undefined (-).",
        ]
    if any(r.requests == 0 and r.sent for r in rows):
        lines += [
            "",
            "A round with requests sent but none finished: the run was stopped while they were "
            "in flight; its goodput and SLO attainment are undefined (-).",
        ]
    attainment = "-" if summary.requests == 0 else f"{100 * summary.slo_attainment:.0f}%"
    lines += [
        "",
        f"Whole run: {summary.requests} requests, goodput {summary.goodput_rps:.3f} req/s, "
        f"SLO attainment {attainment}, errors {summary.errors}.",
        "",
        "Each replica's served version's loss, the goodput and the training shares over the run:",
        "",
        "![the run over time](live.png)",
        "",
    ]
    md = out / "report.md"
    write_text_atomic(md, "\n".join(lines))
    _plot(out, timeline, losses, results, slo)
    return md


def _undefined_attainment_none(figures: dict[str, object]) -> dict[str, object]:
    """``figures`` (a round's, the whole run's) with the SLO attainment of no requests, 0/0,
    as None (JSON null) rather than a 0.0 that reads as every request missing its SLO."""
    if figures["requests"] == 0:
        return {**figures, "slo_attainment": None}
    return figures


def _plot(
    out: Path,
    timeline: list[tuple[float, str, int | None, float]],
    losses: dict[int, float],
    results: list[RequestResult],
    slo: SLOSpec,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from collm_fl.loadgen.goodput import meets_slo

    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    for name in sorted({n for _, n, _, _ in timeline}):
        pts = [(t, v, s) for t, n, v, s in timeline if n == name]
        ax1.step(
            [t for t, _, _ in pts],
            [losses.get(v, float("nan")) if v is not None else float("nan") for _, v, _ in pts],
            where="post",
            label=name,
        )
        ax3.plot([t for t, _, _ in pts], [s for _, _, s in pts], label=name)
    ax1.set_ylabel("served held-out loss")
    if timeline:
        ax1.legend()
    window = 10.0
    sent = [(r.sent_at, meets_slo(r, slo)) for r in results if r.sent_at is not None]
    end = max((t for t, _ in sent), default=0.0)
    edges = [i * window for i in range(int(end // window) + 1)]
    good = [sum(1 for t, ok in sent if ok and e <= t < e + window) / window for e in edges]
    ax2.plot(edges, good)
    ax2.set_ylabel(f"goodput (req/s, {window:.0f}s bins)")
    ax3.set_ylabel("training share (while training)")
    ax3.set_xlabel("seconds since start")
    fig.tight_layout()
    save_figure(fig, out / "live.png", dpi=110)
    plt.close(fig)
