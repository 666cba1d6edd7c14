"""How well the allocation's request-rate forecast predicts the next round, by smoothing weights.

The allocation (``collm_fl.policies.allocation``) keeps, per replica, Holt's linear-trend forecast
of its request rate (``forecast_rate``: a level smoothed with weight α, a trend smoothed with
weight β) and reserves serving capacity for the forecast. This benchmark measures the one-round-
ahead forecast error over a grid of (α, β) on per-round request rates drawn from the load
generator's arrival processes (``collm_fl.loadgen.arrivals``) and, optionally, an Azure-format
trace. No process can be known in advance, so the report names, for every (α, β), its *regret* on
each process (its error / the least error any grid point reaches there) and ranks the grid by the
worst regret over the processes.

The score is asymmetric, as the allocation's costs are: an under-forecast costs SLOs (serving
keeps too little), an over-forecast costs training only until the allocation's backfill takes the
idle cycles back. So the error is the pinball (quantile) loss at ``QUANTILE`` 0.8 — an
under-forecast weighs 4× an over-forecast of the same size — relative to the series' mean rate;
the mean absolute error (MAE) is reported beside it. The first ``WARMUP_ROUNDS`` forecasts are not
scored (the forecast starts from the first report).
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from collm_fl.errors import ConfigError
from collm_fl.loadgen.arrivals import arrival_times
from collm_fl.loadgen.trace import load_azure_trace
from collm_fl.policies.allocation import FORECAST_ALPHA, FORECAST_BETA, forecast_rate
from collm_fl.reports import save_figure, write_text_atomic

log = logging.getLogger(__name__)

WARMUP_ROUNDS = 3
QUANTILE = 0.8  # pinball loss: an under-forecast weighs QUANTILE / (1 - QUANTILE) = 4x an over
DEFAULT_ALPHAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
DEFAULT_BETAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


@dataclass(frozen=True)
class Process:
    """One arrival process of the study: ``arrival_times(kind, ...)`` with these shape values."""

    name: str
    kind: str
    shape: Mapping[str, float]
    what: str


def default_processes(duration_s: float) -> tuple[Process, ...]:
    """The load generator's processes, with on/off periods both shorter and longer than a round."""
    return (
        Process("poisson", "poisson", {}, "Poisson arrivals (CV 1)"),
        Process("bursty", "bursty", {"cv": 4.0}, "gamma gaps, CV 4 (the goodput benchmark's)"),
        Process(
            "onoff-short",
            "onoff",
            {"on_s": 30.0, "off_s": 90.0},
            "on 30 s / off 90 s: bursts shorter than a round",
        ),
        Process(
            "onoff-long",
            "onoff",
            {"on_s": 600.0, "off_s": 1200.0},
            "on 10 min / off 20 min: regimes of many rounds",
        ),
        Process(
            "diurnal",
            "diurnal",
            {"amplitude": 0.8, "period_s": duration_s / 2},
            "sinusoidal rate, ±80 %, two periods over the series",
        ),
    )


