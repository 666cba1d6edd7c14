"""Synthetic arrival processes for open-loop load: when each request is sent.

Every process has the same long-run mean rate (``rate`` requests per second), so runs that differ
only in ``kind`` offer the same load and differ in how bursty it is:

* ``poisson`` — exponential gaps (coefficient of variation 1), the usual serving benchmark default;
* ``bursty`` — gamma gaps with coefficient of variation ``cv`` (default 4): many short gaps, a few
  long ones; the same mean gap as Poisson;
* ``onoff`` — Poisson bursts: on for ``on_s`` at ``rate / duty``, off for ``off_s`` (duty =
  ``on_s / (on_s + off_s)``), starting with an on period. With a last partial cycle the bursts'
  rate is ``rate × duration / on time`` instead, so the schedule still offers ``rate`` (its bursts
  are then less intense than ``rate / duty``: 2× the rate over 10 s of 5/15-s cycles, not 4×);
* ``diurnal`` — a non-homogeneous Poisson process with rate ``rate * (1 + amplitude * sin(2πt /
  period_s))`` (amplitude default 0.8, period default the whole duration), drawn by thinning.

The mean rate is exact for ``diurnal`` over whole periods.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping

import numpy as np

from collm_fl.errors import ConfigError

log = logging.getLogger(__name__)

ARRIVAL_KINDS: tuple[str, ...] = ("poisson", "bursty", "onoff", "diurnal")
MAX_ARRIVALS = 5_000_000  # a schedule larger than this is a typo, not a benchmark

# The shape parameters each kind accepts, with their defaults (None: depends on the duration).
_SHAPE_DEFAULTS: dict[str, dict[str, float | None]] = {
    "poisson": {},
    "bursty": {"cv": 4.0},
    "onoff": {"on_s": 5.0, "off_s": 15.0},
    "diurnal": {"amplitude": 0.8, "period_s": None},
}


def arrival_times(
    kind: str, rate: float, duration_s: float, seed: int, **shape: float
) -> np.ndarray:
    """Sorted send offsets in seconds, in ``[0, duration_s)``, of the ``kind`` process at ``rate``.

    ``shape`` holds the kind's parameters (``cv``; ``on_s``/``off_s``; ``amplitude``/``period_s``);
    a parameter the kind does not take, or an invalid value, is a ConfigError naming it.
    """
    if kind not in _SHAPE_DEFAULTS:
        raise ConfigError(
            f"kind: unknown arrival process {kind!r}; expected one of {ARRIVAL_KINDS}"
        )
    _check_positive("rate", rate)
    _check_positive("duration_s", duration_s)
    if rate * duration_s > MAX_ARRIVALS:
        raise ConfigError(
            f"rate * duration_s = {rate * duration_s:.0f} requests exceeds {MAX_ARRIVALS}"
        )
    params = _resolve_shape(kind, shape)
    rng = np.random.default_rng(seed)
    if kind == "poisson":
        times = _renewal(duration_s, lambda n: rng.exponential(1.0 / rate, n), rate)
    elif kind == "bursty":
        k = 1.0 / params["cv"] ** 2  # gamma shape: CV² = 1/k; scale keeps the mean gap at 1/rate
        theta = 1.0 / (rate * k)
        # Started in its steady state, as if it had been running: the first arrival is the rest
        # of the gap under way at t = 0, uniform within a length-biased gap, Gamma(k + 1, θ).
        # (A gap drawn afresh would put a burst at t = 0 and (CV² − 1)/2 extra requests in
        # every run: 7.5 at CV 4.) Poisson needs none of this: its gaps are memoryless.
        first = float(rng.uniform() * rng.gamma(k + 1.0, theta))
        times = _renewal(duration_s, lambda n: rng.gamma(k, theta, n), rate, first)
    elif kind == "onoff":
        times = _onoff(rng, rate, duration_s, params["on_s"], params["off_s"])
    else:
        period = params.get("period_s", duration_s)
        times = _diurnal(rng, rate, duration_s, params["amplitude"], period)
    log.debug(
        "%s arrivals: %d in %.1fs (%.3f/s)", kind, len(times), duration_s, len(times) / duration_s
    )
    return times


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{name}: must be a finite number > 0, got {value!r}")


def _resolve_shape(kind: str, shape: Mapping[str, float]) -> dict[str, float]:
    defaults = _SHAPE_DEFAULTS[kind]
    unknown = sorted(set(shape) - set(defaults))
    if unknown:
        allowed = ", ".join(defaults) or "none"
        raise ConfigError(f"{unknown[0]}: not a parameter of {kind!r} arrivals (takes: {allowed})")
    params: dict[str, float] = {}
    for name, value in {**defaults, **shape}.items():
        if value is not None:
            params[name] = value
    for name in ("cv", "on_s", "period_s"):
        if name in params:
            _check_positive(name, params[name])
    if "off_s" in params:
        off = params["off_s"]
        if not (isinstance(off, int | float) and math.isfinite(off) and off >= 0):
            raise ConfigError(f"off_s: must be a finite number >= 0, got {off!r}")
    if "amplitude" in params:
        amp = params["amplitude"]
        if not (isinstance(amp, int | float) and 0.0 <= amp <= 1.0):
            raise ConfigError(f"amplitude: must be in [0, 1] (the rate stays >= 0), got {amp!r}")
    return params


def _renewal(
    duration_s: float,
    gaps: Callable[[int], np.ndarray],
    rate: float,
    first: float | None = None,
) -> np.ndarray:
    """Cumulative sums of i.i.d. gaps up to ``duration_s``, drawn in chunks (no per-event loop),
    from 0 or from a ``first`` arrival."""
    chunk = int(rate * duration_s * 1.1) + 64
    parts: list[np.ndarray] = [] if first is None else [np.array([first])]
    t = 0.0 if first is None else first
    while t < duration_s:
        times = t + np.cumsum(gaps(chunk))
        parts.append(times)
        t = float(times[-1])
    out = np.concatenate(parts)
    return out[out < duration_s]


def _onoff(
    rng: np.random.Generator, rate: float, duration_s: float, on_s: float, off_s: float
) -> np.ndarray:
    cycle = on_s + off_s
    full, rest = divmod(duration_s, cycle)
    on_time = full * on_s + min(rest, on_s)  # total on time inside the duration
    # rate / duty over whole cycles; a last partial cycle (mostly "on": it starts with its on
    # period) would otherwise offer more than ``rate`` over the duration (2x at 10 s of 5/15 s)
    burst_rate = rate * duration_s / on_time
    # Poisson arrivals on the concatenated on periods, then mapped back to wall-clock time.
    t_on = _renewal(on_time, lambda n: rng.exponential(1.0 / burst_rate, n), burst_rate)
    k, within = np.divmod(t_on, on_s)
    times = k * cycle + within
    return times[times < duration_s]


def _diurnal(
    rng: np.random.Generator, rate: float, duration_s: float, amplitude: float, period_s: float
) -> np.ndarray:
    peak = rate * (1.0 + amplitude)
    candidates = _renewal(duration_s, lambda n: rng.exponential(1.0 / peak, n), peak)
    intensity = rate * (1.0 + amplitude * np.sin(2.0 * np.pi * candidates / period_s))
    keep = rng.random(len(candidates)) * peak < intensity  # thinning (Lewis & Shedler)
    return candidates[keep]
