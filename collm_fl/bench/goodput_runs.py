"""Several goodput runs side by side (``collm bench goodput-runs``): how much the ratio to the
best baseline moves with the arrival pattern.

One run replays one schedule per rate, and a bursty schedule decides a lot: where its bursts fall
against the baselines' training pauses. Runs with other ``--seed`` values (same model, replicas,
rounds, SLO factor and arrivals) give other schedules; this pools their rates by the load they
offered (light / medium / high / overload) and writes, per CoLLM-FL system and load, the spread
of the goodput ratio and of the time its served quality was no worse than every baseline's
and than the best baseline's by goodput:
``goodput-runs.md``, ``goodput-runs.json`` and ``goodput_runs.png``.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from collm_fl.bench.goodput_report import (
    GOAL_RATIO,
    RATE_LABELS,
    offered_load,
    quality_share,
    quality_share_vs_best,
)
from collm_fl.bench.goodput_result import GoodputResult, is_collm_system, result_from_json
from collm_fl.errors import ConfigError
from collm_fl.reports import save_figure, write_text_atomic

RATIO_TOLERANCE = 1e-9  # a ratio of goodputs that is 3 up to float rounding counts as 3
# What runs must share to be pooled: otherwise their ratios answer different questions.
SAME = ("model", "replicas", "rounds", "round_s", "slo_factor", "arrivals", "quick")
SAME_SETTINGS = ("server_lr", "shed_factor")  # ... and of the run's settings


def _setting(result: GoodputResult, key: str) -> object:
    """What runs must share: a field of the result or its settings, or its set of baselines
    (the best baseline is the best of those)."""
    if key == "baselines":
        return sorted({s.name for s in result.systems if not is_collm_system(s.name)})
    if key in SAME_SETTINGS:
        return getattr(result.settings, key)
    return getattr(result, key)


@dataclass(frozen=True)
class RatePoint:
    """One CoLLM-FL system at one rate of one run."""

    source: str  # the goodput.json it came from
    seed: int
    rate: float  # nominal req/s
    offered_fraction: float  # offered req/s / (R × one replica's saturated throughput)
    load: str  # light | medium | high | overload
    system: str
    best_baseline: str | None
    ratio: float | None  # goodput / the best baseline's (None: no baseline had goodput)
    quality_share: float  # share of the window serving a loss no worse than every baseline
    goodput_rps: float = 0.0  # the system's own goodput (decides a rate no baseline served)
    # ... no worse than the best baseline by goodput (None: no baseline had goodput)
    quality_share_vs_best: float | None = None

    @property
    def compared(self) -> bool:
        """Whether this rate says anything about the goal: not when neither side had goodput."""
        return self.ratio is not None or self.goodput_rps > 0

    def at_least(self, goal: float) -> bool:
        """goodput >= ``goal`` × the best baseline's; any goodput beats a baseline with none."""
        if self.ratio is None:
            return self.goodput_rps > 0
        return self.ratio >= goal - RATIO_TOLERANCE


@dataclass(frozen=True)
class Spread:
    """One CoLLM-FL system at one load, over every run's rates of that load."""

    system: str
    load: str
    points: int
    compared: int  # points where CoLLM-FL or a baseline had goodput (else the rate says nothing)
    ratio_median: float | None
    ratio_min: float | None
    ratio_max: float | None
    at_goal: int  # points at >= GOAL_RATIO × the best baseline (RatePoint.at_least)
    not_below: int  # points at >= 1 ×
    quality_share_median: float
    quality_share_vs_best_median: float | None = None


def load_results(paths: Sequence[str]) -> list[tuple[str, GoodputResult]]:
    """Each path (a goodput.json, or a directory holding one) read back; a clear error for a
    missing or foreign file, or for runs that differ in what :data:`SAME` names."""
    if len(paths) < 1:
        raise ConfigError("give at least one goodput.json (or a directory holding one)")
    results: list[tuple[str, GoodputResult]] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            path = path / "goodput.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            result = result_from_json(data)
        except FileNotFoundError as e:
            raise ConfigError(f"{given}: no such goodput report ({path})") from e
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"{given}: not a goodput report ({e})") from e
        results.append((str(path), result))
    first_path, first = results[0]
    for source, result in results[1:]:
        for key in (*SAME, *SAME_SETTINGS, "baselines"):
            mine, theirs = _setting(result, key), _setting(first, key)
            if mine != theirs:
                raise ConfigError(
                    f"{source}: {key}={mine!r} but {first_path} has {theirs!r}: runs with "
                    f"different {key} are not pooled"
                )
    seen: set[Path] = set()
    for source, _ in results:
        resolved = Path(source).resolve()
        if resolved in seen:
            raise ConfigError(f"{source} is given twice: one run counted twice")
        seen.add(resolved)
    return results