def round_rates(times: np.ndarray, round_s: float, rounds: int) -> np.ndarray:
    """Requests per second in each of ``rounds`` consecutive windows of ``round_s`` seconds."""
    idx = (np.asarray(times, dtype=float) // round_s).astype(int)
    idx = idx[(idx >= 0) & (idx < rounds)]
    return np.bincount(idx, minlength=rounds).astype(float) / round_s


def forecast_errors(
    rates: Sequence[float] | np.ndarray, alpha: float, beta: float
) -> tuple[float, float]:
    """(pinball loss at QUANTILE, MAE) of the one-round-ahead forecast, both / the mean rate."""
    mean = float(np.mean(rates)) if len(rates) else 0.0
    if len(rates) <= WARMUP_ROUNDS or mean <= 0:
        raise ConfigError(
            f"a series needs more than {WARMUP_ROUNDS} rounds and requests in them "
            f"(got {len(rates)} rounds, mean rate {mean:g})"
        )
    fc = None
    pinball: list[float] = []
    abs_err: list[float] = []
    for i, actual in enumerate(rates):
        if fc is not None and i >= WARMUP_ROUNDS:
            err = float(actual) - fc.next  # > 0: under-forecast
            pinball.append(max(QUANTILE * err, (QUANTILE - 1.0) * err))
            abs_err.append(abs(err))
        fc = forecast_rate(fc, float(actual), alpha, beta)
    return float(np.mean(pinball)) / mean, float(np.mean(abs_err)) / mean


def regret(errors: Mapping[str, float]) -> dict[str, float]:
    """Each entry's error / the least one (1.0 for the best; a zero-error best counts exactly)."""
    best = min(errors.values())
    if best <= 0:
        return {k: (1.0 if v <= 0 else math.inf) for k, v in errors.items()}
    return {k: v / best for k, v in errors.items()}


def _key(alpha: float, beta: float) -> str:
    return f"{alpha:g}/{beta:g}"


def run_forecast_benchmark(
    out_dir: Path,
    command: str,
    rate: float = 1.0,
    round_s: float = 60.0,
    rounds: int = 240,
    seeds: int = 5,
    first_seed: int = 0,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    betas: Sequence[float] = DEFAULT_BETAS,
    trace: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, object]:
    """Write ``forecast.{json,md,png}`` to ``out_dir``; returns the JSON content."""
    say = progress or (lambda line: log.info("%s", line))
    if not (math.isfinite(rate) and rate > 0 and math.isfinite(round_s) and round_s > 0):
        raise ConfigError(f"rate and round length must be > 0, got {rate!r} and {round_s!r}")
    if rounds <= WARMUP_ROUNDS + 1 or seeds < 1 or first_seed < 0:
        raise ConfigError(f"need rounds > {WARMUP_ROUNDS + 1}, seeds >= 1 and a seed >= 0")
    if not alphas or any(not (0.0 < a <= 1.0) for a in alphas):
        raise ConfigError(f"alphas must be numbers in (0, 1], got {list(alphas)}")
    if not betas or any(not (0.0 <= b <= 1.0) for b in betas):
        raise ConfigError(f"betas must be numbers in [0, 1], got {list(betas)}")
    started = time.monotonic()
    duration = rounds * round_s
    series: dict[str, list[np.ndarray]] = {}
    what: dict[str, str] = {}
    seed_range = range(first_seed, first_seed + seeds)
    for p in default_processes(duration):
        series[p.name] = [
            round_rates(arrival_times(p.kind, rate, duration, seed, **p.shape), round_s, rounds)
            for seed in seed_range
        ]
        what[p.name] = p.what
    if trace is not None:
        rows = load_azure_trace(trace)
        offsets = rows.offsets
        n = int(offsets[-1] // round_s) + 1
        if n <= WARMUP_ROUNDS + 1:
            raise ConfigError(
                f"{trace}: spans {offsets[-1]:.0f} s, fewer than {WARMUP_ROUNDS + 2} rounds of "
                f"{round_s:g} s; pass a shorter --round-s"
            )
        series["trace"] = [round_rates(offsets, round_s, n)]
        what["trace"] = f"{trace.name}: {len(rows)} requests in {n} rounds, as recorded"
    grid = [_key(a, b) for a in alphas for b in betas]
    loss: dict[str, dict[str, float]] = {}
    mae: dict[str, dict[str, float]] = {}
    for name, runs in series.items():
        loss[name], mae[name] = {}, {}
        for a in alphas:
            for b in betas:
                errs = np.array([forecast_errors(r, a, b) for r in runs])
                loss[name][_key(a, b)] = float(errs[:, 0].mean())
                mae[name][_key(a, b)] = float(errs[:, 1].mean())
        say(f"{name}: {len(runs)} series of {len(runs[0])} rounds scored on {len(grid)} (α, β)")
    regrets = {name: regret(errs) for name, errs in loss.items()}
    worst = {k: max(regrets[name][k] for name in series) for k in grid}
    ranked = sorted(grid, key=lambda k: (worst[k], k))
    default = _key(FORECAST_ALPHA, FORECAST_BETA)
    result: dict[str, object] = {
        "command": command,
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "rate": rate,
        "round_s": round_s,
        "rounds": rounds,
        "seeds": list(seed_range),
        "warmup_rounds": WARMUP_ROUNDS,
        "quantile": QUANTILE,
        "alphas": list(alphas),
        "betas": list(betas),
        "processes": what,
        "default": default if default in worst else None,
        "loss": loss,
        "mae": mae,
        "regret": regrets,
        "worst_regret": worst,
        "ranked": ranked,
        "seconds": time.monotonic() - started,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "forecast.json", json.dumps(result, indent=2))
    write_text_atomic(out_dir / "forecast.md", _markdown(result))
    _plot(result, out_dir / "forecast.png")
    say(f"wrote {out_dir / 'forecast.md'}")
    return result


def _markdown(r: Mapping[str, object]) -> str:
    loss: dict[str, dict[str, float]] = r["loss"]  # type: ignore[assignment]
    mae: dict[str, dict[str, float]] = r["mae"]  # type: ignore[assignment]
    regrets: dict[str, dict[str, float]] = r["regret"]  # type: ignore[assignment]
    worst: dict[str, float] = r["worst_regret"]  # type: ignore[assignment]
    ranked: list[str] = r["ranked"]  # type: ignore[assignment]
    what: dict[str, str] = r["processes"]  # type: ignore[assignment]
    seeds: list[int] = r["seeds"]  # type: ignore[assignment]
    machine: dict[str, str] = r["machine"]  # type: ignore[assignment]
    default = str(r["default"]) if r["default"] else None
    last = _key(1.0, 0.0) if _key(1.0, 0.0) in worst else None
    q = float(r["quantile"])  # type: ignore[arg-type]
    lines = [
        "# Request-rate forecast: Holt's smoothing weights against the arrival processes",
        "",
        f"Command: `{r['command']}`",
        "",
        f"Machine: {machine['platform']}, Python {machine['python']} (the figures depend on the "
        f"seeds only). Wall time {float(r['seconds']):.1f} s.",  # type: ignore[arg-type]
        "",
        f"Per-round request rates (rounds of {r['round_s']:g} s, mean rate {r['rate']:g} req/s, "
        f"{r['rounds']} rounds, seeds {seeds[0]}–{seeds[-1]}) of each process; the forecast "
        "(`collm_fl.policies.allocation.forecast_rate`) is updated with each round's rate and "
        f"scored on the next one, the first {r['warmup_rounds']} rounds unscored. *Loss*: the "
        f"pinball loss at quantile {q:g} (an under-forecast, which costs SLOs, weighs "
        f"{q / (1 - q):g}× an over-forecast, which costs training the backfill takes back), "
        "relative to the series' mean rate; MAE likewise; *regret* = loss / the least loss over "
        "the grid on that process. α weighs the newest report in the level, β the newest change "
        "of level in the trend; α = 1, β = 0 forecasts the last round's rate.",
        "",
        "| process | what | best (α/β) | its loss (MAE) | "
        + (f"default {default}: loss (MAE), regret | " if default else "")
        + ("last round's rate: loss (MAE), regret |" if last else ""),
        "|---|---|---|---:|" + ("---:|" if default else "") + ("---:|" if last else ""),
    ]
    for name, errs in loss.items():
        best = min(errs, key=lambda k: (errs[k], k))
        row = f"| {name} | {what[name]} | {best} | {errs[best]:.3f} ({mae[name][best]:.3f}) | "
        for k in (default, last):
            if k:
                row += f"{errs[k]:.3f} ({mae[name][k]:.3f}), {regrets[name][k]:.2f}× | "
        lines.append(row.rstrip())
    lines += [
        "",
        "The grid ranked by worst regret over the processes, the ten best"
        + (f" and the default {default}" if default else "")
        + ":",
        "",
        "| rank | α/β | worst regret | mean regret | regret by process |",
        "|---:|---|---:|---:|---|",
    ]
    shown = ranked[:10] + ([default] if default and default not in ranked[:10] else [])
    for k in shown:
        per = [regrets[n][k] for n in loss]
        by = ", ".join(f"{n} {regrets[n][k]:.2f}" for n in loss)
        lines.append(
            f"| {ranked.index(k) + 1} | {k}{' (default)' if k == default else ''} | "
            f"{worst[k]:.2f}× | {float(np.mean(per)):.2f}× | {by} |"
        )
    best = ranked[0]
    lines += [
        "",
        f"Least worst regret: {best} ({worst[best]:.2f}×)"
        + (
            f"; the default {default}: {worst[default]:.2f}×, rank {ranked.index(default) + 1} "
            f"of {len(ranked)}."
            if default
            else "."
        ),
        "",
        "![worst regret over the grid](forecast.png)",
        "",
    ]
    return "\n".join(lines)


def _plot(r: Mapping[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas: list[float] = r["alphas"]  # type: ignore[assignment]
    betas: list[float] = r["betas"]  # type: ignore[assignment]
    worst: dict[str, float] = r["worst_regret"]  # type: ignore[assignment]
    grid = np.array([[worst[_key(a, b)] for a in alphas] for b in betas])
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(alphas), 1.2 + 0.45 * len(betas)))
    shown = np.minimum(grid, 3.0)  # an inf or huge regret would wash out the scale
    im = ax.imshow(shown, origin="lower", cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas])
    ax.set_yticks(range(len(betas)), [f"{b:g}" for b in betas])
    ax.set_xlabel("α (level weight)")
    ax.set_ylabel("β (trend weight)")
    middle = (float(shown.min()) + float(shown.max())) / 2
    for (i, j), v in np.ndenumerate(grid):  # dark text on the light (low) cells
        color = "k" if shown[i, j] < middle else "w"
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color=color)
    default = r["default"]
    if default:
        a, b = (float(x) for x in str(default).split("/"))
        ax.add_patch(
            plt.Rectangle(
                (alphas.index(a) - 0.5, betas.index(b) - 0.5), 1, 1, fill=False, ec="red", lw=2
            )
        )
    ax.set_title("worst regret over the arrival processes (red: default)")
    fig.colorbar(im, ax=ax, label="loss / least loss (capped at 3)")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
