"""How the goodput benchmark's result is written: JSON, markdown and two PNG plots."""

from __future__ import annotations

import itertools
import json
import logging
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from collm_fl.bench.aggregation import code_note
from collm_fl.bench.goodput_result import (
    HALF_WAY,
    GoodputResult,
    RateOutcome,
    RunOutcome,
    is_collm_system,
)
from collm_fl.loadgen.client import RequestResult, write_results_jsonl
from collm_fl.policies.scheduling import DEFAULT_DEFER_LIMIT_S
from collm_fl.reports import make_shared_like_files, save_figure, write_text_atomic

log = logging.getLogger(__name__)

SHARED_LOAD = 0.5  # a 1-minute load average above this before the run: someone else was busy
RATE_LABELS = (
    (0.15, "light"),
    (0.35, "medium"),
    (0.7, "high"),
    (float("inf"), "overload"),
)
REQUESTS_DIR = "requests"  # beside the report: one JSONL of request records per system and rate
RUN_ID_FILE = "run-id"  # in REQUESTS_DIR: the run the records are of (GoodputResult.run_id)
GOAL_RATIO = 3.0  # the goal: CoLLM-FL >= 3x the best baseline at bursty/high rates
QUALITY_TOLERANCE = 1e-3  # nats: served losses this close count as equal


def write_goodput_report(
    result: GoodputResult,
    out: Path,
    records: Mapping[tuple[str, int], Sequence[RequestResult]] | None = None,
) -> list[Path]:
    """Write ``goodput.json``, ``goodput.md`` and the two plots into ``out``, and with
    ``records`` the requests' (write_request_records); returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    md_path = out / "goodput.md"
    written: list[Path] = []
    if records is not None:
        # The last run's report goes first (goodput.json renders it again): killed before the
        # new report is written, it would name these records as its own.
        md_path.unlink(missing_ok=True)
        written.append(write_request_records(out, records, result.run_id))
    # Both made before either is written: a report that cannot be rendered (a malformed
    # goodput.json given to --from-json) leaves the last report whole, not its markdown beside
    # a new JSON.
    json_text = json.dumps(result.to_json(), indent=2) + "\n"
    md_text = render_markdown(result, has_request_records(out, result))
    json_path = out / "goodput.json"
    write_text_atomic(json_path, json_text)
    write_text_atomic(md_path, md_text)
    rate_png, quality_png = out / "goodput_vs_rate.png", out / "quality_over_time.png"
    plot_goodput_vs_rate(result, rate_png)
    plot_quality_over_time(result, quality_png)
    return [md_path, json_path, rate_png, quality_png, *written]


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1e3 * seconds:.0f}"


def _opt(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _count(n: int, noun: str) -> str:
    word = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}.get(n, str(n))
    return f"{word} {noun}" + ("" if n == 1 else "s")


def offered_load(result: GoodputResult, rate: float) -> tuple[float | None, float, str]:
    """The load a rate offered: req/s the schedule held (None: no run at it; a bursty schedule's
    count of requests strays from the nominal rate), that (or the nominal rate) as a fraction of
    R × one replica's saturated throughput, and its name (light ... overload)."""
    capacity = result.replicas * result.calibration.capacity_rps
    runs = result.runs_at(rate)
    offered = None
    if runs and runs[0].summary.duration_s > 0:  # the schedule every system at this rate got
        offered = runs[0].summary.requests / runs[0].summary.duration_s
    fraction = (rate if offered is None else offered) / capacity if capacity > 0 else 0.0
    label = next(name for bound, name in RATE_LABELS if fraction <= bound)
    return offered, fraction, label


def _rate_label(result: GoodputResult, rate: float) -> str:
    """The rate, and its load named by what the schedule offered (:func:`offered_load`)."""
    offered, fraction, label = offered_load(result, rate)
    text = f"{rate:.2f} req/s nominal"
    if offered is not None:
        requests = result.runs_at(rate)[0].summary.requests
        text += f", offered {offered:.2f} req/s ({requests} requests)"
    return text + f": {fraction:.2f} × R × one replica's saturated throughput, {label}"