def rate_points(results: Sequence[tuple[str, GoodputResult]]) -> list[RatePoint]:
    points: list[RatePoint] = []
    for source, result in results:
        for info in result.by_rate:
            _, fraction, load = offered_load(result, info.rate)
            for run in result.runs_at(info.rate):
                if not is_collm_system(run.system):
                    continue
                points.append(
                    RatePoint(
                        source,
                        result.seed,
                        info.rate,
                        fraction,
                        load,
                        run.system,
                        info.best_baseline,
                        info.ratios.get(run.system),
                        quality_share(result, run),
                        run.summary.goodput_rps,
                        quality_share_vs_best(result, info, run),
                    )
                )
    return points


def spreads(points: Sequence[RatePoint]) -> list[Spread]:
    """Per system and load (in RATE_LABELS order), the spread over the points."""
    out: list[Spread] = []
    systems = list(dict.fromkeys(p.system for p in points))
    for system in systems:
        for _, load in RATE_LABELS:
            mine = [p for p in points if p.system == system and p.load == load]
            if not mine:
                continue
            ratios = [p.ratio for p in mine if p.ratio is not None]
            out.append(
                Spread(
                    system,
                    load,
                    len(mine),
                    sum(p.compared for p in mine),
                    statistics.median(ratios) if ratios else None,
                    min(ratios) if ratios else None,
                    max(ratios) if ratios else None,
                    sum(p.at_least(GOAL_RATIO) for p in mine),
                    sum(p.at_least(1.0) for p in mine),
                    statistics.median(p.quality_share for p in mine),
                    _median_or_none([p.quality_share_vs_best for p in mine]),
                )
            )
    return out


