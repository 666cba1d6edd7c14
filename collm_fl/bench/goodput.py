"""``collm bench goodput``: goodput and served quality of ways to train and serve together.

The headline benchmark. The same R replica processes (fresh ones per system × rate, so every run
starts from the same state: same weights, data order and empty queues), the same private data, the
same arrival schedule and the same total training budget per round, for seven systems
(:mod:`.goodput_systems`): four baselines (a static train/serve split, co-located with exclusive
training, merged-adapter serving, rolling drain-and-train: one replica at a time out of rotation)
and CoLLM-FL three times, as it ships (serving first: training takes the cycles serving leaves),
with first-come-first-served admission (an ablation), and set to quality first (every replica
plans the whole budget and serving lends a plan that falls behind its time). ``--systems`` picks
others, e.g. CoLLM-FL set
to fresh versions (serving lends 0.9 of its time from each round's start until the plan is done).
The federation is emulated by :mod:`.goodput_rounds`.

Setup comes from a short calibration on one replica (:func:`.goodput_systems.calibrate`): its
unloaded TTFT and TPOT (sequential requests) set the SLOs as ``slo_factor`` × unloaded
(``slo_from_unloaded``); its saturated throughput (a burst of requests at once) sets the default
rates (fractions of R × that, light to overload); its idle training step time sets the per-round
budget (``TRAIN_FRACTION`` of the machine's compute per round). Reports: :mod:`.goodput_report`.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from collm_fl.adapters import MAX_SERVER_LR
from collm_fl.bench.aggregation import code_version, machine_info, matmul_gflops
from collm_fl.bench.goodput_report import QUALITY_TOLERANCE, write_goodput_report
from collm_fl.bench.goodput_result import (
    HALF_WAY,
    Calibration,
    GoodputResult,
    MachineRecord,
    RateOutcome,
    RunOutcome,
    SystemInfo,
    is_collm_system,
)
from collm_fl.bench.goodput_rounds import RunSettings, StartVersion, core_sharing
from collm_fl.bench.goodput_systems import (
    SYSTEM_SPECS,
    SYSTEMS,
    SystemRun,
    calibrate,
    run_system,
)
from collm_fl.central_eval import CentralEvaluator
from collm_fl.config import RunConfig
from collm_fl.errors import ConfigError
from collm_fl.loadgen.arrivals import ARRIVAL_KINDS, MAX_ARRIVALS, arrival_times
from collm_fl.loadgen.client import RequestSpec, build_requests
from collm_fl.loadgen.goodput import (
    LoadSummary,
    SLOSpec,
    served_quality_at,
    slo_from_unloaded,
    summarize_results,
    time_to_quality,
)
from collm_fl.loadgen.trace import TraceRow, load_azure_trace, scale_trace
from collm_fl.policies.routing import check_shed_factor
from collm_fl.replica.affinity import available_cpus
from collm_fl.training import get_adapter_state

log = logging.getLogger(__name__)

RATE_FRACTIONS = (0.1, 0.25, 0.5)  # default rates: × R × one replica's saturated throughput
QUICK_RATE_FRACTION = 0.4
TRAIN_FRACTION = 0.3  # training budget per round: this share of the machine's compute
DEADLINE_FRACTION = 0.7  # training deadline within a round (the rest: aggregate, eval, push)
WARMUP_FRACTION = 0.2  # serving v0 before round 1, × the round length
PROMPT_TOKENS, OUTPUT_TOKENS = 48, 24
EVAL_SAMPLES = 8  # central held-out samples (each round's evaluation runs beside the load)


def run_goodput_benchmark(
    model: str = "smollm2-135m",
    replicas: int = 2,
    rates: Sequence[float] | None = None,
    rounds: int = 3,
    duration_per_round_s: float = 60.0,
    out_dir: str | Path = "docs/bench",
    quick: bool = False,
    progress: Callable[[str], None] | None = None,
    *,
    arrivals: str = "bursty",
    trace: str | None = None,
    slo_factor: float = 5.0,
    seed: int = 0,
    server_lr: float = 1.0,
    shed_factor: float = 0.0,
    systems: Sequence[str] | None = None,
    command: str | None = None,
) -> dict[str, object]:
    """Run every system at every rate and write ``goodput.{md,json}`` + two PNGs to ``out_dir``.

    ``systems``: which of ``SYSTEM_SPECS`` to run, in this order (None: ``SYSTEMS``); at least
    one baseline and one CoLLM-FL system, as the report compares them.

    ``rates`` are requests/s (None: calibrated, see ``RATE_FRACTIONS``); ``trace`` replays an
    Azure-format trace rescaled to each rate instead of ``arrivals``. ``quick`` is the smoke run
    the tests use: model ``tiny``, 2 replicas, 1 rate, 1 round of 6 s (whatever was passed).
    Returns the report's JSON content.
    """
    say = progress or (lambda line: log.info("%s", line))
    if quick:
        model, replicas, rounds = "tiny", 2, 1
        duration_per_round_s = min(duration_per_round_s, 6.0)
        rates = list(rates[:1]) if rates else None
    _check_args(replicas, rates, rounds, duration_per_round_s, slo_factor, server_lr)
    systems = check_systems(SYSTEMS if systems is None else systems)
    check_shed_factor(shed_factor)
    if trace is None and arrivals not in ARRIVAL_KINDS:
        raise ConfigError(f"arrivals: expected one of {ARRIVAL_KINDS}, got {arrivals!r}")
    trace_rows = load_azure_trace(trace) if trace else None  # a bad trace fails before any run
    if rates:  # (as the runs will build them: settings.schedule_s, the seed of each rate)
        schedule_s = (WARMUP_FRACTION + rounds) * duration_per_round_s
        if trace_rows is not None:
            check_trace_span(trace_rows, rates, schedule_s)
        check_rate_schedules(rates, schedule_s, arrivals, trace_rows, seed)
    started = time.monotonic()
    run_id = uuid.uuid4().hex  # names its request records too (goodput_report.has_request_records)
    load_start = list(os.getloadavg())
    gflops_start = matmul_gflops()
    code = code_version()  # (what its processes load; the tree may change during a long run)
    cfg = RunConfig(model=model, seed=seed, central_eval_samples=4 if quick else EVAL_SAMPLES)
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # version 0 (the fresh LoRA init) is the same for every system
        evaluator = CentralEvaluator(cfg)
    start_state = get_adapter_state(evaluator.model)
    start = StartVersion(start_state, evaluator.evaluate(start_state).loss)  # once for all runs
    with tempfile.TemporaryDirectory(prefix="collm-goodput-") as tmp:
        work = Path(tmp)
        say(f"calibrating one replica of {model} ...")
        cal = calibrate(
            model,
            replicas,
            start_state,
            cfg,
            work / "calibration",
            quick,
            seed,
            PROMPT_TOKENS,
            OUTPUT_TOKENS,
        )
        slo = slo_from_unloaded(cal.ttft_unloaded_s, cal.tpot_unloaded_s, slo_factor)
        say(
            f"calibration: unloaded TTFT {1e3 * cal.ttft_unloaded_s:.0f} ms, TPOT "
            f"{1e3 * cal.tpot_unloaded_s:.1f} ms -> SLO {1e3 * slo.ttft_s:.0f} / "
            f"{1e3 * slo.tpot_s:.0f} ms ({slo_factor:g}x); saturated {cal.capacity_rps:.2f} req/s "
            f"per replica; training step {cal.train_step_s:.3f} s"
        )
        fractions = (QUICK_RATE_FRACTION,) if quick else RATE_FRACTIONS
        chosen = list(rates) if rates else [f * replicas * cal.capacity_rps for f in fractions]
        settings = _settings(model, replicas, rounds, duration_per_round_s, slo, cal, cfg, seed)
        settings = replace(settings, server_lr=server_lr, shed_factor=shed_factor)
        if trace_rows is not None and not rates:  # (calibrated rates are known only now)
            check_trace_span(trace_rows, chosen, settings.schedule_s)
        say(
            f"{len(chosen)} rate(s) {', '.join(f'{r:.2f}' for r in chosen)} req/s x "
            f"{len(systems)} systems, {rounds} round(s) of {duration_per_round_s:g}s; budget "
            f"{settings.steps_per_replica} steps/replica/round (x{replicas}); about "
            f"{estimate_seconds(settings, cal, len(chosen), len(systems)) / 60:.0f} min"
        )

        def finish(
            runs: list[SystemRun], chosen: list[float], stopped: str | None
        ) -> dict[str, object]:
            runs.sort(key=lambda run: (chosen.index(run.rate), systems.index(run.system)))
            outcomes, by_rate = summarize_runs(runs, chosen, slo, settings.schedule_s)
            result = GoodputResult(
                command=command or f"collm bench goodput (run_goodput_benchmark, quick={quick})",
                model=model,
                replicas=replicas,
                rounds=rounds,
                round_s=duration_per_round_s,
                quick=quick,
                arrivals=f"trace {trace} rescaled" if trace else arrivals,
                slo_factor=slo_factor,
                seed=seed,
                eval_samples=cfg.central_eval_samples,
                eval_rows=int(evaluator.blocks.input_ids.shape[0]),
                rate_fractions=None if rates else list(fractions),
                calibration=cal,
                slo=slo,
                settings=settings,
                rates=chosen,
                systems=[_system_info(name) for name in systems],
                runs=outcomes,
                by_rate=by_rate,
                machine=MachineRecord(
                    machine_info(gflops_start, matmul_gflops(), code),
                    load_start,
                    list(os.getloadavg()),
                ),
                seconds=time.monotonic() - started,
                run_orders=[run_order(systems, seed + k) for k in range(len(chosen))],
                stopped=stopped,
                run_id=run_id,
            )
            records = {(run.system, chosen.index(run.rate)): run.results for run in runs}
            for path in write_goodput_report(result, Path(out_dir), records):
                say(f"wrote {path}")
            return result.to_json()

        runs: list[SystemRun] = []
        where = "setting up"
        try:
            for k, rate in enumerate(chosen):
                # Each rate its own arrival seed (not one pattern stretched to three rates), and the
                # systems in a rotated order (none always first, or last, on a shared machine;
                # from the seed's place, so that runs of one rate on other seeds rotate too).
                specs = _schedule(
                    rate, settings.schedule_s, arrivals, trace_rows, settings.seed + k
                )
                for system in run_order(systems, settings.seed + k):
                    where = f"{rate:.2f} req/s, {system}"
                    say(f"[rate {k + 1}/{len(chosen)}: {rate:.2f} req/s] {system}: starting")
                    run = run_system(
                        system,
                        rate,
                        specs,
                        settings,
                        evaluator,
                        start,
                        work / f"{system}-{k}",
                        say,
                    )
                    runs.append(run)
                    s = summarize_results(run.results, slo, settings.schedule_s)
                    say(
                        f"  {system}: goodput {s.goodput_rps:.3f} req/s, SLO attainment "
                        f"{100 * s.slo_attainment:.0f}% ({s.requests} requests)"
                    )
        except (Exception, KeyboardInterrupt) as e:
            # What finished is kept: the rates every system completed are reported (their
            # numbers stand on their own), marked as a run that stopped, and the error goes on.
            done = [r for r in chosen if sum(run.rate == r for run in runs) == len(systems)]
            if not done:
                raise
            stopped = f"stopped at {where}: {type(e).__name__}" + (f": {e}" if str(e) else "")
            say(f"{stopped}; reporting the {len(done)} rate(s) every system finished")
            finish([run for run in runs if run.rate in done], done, stopped)
            raise
    return finish(runs, chosen, None)


def _system_info(name: str) -> SystemInfo:
    spec = SYSTEM_SPECS[name]
    training = "exclusive" if spec.exclusive else "co-executed"
    if spec.budget == "split":
        training = "dedicated replicas"
    return SystemInfo(spec.name, spec.title, spec.swap_mode, training, spec.summary)


def _check_args(
    replicas: int,
    rates: Sequence[float] | None,
    rounds: int,
    round_s: float,
    slo_factor: float,
    server_lr: float = 1.0,
) -> None:
    if replicas < 2:
        raise ConfigError(
            f"replicas: need at least 2 (the separate system splits them), got {replicas}"
        )
    if rates is not None and (not rates or any(not (math.isfinite(r) and r > 0) for r in rates)):
        raise ConfigError(f"rates: need finite request rates > 0, got {list(rates)}")
    if rounds < 1:
        raise ConfigError(f"rounds: must be >= 1, got {rounds}")
    if not (math.isfinite(round_s) and round_s >= 2):
        raise ConfigError(f"duration_per_round_s: must be >= 2 seconds, got {round_s}")
    if not (math.isfinite(slo_factor) and slo_factor >= 1):
        raise ConfigError(f"slo_factor: must be >= 1, got {slo_factor}")
    if not (math.isfinite(server_lr) and 0 < server_lr <= MAX_SERVER_LR):
        raise ConfigError(f"server_lr: must be in (0, {MAX_SERVER_LR:g}], got {server_lr}")


def _settings(
    model: str,
    replicas: int,
    rounds: int,
    round_s: float,
    slo: SLOSpec,
    cal: Calibration,
    cfg: RunConfig,
    seed: int,
) -> RunSettings:
    # Each replica is pinned to one core (goodput_systems.replica_cpu); with more replicas than
    # cores, the ones sharing a core each take about (R / cores) × the calibrated step.
    sharing = core_sharing(replicas, len(available_cpus()))
    concurrent_step_s = cal.train_step_s * sharing
    steps = max(1, math.floor(TRAIN_FRACTION * round_s / concurrent_step_s))
    return RunSettings(
        model=model,
        replicas=replicas,
        rounds=rounds,
        round_s=round_s,
        warmup_s=WARMUP_FRACTION * round_s,
        deadline_s=DEADLINE_FRACTION * round_s,
        steps_per_replica=steps,
        step_seconds=concurrent_step_s,
        core_sharing=sharing,
        learning_rate=cfg.learning_rate,
        slo=slo,
        prompt_tokens=PROMPT_TOKENS,
        output_tokens=OUTPUT_TOKENS,
        request_timeout_s=max(30.0, round_s),
        seed=seed,
    )


def estimate_seconds(
    settings: RunSettings, cal: Calibration, n_rates: int, n_systems: int = len(SYSTEMS)
) -> float:
    """Rough wall time of the runs: per run, starting R replicas (they load in parallel on shared
    cores: about R/2 × one replica's startup, at least one), the schedule, and a drain tail."""
    startup = cal.startup_s * max(1.0, settings.replicas / 2)
    return n_rates * n_systems * (startup + settings.schedule_s + 15.0)


def check_systems(names: Sequence[str]) -> list[str]:
    """``names`` as a list, checked: known, no repeats, a baseline and a CoLLM-FL system."""
    chosen = list(names)
    unknown = [n for n in chosen if n not in SYSTEM_SPECS]
    if unknown:
        raise ConfigError(
            f"systems: unknown {', '.join(map(repr, unknown))}; expected some of "
            f"{', '.join(SYSTEM_SPECS)}"
        )
    if len(set(chosen)) != len(chosen):
        raise ConfigError(f"systems: each at most once, got {', '.join(chosen)}")
    if all(is_collm_system(n) for n in chosen) or not any(is_collm_system(n) for n in chosen):
        baselines = ", ".join(n for n in SYSTEM_SPECS if not is_collm_system(n))
        raise ConfigError(
            f"systems: need at least one baseline ({baselines}) and one CoLLM-FL system, got "
            f"{', '.join(chosen) or 'none'}"
        )
    return chosen


def check_trace_span(rows: Sequence[TraceRow], rates: Sequence[float], schedule_s: float) -> None:
    """A trace rescaled to each rate must last the whole schedule: every rate the report shows is
    per second of the schedule, and every round needs its load."""
    for rate in rates:
        span = len(rows) / rate  # n requests at a mean gap of 1 / rate
        if span < schedule_s:
            raise ConfigError(
                f"trace: its {len(rows)} requests last {span:.0f} s at {rate:.2f} req/s, less "
                f"than the {schedule_s:.0f} s of load the rounds need; pass a longer trace, a "
                "lower rate, or fewer or shorter rounds"
            )


def run_order(systems: Sequence[str], shift: int) -> list[str]:
    """The order the systems run in, rotated by ``shift`` (the run's seed + the rate's index)."""
    shift %= len(systems)
    return [*systems[shift:], *systems[:shift]]


def check_rate_schedules(
    rates: Sequence[float],
    schedule_s: float,
    arrivals: str,
    trace_rows: Sequence[TraceRow] | None,
    seed: int,
) -> None:
    """Each rate asked for must make a schedule the runs can hold, checked before anything runs
    (it was found after the calibration, or never): at most ``MAX_ARRIVALS`` requests, and at
    least one (a report of runs without a request would compare nothing)."""
    for k, rate in enumerate(rates):
        expected = rate * schedule_s
        if expected > MAX_ARRIVALS:
            raise ConfigError(
                f"--rates: {rate:g} req/s over the {schedule_s:g} s of load is {expected:.0f} "
                f"requests, more than the {MAX_ARRIVALS} a schedule holds; pass a lower rate, or "
                "fewer or shorter rounds"
            )
        if not _schedule(rate, schedule_s, arrivals, trace_rows, seed + k):
            raise ConfigError(
                f"--rates: {rate:g} req/s sends no request in the {schedule_s:g} s of load; "
                "pass a higher rate, or more or longer rounds"
            )


def _schedule(
    rate: float,
    schedule_s: float,
    arrivals: str,
    trace_rows: Sequence[TraceRow] | None,
    seed: int,
) -> list[RequestSpec]:
    p, o = PROMPT_TOKENS, OUTPUT_TOKENS  # (the runs' RunSettings.prompt_tokens, output_tokens)
    if trace_rows is not None:
        rows = scale_trace(trace_rows, rate, schedule_s, p, o)
        return build_requests(rows, p, o)
    return build_requests(arrival_times(arrivals, rate, schedule_s, seed), p, o)


def summarize_runs(
    runs: Sequence[SystemRun], rates: Sequence[float], slo: SLOSpec, schedule_s: float
) -> tuple[list[RunOutcome], list[RateOutcome]]:
    """Per run: load summary, training, served quality; per rate: target and CoLLM-FL ratio."""
    outcomes: list[RunOutcome] = []
    by_rate: list[RateOutcome] = []
    for rate in rates:
        rows = [summarize_run(run, slo, schedule_s) for run in runs if run.rate == rate]
        target, source = quality_target(rows)
        if target is not None:
            rows = [
                replace(r, time_to_quality_s=time_to_quality(r.quality, target, QUALITY_TOLERANCE))
                for r in rows
            ]
        outcomes += rows
        baselines = {r.system: r for r in rows if not is_collm_system(r.system)}
        # The best baseline by goodput; of two with the same goodput, the one serving the lower
        # loss (not the first in --systems: the quality column compares against it).
        best = (
            max(
                baselines,
                key=lambda k: (baselines[k].summary.goodput_rps, -baselines[k].final_loss),
            )
            if baselines
            else None
        )
        ratios = {}
        if best is not None and baselines[best].summary.goodput_rps > 0:
            ratios = {
                r.system: r.summary.goodput_rps / baselines[best].summary.goodput_rps
                for r in rows
                if is_collm_system(r.system)
            }
        by_rate.append(RateOutcome(rate, target, source, best, ratios, target_rule=HALF_WAY))
    return outcomes, by_rate


def quality_target(runs: Sequence[RunOutcome]) -> tuple[float | None, str | None]:
    """The time-to-quality target at one rate, and the system whose served loss set it.

    Half-way from version 0's loss (every system's start) to the lowest loss any system serves
    when the load ends: the same bar for every system, set by none of them alone (a system's own
    first version would make its time to quality its first publication, by construction). None
    when no system improved on version 0 by more than twice the tolerance: the target is met
    within the tolerance, so a smaller gain would let version 0 itself meet it at time 0.
    """
    if not runs:
        return None, None
    start = runs[0].loss_by_version.get(0, runs[0].quality[0][1])
    best = min(runs, key=lambda r: r.final_loss)
    if not best.final_loss < start - 2 * QUALITY_TOLERANCE:
        return None, None
    return start - (start - best.final_loss) / 2, best.system


def request_weighted_loss(summary: LoadSummary, loss_by_version: dict[int, float]) -> float | None:
    """The mean held-out loss of the versions that answered the successful requests: quality as
    the requests saw it (a version published as the load ends weighs by what it answered)."""
    counts = {
        0 if version == "base" else int(version): n
        for version, n in summary.adapter_versions.items()
    }
    known = {v: n for v, n in counts.items() if v in loss_by_version}
    total = sum(known.values())
    if total == 0:
        return None
    return sum(n * loss_by_version[v] for v, n in known.items()) / total


def summarize_run(run: SystemRun, slo: SLOSpec, schedule_s: float) -> RunOutcome:
    """One run as the report shows it (its time to quality is set once the rate's target is
    known, :func:`summarize_runs`). Its served quality ends with the load: a version published
    after the last request was due is not counted as served."""
    fed = run.federation
    quality = served_quality_curve(fed.switches, run.serving, fed.loss_by_version, schedule_s)
    tokens = sum(r.tokens for r in fed.rounds)
    # Per second of the load, or of the rounds where they ran past it (a round starts late when
    # the one before overran): tokens trained after the load ended are not spread over less time.
    train_s = max([schedule_s, *(r.started_s + r.train_s for r in fed.rounds)])
    summary = summarize_results(run.results, slo, schedule_s)
    return RunOutcome(
        system=run.system,
        rate=run.rate,
        summary=summary,
        train_steps=sum(r.steps for r in fed.rounds),
        train_tokens=tokens,
        train_tokens_per_s=tokens / train_s,
        rounds=fed.rounds,
        loss_by_version=dict(sorted(fed.loss_by_version.items())),
        switches=fed.switches,
        quality=quality,
        final_loss=quality[-1][1],
        time_to_quality_s=None,
        serving=run.serving,
        training=run.training,
        startup_s=run.startup_s,
        wall_s=run.wall_s,
        request_loss=request_weighted_loss(summary, fed.loss_by_version),
    )


def served_quality_curve(
    switches: Sequence[tuple[float, int, int]],
    serving: Sequence[int],
    loss_by_version: dict[int, float],
    end_s: float,
) -> list[tuple[float, float]]:
    """(time, mean held-out loss of what the serving replicas serve) at every switch up to
    ``end_s``, and at ``end_s``.

    Mean over replicas: with requests spread over them, the expected loss of an answer.
    """
    times = sorted({0.0, end_s, *(t for t, _, _ in switches if t <= end_s)})
    curves = []
    for replica in serving:
        mine = [(t, v) for t, i, v in switches if i == replica]
        if not mine:
            raise ConfigError(f"replica {replica} never served a version")
        curves.append(served_quality_at(times, mine, loss_by_version))
    return [(t, sum(c[k] for c in curves) / len(curves)) for k, t in enumerate(times)]