def render_markdown(result: GoodputResult, with_records: bool = False) -> str:
    """The report; ``with_records``: it names the folder of request records beside it."""
    cal, slo, st, r = result.calibration, result.slo, result.settings, result.replicas
    mine = sum(is_collm_system(s.name) for s in result.systems)
    lines = [
        "# Goodput: training and serving on the same replicas — "
        f"{_count(len(result.systems) - mine, 'baseline')} and CoLLM-FL"
        + ("" if mine == 1 else f" ({_count(mine, 'setting')})"),
        "",
        f"Command: `{result.command}`" + (" (quick smoke run)" if result.quick else ""),
        "",
        *_machine_lines(result),
        "",
        *(
            [
                f"**This run did not finish** ({result.stopped}); only the rates every system "
                "completed are reported.",
                "",
            ]
            if result.stopped
            else []
        ),
        "## Setup",
        "",
        f"- **Replicas**: {r} `collm replica` processes of `{result.model}` on this machine, "
        + (
            "each pinned to its own core (`--cpus`)"
            if st.core_sharing <= 1
            else f"each pinned to one core (`--cpus`, round-robin: {st.core_sharing:g} replicas "
            "a core on average)"
        )
        + ", started fresh for every system × rate (same "
        "weights, data order and empty queues at the start of every run); replica *i* holds "
        f"partition *i* of {r} of the Shakespeare plays (two plays are held out for the central "
        "evaluation).",
        f"- **Load**: {result.arrivals} arrivals (the same schedule for every system at a "
        f"rate), ~{st.prompt_tokens}-word prompts, at most {st.output_tokens} output tokens, "
        f"streaming `/v1/completions`, open loop; {st.schedule_s:.0f} s of schedule "
        f"({st.warmup_s:.0f} s of warm-up serving version 0, then {result.rounds} round(s) of "
        f"{st.round_s:.0f} s). Requests time out after {st.request_timeout_s:.0f} s.",
        f"- **SLO**: TTFT ≤ {_ms(slo.ttft_s)} ms and TPOT ≤ {_ms(slo.tpot_s)} ms, "
        f"{result.slo_factor:g} × the unloaded latency of one replica (calibration: medians of "
        f"{cal.unloaded_requests} sequential requests, TTFT {_ms(cal.ttft_unloaded_s)} ms, "
        f"TPOT {1e3 * cal.tpot_unloaded_s:.1f} ms).",
        f"- **Rates**: one replica completes {cal.capacity_rps:.2f} req/s when saturated (a "
        f"burst of {cal.burst_requests} requests at once); "
        + (
            "the rates were given on the command line."
            if result.rate_fractions is None
            else f"the rates are {', '.join(f'{f:g}' for f in result.rate_fractions)} × R × that."
        ),
        f"- **Training budget**: {st.steps_per_replica} micro-steps (batch 4 × 128 tokens) per "
        f"replica and round, {r} × that in total for every system, deadline "
        f"{st.deadline_s:.0f} s: about "
        f"{100 * st.steps_per_replica * cal.train_step_s * st.core_sharing / result.round_s:.0f}"
        " % of the replicas' compute per round (idle step "
        f"{cal.train_step_s:.3f} s on a replica's core"
        + (f", {st.core_sharing:g} × that with the core shared" if st.core_sharing > 1 else "")
        + ").",
        "- **Federation**: emulated by the benchmark process (not Flower): each round the "
        "training replicas train (`/control/train`), the updates are aggregated exactly "
        "(`aggregate_lora_exact`, weighted by examples; when replicas ran different steps, "
        "FedNova's normalized mean, as the strategy averages them"
        + (
            f"; server learning rate η = {st.server_lr:g} where a round averages 2+ "
            "updates: global + η·(aggregate − global)"
            + (
                "; the separate system's one trainer's update as it is, η being chosen so "
                "that the averaged updates do at least as well as one trainer's sequential "
                "steps, `collm bench server-lr`: quality against the separate system depends "
                "on it"
                if any(s.name == "separate" for s in result.systems)
                else ""
            )
            if st.server_lr != 1.0
            else ""
        )
        + "), the new version is evaluated on the "
        f"central held-out set ({result.eval_samples} samples of the two held-out plays, "
        f"{result.eval_rows} rows of 128 tokens; one thread in the benchmark process, on the "
        "replicas' cores, where a deployment's server would use its own) and then pushed to "
        "every replica in the system's swap mode.",
        "- **Routing**: baselines: client-side round-robin over their serving replicas (request "
        "*i* to replica *i* mod *n*, no proxy hop"
        + (
            "; rolling: to the next replica in its rotation"
            if any(s.name == "rolling" for s in result.systems)
            else ""
        )
        + "); CoLLM-FL: `collm gateway` (SLO-aware"
        + (
            f"; it refuses with a 503 a request whose best predicted TTFT exceeds "
            f"{st.shed_factor:g} × the TTFT SLO, `--shed-factor {st.shed_factor:g}`; a refused "
            "request is a miss in goodput and SLO attainment, and is left out of the latency "
            "percentiles"
            if st.shed_factor
            else ""
        )
        + ").",
        "- **Admission in a replica**: baselines (and CoLLM-FL's first-come-first-served "
        "ablation): first come, first served (`collm replica "
        "--schedule fcfs`, vLLM's default); CoLLM-FL: `--schedule slo` — requests that can still "
        "meet the TTFT SLO first, a burst prefilled only as far as its oldest member still meets "
        f"it, requests already late on spare rows, none deferred past {DEFAULT_DEFER_LIMIT_S:g} s "
        "(`collm_fl.policies.scheduling`). No request is refused or dropped by it.",
        "- **Metrics**: goodput = requests meeting both SLOs per second of schedule; SLO "
        "attainment over all scheduled requests (failed, timed-out and dropped ones miss); "
        "latency percentiles over successful requests (requests refused or failed are in the "
        "*not answered* column, not in the percentiles). Served loss = mean over the serving "
        "replicas of the held-out loss of the version each serves; *final*: when the load ends; "
        "*per request*: the mean loss of the versions that answered the successful requests. "
        + (
            "Time to quality = first time the served loss is at or below a target: the loss "
            "CoLLM-FL's first version reaches at that rate."
            if all(b.target_rule != HALF_WAY for b in result.by_rate)
            else "A request meets the TTFT SLO counted from when it was due (the load "
            "generator's lag counts against the system). Time to quality = first time the "
            "served loss is within 0.001 of a target: half-way from version 0's loss to the "
            "lowest loss any system serves when the load ends. "
            + (
                "The systems run"
                if result.arrivals.startswith("trace")
                else "Each rate has its own arrival seed (seed + rate index), and the systems run"
            )
            + (
                " in this order: "
                + "; ".join(
                    f"rate {k + 1}: " + ", ".join(order)
                    for k, order in enumerate(result.run_orders)
                )
                + " (rotated by one at each rate, from the seed's place)."
                if result.run_orders
                else " in an order rotated by one at each rate."
            )
        )
        + (
            f" Every request's record (`collm load`'s fields): "
            f"`{REQUESTS_DIR}/<system>-rate<k>.jsonl` (k: the rate's place, from 1)."
            if with_records
            else ""
        ),
        "",
        "## Systems",
        "",
        "| system | swap | training | what it does |",
        "|---|---|---|---|",
        *(f"| {s.title} | {s.swap_mode} | {s.training} | {s.summary} |" for s in result.systems),
        "",
        "## Results",
        "",
    ]
    lines += [*_goal_lines(result), ""]
    for info in result.by_rate:
        lines += [f"### {_rate_label(result, info.rate)}", "", *_rate_table(result, info), ""]
    lines += [
        "![goodput vs rate](goodput_vs_rate.png)",
        "",
        "Served quality over time at every rate:",
        "",
        "![served quality over time](quality_over_time.png)",
        "",
    ]
    for rate in result.rates:
        lines += [*_rounds_table(result, rate), ""]
    lines += _allocation_lines(result)
    return "\n".join(lines) + "\n"