def _median_or_none(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}×"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def render_markdown(
    results: Sequence[tuple[str, GoodputResult]],
    points: Sequence[RatePoint],
    table: Sequence[Spread],
    command: str,
) -> str:
    first = results[0][1]
    titles = {s.name: s.title for _, r in results for s in r.systems}
    lines = [
        "# Goodput across runs",
        "",
        f"Command: `{command}`",
        "",
        f"{len(results)} run(s) of `collm bench goodput` ({first.model}, {first.replicas} "
        f"replicas, {first.rounds} rounds of {first.round_s:g} s, {first.arrivals} arrivals, "
        f"SLO factor {first.slo_factor:g}), seeds "
        f"{', '.join(str(r.seed) for _, r in results)}. Each rate of each run replays its own "
        "schedule; rates are pooled by the load they offered (× R × one replica's saturated "
        "throughput). Each run calibrates itself (its SLOs, capacity and micro-step, and from "
        "that its training budget), and its seed also draws the adapter's initialization and the "
        "replicas' data order: *Runs* below lists what differed.",
        "",
    ]
    arrival_seeds = [r.seed + k for _, r in results for k in range(len(r.rates))]
    if len(set(arrival_seeds)) < len(arrival_seeds):
        lines += [
            "**Arrival seeds repeat**: each rate's arrivals are drawn with seed + its index, and "
            "these runs share some (`--seed 0` and `--seed 1` share one): those rates replay the "
            "same burst pattern, rescaled to their rate, so part of the spread shows the code or "
            "the machine, not the arrivals.",
            "",
        ]
    lines += [
        f"## Per system and load (goal: ≥ {GOAL_RATIO:g}× at high load, ≥ 1× everywhere)",
        "",
        "The ≥ columns count the rates where CoLLM-FL or a baseline had goodput (any goodput "
        "beats a best baseline with none; a rate where neither had any is left out).",
        "",
        "| system | load | rates | goodput / best baseline: median (min – max) | "
        f"≥ {GOAL_RATIO:g}× | ≥ 1× | quality no worse than every baseline (median share) | "
        "… than the best baseline by goodput |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in table:
        lines.append(
            f"| {titles.get(s.system, s.system)} | {s.load} | {s.points} | "
            f"{_x(s.ratio_median)} ({_x(s.ratio_min)} – {_x(s.ratio_max)}) | "
            f"{s.at_goal}/{s.compared} | {s.not_below}/{s.compared} | "
            f"{100 * s.quality_share_median:.0f}% | {_pct(s.quality_share_vs_best_median)} |"
        )
    lines += [
        "",
        "## Every rate",
        "",
        "| run | seed | nominal req/s | offered × capacity | load | system | best baseline | "
        "goodput / best baseline | quality no worse than every baseline | … than the best |",
        "|---|---:|---:|---:|---|---|---|---:|---:|---:|",
    ]
    for p in points:
        lines.append(
            f"| {p.source} | {p.seed} | {p.rate:.2f} | {p.offered_fraction:.2f} | {p.load} | "
            f"{titles.get(p.system, p.system)} | {titles.get(p.best_baseline or '', '-')} | "
            f"{_x(p.ratio)} | {100 * p.quality_share:.0f}% | {_pct(p.quality_share_vs_best)} |"
        )
    lines += [
        "",
        "## Runs",
        "",
        "| run | seed | SLO TTFT / TPOT (ms) | one replica's capacity (req/s) | micro-step (s) | "
        "steps per replica and round | order the systems ran in (each rate) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for source, result in results:
        cal, st = result.calibration, result.settings
        orders = " / ".join(", ".join(o) for o in result.run_orders) or "not recorded"
        lines.append(
            f"| {source} | {result.seed} | {1000 * result.slo.ttft_s:.0f} / "
            f"{1000 * result.slo.tpot_s:.0f} | {cal.capacity_rps:.2f} | {cal.train_step_s:.2f} | "
            f"{st.steps_per_replica} | {orders} |"
        )
    lines += ["", "## Machines", ""]
    for source, result in results:
        info, start = result.machine.info, result.machine.load_avg_start
        lines.append(
            f"- {source}: `{result.command}`; {info['processor']} ({info['cpu_count']} CPUs), "
            f"1-minute load average at start {start[0] if start else float('nan'):.2f}, "
            f"{result.seconds / 60:.1f} min"
        )
    return "\n".join(lines) + "\n"


def plot_ratios(points: Sequence[RatePoint], path: Path) -> None:
    """Ratio vs offered load, one marker series per system, the goal and parity lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for system in dict.fromkeys(p.system for p in points):
        mine = [
            (p.offered_fraction, p.ratio)
            for p in points
            if p.system == system and p.ratio is not None
        ]
        ax.scatter(
            [x for x, _ in mine],
            [y for _, y in mine],
            label=system,
            alpha=0.8,
        )
    ax.axhline(GOAL_RATIO, color="green", linestyle="--", linewidth=0.8, label="goal")
    ax.axhline(1.0, color="grey", linestyle=":", linewidth=0.8, label="best baseline")
    ax.set_xlabel("offered load (× R × one replica's saturated throughput)")
    ax.set_ylabel("goodput / best baseline")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def write_runs_report(paths: Sequence[str], out: Path, command: str) -> list[Path]:
    """Read the runs, write ``goodput-runs.{md,json}`` and ``goodput_runs.png`` into ``out``."""
    results = load_results(paths)
    points = rate_points(results)
    if not points:
        raise ConfigError("no CoLLM-FL system in these runs: nothing to compare")
    table = spreads(points)
    out.mkdir(parents=True, exist_ok=True)
    md_path, json_path, png_path = (
        out / "goodput-runs.md",
        out / "goodput-runs.json",
        out / "goodput_runs.png",
    )
    payload = {
        "command": command,
        "runs": [source for source, _ in results],
        "goal_ratio": GOAL_RATIO,
        "spreads": [asdict(s) for s in table],
        "points": [asdict(p) for p in points],
    }
    write_text_atomic(json_path, json.dumps(payload, indent=2) + "\n")
    write_text_atomic(md_path, render_markdown(results, points, table, command))
    plot_ratios(points, png_path)
    return [md_path, json_path, png_path]