def _not_answered(errors: Mapping[str, int]) -> str:
    """Requests not answered: refused with a 503 (overload, or shed), and every other failure."""
    refused = errors.get("http_503", 0)
    return f"{refused} / {sum(errors.values()) - refused}"


def _rate_table(result: GoodputResult, info: RateOutcome) -> list[str]:
    lines = [
        "| system | goodput (req/s) | SLO attainment | not answered (503 / other) "
        "| TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | training tokens/s | final served loss "
        "| served loss per request | time to quality (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in result.runs_at(info.rate):
        s = run.summary
        lines.append(
            f"| {result.title(run.system)} | {s.goodput_rps:.3f} | {100 * s.slo_attainment:.0f}% "
            f"| {_not_answered(s.errors)} | {_ms(s.ttft_p50_s)} / {_ms(s.ttft_p99_s)} "
            f"| {_ms(s.tpot_p50_s)} / {_ms(s.tpot_p99_s)} | {run.train_tokens_per_s:.0f} "
            f"| {run.final_loss:.4f} | {_opt(run.request_loss, '.4f')} "
            f"| {_opt(run.time_to_quality_s, '.1f')} |"
        )
    best = result.title(info.best_baseline) if info.best_baseline else "-"
    ratio = "; ".join(
        f"{result.title(name)} **{value:.2f}×**" for name, value in info.ratios.items()
    )
    if info.target_rule == HALF_WAY:
        source = (
            "no system served a better version than version 0 at this rate"
            if info.target_source is None
            else "half-way from version 0's loss to the lowest served at the end of the load, "
            f"{result.title(info.target_source)}'s"
        )
    elif info.target_source is None:
        source = "no system published a version at this rate"
    elif is_collm_system(info.target_source):
        source = f"the held-out loss of {result.title(info.target_source)}'s first version"
    else:
        source = (
            "CoLLM-FL published no version at this rate (its replicas had no headroom); the "
            f"highest first-version loss of the others, {result.title(info.target_source)}'s"
        )
    lines += [
        "",
        f"Quality target: {_opt(info.target_loss, '.4f')} ({source}). Goodput / best "
        f"baseline ({best}): {ratio or '-'}.",
    ]
    lags = [
        f"{result.title(r.system)} {_ms(r.summary.send_late_p99_s)} / "
        f"{_ms(r.summary.send_late_max_s)}"
        for r in result.runs_at(info.rate)
        if r.summary.send_late_max_s is not None
    ]
    if lags:  # (reports from before this was recorded have none)
        lines += [
            "",
            "The load generator's lag, how far behind its schedule requests were sent (p99 / max, "
            "ms; the latency percentiles count from the actual send"
            + ("" if info.target_rule != HALF_WAY else ", the TTFT SLO from when a request was due")
            + "): "
            + "; ".join(lags)
            + ".",
        ]
    return lines


def served_loss_at(curve: list[tuple[float, float]], t: float) -> float:
    """The served loss at time ``t`` of a step curve [(time, loss), ...] sorted by time."""
    value = curve[0][1]
    for when, loss in curve:
        if when > t:
            break
        value = loss
    return value


def share_at_least_as_good(
    mine: list[tuple[float, float]],
    others: list[list[tuple[float, float]]],
    end_s: float,
) -> float:
    """Share of [0, end_s) in which ``mine`` serves a loss no worse than every one of ``others``
    (within ``QUALITY_TOLERANCE``), exactly: the curves are step functions, so the condition only
    changes where one of them steps."""
    if end_s <= 0:
        return 1.0
    steps = {t for curve in (mine, *others) for t, _ in curve if 0.0 < t < end_s}
    bounds = [0.0, *sorted(steps), end_s]
    good = 0.0
    for start, stop in itertools.pairwise(bounds):
        best_other = min(served_loss_at(o, start) for o in others)
        if served_loss_at(mine, start) <= best_other + QUALITY_TOLERANCE:
            good += stop - start
    return good / end_s


def quality_share(result: GoodputResult, mine: RunOutcome) -> float:
    """Share of the load window in which ``mine`` served a loss no worse than every baseline at
    its rate (1.0 when the rate had no baseline)."""
    others = [r.quality for r in result.runs_at(mine.rate) if not is_collm_system(r.system)]
    if not others:
        return 1.0
    return share_at_least_as_good(mine.quality, others, result.settings.schedule_s)


def quality_share_vs_best(
    result: GoodputResult, info: RateOutcome, mine: RunOutcome
) -> float | None:
    """Share of the load window in which ``mine`` served a loss no worse than the best baseline
    by goodput at its rate; None when no baseline had goodput there (no best to speak of)."""
    if not info.ratios or info.best_baseline is None:
        return None
    best = [r for r in result.runs_at(mine.rate) if r.system == info.best_baseline]
    if not best:
        return None
    return share_at_least_as_good(mine.quality, [best[0].quality], result.settings.schedule_s)


def _goal_lines(result: GoodputResult) -> list[str]:
    """Per rate and CoLLM-FL system: the goodput ratio and its served quality over time against
    every baseline, and against the best one by goodput (the one the ratio divides by)."""
    lines = [
        "### Against the goals",
        "",
        f"Goals: CoLLM-FL's goodput at least {GOAL_RATIO:g}× the best baseline's at the "
        "bursty/high rates and never below it, and its served quality at least as good at "
        "every moment. The quality is compared two ways: with every baseline at each moment "
        "(the strict reading: the lowest loss any of them served then, whatever its goodput), "
        "and with the best baseline by goodput alone (the system one would otherwise run).",
        "",
        "| rate | system | goodput / best baseline | time it serves a loss no worse than every "
        "baseline | … than the best baseline by goodput | final served loss vs the lowest "
        "baseline's |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for info in result.by_rate:
        runs = result.runs_at(info.rate)
        baselines = [r for r in runs if not is_collm_system(r.system)]
        if not baselines:
            continue
        best = min(baselines, key=lambda o: o.final_loss)
        ratios = info.ratios
        for mine in (r for r in runs if is_collm_system(r.system)):
            share = quality_share(result, mine)
            ratio = ratios.get(mine.system)
            vs = quality_share_vs_best(result, info, mine)
            vs_best = (
                "-"
                if vs is None or info.best_baseline is None
                else f"{100 * vs:.0f}% ({result.title(info.best_baseline)})"
            )
            lines.append(
                f"| {_rate_label(result, info.rate)} | {result.title(mine.system)} | "
                f"{'-' if ratio is None else f'{ratio:.2f}×'} | {100 * share:.0f}% | {vs_best} | "
                f"{mine.final_loss:.4f} vs {best.final_loss:.4f} ({result.title(best.system)}) |"
            )
    return lines


def _allocation_lines(result: GoodputResult) -> list[str]:
    """CoLLM-FL's per-round allocation decisions with the load reports they were made from."""
    rows = [
        f"| {result.title(run.system)} | {run.rate:.2f} | {rr.round} | r{a['replica']} "
        f"| {a['steps']} | {a.get('backfill', 0)} | {a.get('trained', '–')} "
        f"({a.get('backfilled', 0)}) | {_seconds(a, 'lent_s')} | {_seconds(a, 'late_rest_s')} "
        f"| {a['share']:.2f} | {_seconds(a, 'start_s')} | {_seconds(a, 'began_s')} "
        f"| {a['load']} |"
        for run in result.runs
        if is_collm_system(run.system)
        for rr in run.rounds
        for a in rr.allocation
    ]
    if not rows:
        return []
    return [
        "The CoLLM-FL systems' allocation decisions (`collm_fl.policies.allocation.allocate`, "
        "from each "
        "replica's load report since the previous round; *backfill*: more steps allowed on idle "
        "cycles only, or while every request the replica holds has missed its TTFT SLO; "
        "*trained*: steps the replica ran, of which backfill in parentheses; *lent*: seconds "
        "serving rested for a plan behind schedule (`--max-lend-share`); *late rest*: seconds "
        "serving rested for a step while all its requests were late; *from*: seconds into the "
        "round its training was to start at the latest, when the replicas took turns under "
        "light load (the turns' measured lengths before it summed, × 1.25, at most the deadline "
        "less its own length); *began*: when it was asked to train, the turn before it having "
        "returned or its planned start come (– without turns, or in runs before this was "
        "recorded)):",
        "",
        "| system | rate (req/s) | round | replica | planned | backfill | trained | lent (s) "
        "| late rest (s) | share | from (s) | began (s) | load report |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        *rows,
    ]


def _seconds(allocation: dict[str, object], key: str) -> str:
    """One of a decision's recorded seconds ("–" in reports written before it was recorded)."""
    value = allocation.get(key)
    return "–" if value is None else f"{float(value):.1f}"  # type: ignore[arg-type]


def _rounds_table(result: GoodputResult, rate: float) -> list[str]:
    lines = [
        f"Rounds at {rate:.2f} req/s (micro-steps trained by all replicas; the new version's "
        "held-out loss; when the last serving replica started serving it, seconds since the "
        "load started):",
        "",
        "| system | round | steps | training (s) | version | held-out loss | evaluation (s) "
        "| served at (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in result.runs_at(rate):
        for rr in run.rounds:
            lines.append(
                f"| {result.title(run.system)} | {rr.round} | {rr.steps} | {rr.train_s:.1f} | "
                f"{_opt(rr.version, 'd')} | {_opt(rr.eval_loss, '.4f')} | "
                f"{_opt(rr.eval_s, '.1f')} | {_opt(rr.published_s, '.1f')} |"
            )
    return lines


def _machine_lines(result: GoodputResult) -> list[str]:
    m = result.machine
    info = m.info
    lines = [
        f"Machine: {info['platform']}, {info['processor']}, {info['cpu_count']} CPUs, torch "
        f"{info['torch_version']}; float32 matmul probe {info['matmul_gflops_start']:.0f} "
        f"GFLOP/s before, {info['matmul_gflops_end']:.0f} after; load average (1/5/15 min) "
        f"{', '.join(f'{x:.1f}' for x in m.load_avg_start)} before, "
        f"{', '.join(f'{x:.1f}' for x in m.load_avg_end)} after{code_note(info)}. Wall time "
        f"{result.seconds / 60:.1f} min.",
    ]
    if m.load_avg_start and m.load_avg_start[0] > SHARED_LOAD:
        lines += [
            "",
            f"**The machine was shared** (1-minute load average {m.load_avg_start[0]:.1f} before "
            "the run): latencies and goodput are noisier and lower than on a quiet machine.",
        ]
    return lines


def plot_goodput_vs_rate(result: GoodputResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for system in result.systems:
        runs = sorted((r for r in result.runs if r.system == system.name), key=lambda r: r.rate)
        # What the schedule offered (every system at a rate got the same one), not the nominal
        # rate: a bursty schedule's count of requests strays from it.
        rates = [offered_load(result, r.rate)[0] or r.rate for r in runs]
        ax1.plot(rates, [r.summary.goodput_rps for r in runs], marker="o", label=system.title)
        ax2.plot(rates, [100 * r.summary.slo_attainment for r in runs], marker="o")
    ax1.set_xlabel("offered rate (req/s)")
    ax1.set_ylabel("goodput (req/s within both SLOs)")
    ax1.legend(fontsize=8)
    ax2.set_xlabel("offered rate (req/s)")
    ax2.set_ylabel("SLO attainment (%)")
    ax2.set_ylim(0, 105)
    fig.suptitle(f"{result.model}, {result.replicas} replicas, {result.arrivals} arrivals")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def plot_quality_over_time(result: GoodputResult, path: Path) -> None:
    """Served loss over time, one panel per rate, every system (grey: round starts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = result.rates
    fig, axes = plt.subplots(
        1, len(rates), figsize=(5.5 * len(rates), 4), sharey=True, squeeze=False
    )
    st = result.settings
    for ax, rate in zip(axes[0], rates, strict=True):
        for run in result.runs_at(rate):
            ax.step(
                [t for t, _ in run.quality],
                [loss for _, loss in run.quality],
                where="post",
                label=result.title(run.system),
            )
        target = next((b.target_loss for b in result.by_rate if b.rate == rate), None)
        if target is not None:
            ax.axhline(target, color="grey", linestyle="--", linewidth=0.8, label="quality target")
        for k in range(result.rounds):
            ax.axvline(st.warmup_s + k * st.round_s, color="lightgrey", linewidth=0.8)
        ax.set_xlabel("seconds since the load started")
        ax.set_title(f"{rate:.2f} req/s")
    axes[0][0].set_ylabel("served held-out loss (mean over serving replicas)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("served quality over time (grey: round starts)")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def write_request_records(
    out_dir: Path,
    records: Mapping[tuple[str, int], Sequence[RequestResult]],
    run_id: str | None = None,
) -> Path:
    """Every request's record, ``{REQUESTS_DIR}/<system>-rate<k>.jsonl`` (k from 1, in the
    report's order of rates), for ``records`` keyed by (system, rate index), and ``run_id`` in
    ``{REQUESTS_DIR}/{RUN_ID_FILE}``. The folder is made whole beside the old one and then takes
    its place: it never mixes two runs' files."""
    final = out_dir / REQUESTS_DIR
    # A run killed between the two renames below left the old folder aside: put it back, and
    # clear what such a run left.
    kept = sorted(out_dir.glob(f".{REQUESTS_DIR}-old-*/{REQUESTS_DIR}"))
    if not final.exists() and kept:
        kept[-1].rename(final)
    for left in out_dir.glob(f".{REQUESTS_DIR}-*"):
        shutil.rmtree(left, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{REQUESTS_DIR}-", dir=out_dir))
    make_shared_like_files(staging)
    old = None
    try:
        for (system, k), results in records.items():
            write_results_jsonl(results, staging / request_records_name(system, k))
        if run_id is not None:
            (staging / RUN_ID_FILE).write_text(run_id + "\n")
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{REQUESTS_DIR}-old-", dir=out_dir))
            final.rename(old / REQUESTS_DIR)
        staging.rename(final)
    except BaseException:
        if old is not None and not final.exists():
            (old / REQUESTS_DIR).rename(final)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return final


def request_records_name(system: str, rate_index: int) -> str:
    return f"{system}-rate{rate_index + 1}.jsonl"


def has_request_records(out: Path, result: GoodputResult) -> bool:
    """Whether ``out`` holds this report's request records: one file per system and rate, of this
    run by its id (the records are written before the report: a run killed in between leaves
    them beside the last run's report, which must not name them). A report from before run ids
    goes by the files' names alone."""
    folder = out / REQUESTS_DIR
    if not folder.is_dir():
        return False
    expected = {
        request_records_name(s.name, k) for s in result.systems for k in range(len(result.rates))
    }
    if result.run_id is not None:
        try:
            if (folder / RUN_ID_FILE).read_text().strip() != result.run_id:
                return False
        except (OSError, UnicodeDecodeError):
            return False
    return {p.name for p in folder.iterdir() if p.name != RUN_ID_FILE} == expected
