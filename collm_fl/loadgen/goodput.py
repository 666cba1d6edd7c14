"""Serving metrics of a load run, as pure functions of the per-request results.

Goodput counts what DistServe (Zhong et al., OSDI'24) counts: requests that meet *both* latency
SLOs — time to first token (TTFT) and time per output token (TPOT) — here per second of offered
load at one given rate (DistServe's headline figure is the highest rate a system sustains at a
target attainment; a ratio of these goodputs at one rate is a ratio of SLO-meeting requests).
Unlike throughput it does not reward a server for answering late. SLO attainment is the share of
*all* scheduled requests meeting both SLOs, so a failed, timed-out or dropped request is a miss.

Also here: the served-quality side of the co-located system — which adapter version was being served
at each moment, its held-out loss, and the time until that loss first reaches a target.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from collm_fl.errors import ConfigError
from collm_fl.loadgen.client import STATUS_DROPPED, STATUS_OK, RequestResult


@dataclass(frozen=True)
class SLOSpec:
    """Latency objectives a request must meet to count toward goodput."""

    ttft_s: float  # time to first token, seconds
    tpot_s: float  # time per output token after the first, seconds

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tpot_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(
                    f"{name}: an SLO must be a finite number of seconds > 0, got {value}"
                )


@dataclass(frozen=True)
class LoadSummary:
    """What a load run achieved; latency percentiles are over successful requests (None if none)."""

    duration_s: float  # the schedule's length: the denominator of every rate below
    requests: int  # all scheduled requests, dropped ones included
    ok: int
    errors: dict[str, int]  # status → count for every non-ok status ("http_503", "timeout", ...)
    slo_met: int
    slo_attainment: float  # slo_met / requests
    goodput_rps: float  # slo_met / duration_s
    throughput_rps: float  # ok / duration_s
    output_tokens_per_s: float  # output tokens of ok requests / duration_s
    ttft_p50_s: float | None
    ttft_p90_s: float | None
    ttft_p99_s: float | None
    tpot_p50_s: float | None
    tpot_p90_s: float | None
    tpot_p99_s: float | None
    e2e_p50_s: float | None
    e2e_p90_s: float | None
    e2e_p99_s: float | None
    adapter_versions: dict[str, int]  # ok requests per serving adapter version ("base" for none)
    # How far behind schedule the requests were sent (p99, max; None: none sent, or a summary
    # from before this was recorded). Well under the TTFT SLO: the generator kept its schedule.
    send_late_p99_s: float | None = None
    send_late_max_s: float | None = None
    # When the last request that was sent ended (answered, failed or timed out), in seconds after
    # the replay's start (None: none sent, or a summary from before this was recorded). Past
    # ``duration_s`` when the server fell behind: the rates above are per second of schedule.
    last_done_s: float | None = None

    @property
    def throughput_over_run_rps(self) -> float:
        """Successful requests per second until the last one ended (the schedule's length if it
        ended sooner): the rate the server answered at, where ``throughput_rps`` is per second
        of offered load."""
        return self.ok / max(self.duration_s, self.last_done_s or 0.0)


def meets_slo(result: RequestResult, slo: SLOSpec) -> bool:
    """Whether a request succeeded within both SLOs.

    Its TTFT is judged from when it was due (``late_s``, the load generator's own lag, added to
    the TTFT measured from its send): under open-loop load a request arrives at its scheduled
    time, and a generator that falls behind on a busy machine would otherwise credit the server
    with the lag. A one-token answer has no TPOT, so only its TTFT is judged.
    """
    if result.status != STATUS_OK or result.ttft_s is None:
        return False
    if result.ttft_s + result.late_s > slo.ttft_s:
        return False
    return result.tpot_s is None or result.tpot_s <= slo.tpot_s


def summarize_results(
    results: Sequence[RequestResult], slo: SLOSpec, duration_s: float
) -> LoadSummary:
    """Goodput, attainment, throughput and latency percentiles of one run over ``duration_s``."""
    if not (math.isfinite(duration_s) and duration_s > 0):
        raise ConfigError(f"duration_s: must be a finite number > 0, got {duration_s}")
    ok = [r for r in results if r.status == STATUS_OK]
    errors = dict(sorted(Counter(r.status for r in results if r.status != STATUS_OK).items()))
    met = sum(meets_slo(r, slo) for r in results)
    versions = Counter("base" if r.adapter_version is None else str(r.adapter_version) for r in ok)
    ttft = _percentiles([r.ttft_s for r in ok])
    tpot = _percentiles([r.tpot_s for r in ok])
    e2e = _percentiles([r.e2e_s for r in ok])
    sent_late = [r.late_s for r in results if r.status != STATUS_DROPPED]
    late = _percentiles(sent_late)
    return LoadSummary(
        duration_s=duration_s,
        requests=len(results),
        ok=len(ok),
        errors=errors,
        slo_met=met,
        slo_attainment=met / len(results) if results else 0.0,
        goodput_rps=met / duration_s,
        throughput_rps=len(ok) / duration_s,
        output_tokens_per_s=sum(r.output_tokens for r in ok) / duration_s,
        ttft_p50_s=ttft[0],
        ttft_p90_s=ttft[1],
        ttft_p99_s=ttft[2],
        tpot_p50_s=tpot[0],
        tpot_p90_s=tpot[1],
        tpot_p99_s=tpot[2],
        e2e_p50_s=e2e[0],
        e2e_p90_s=e2e[1],
        e2e_p99_s=e2e[2],
        adapter_versions=dict(sorted(versions.items())),
        send_late_p99_s=late[2],
        send_late_max_s=max(sent_late) if sent_late else None,
        last_done_s=max(ends) if (ends := _ends(results)) else None,
    )


def _ends(results: Sequence[RequestResult]) -> list[float]:
    """When each request that was sent ended, in seconds after the replay's start."""
    return [
        r.sent_at + r.e2e_s
        for r in results
        if r.status != STATUS_DROPPED and r.sent_at is not None and r.e2e_s is not None
    ]


def _percentiles(values: Sequence[float | None]) -> tuple[float | None, float | None, float | None]:
    """p50, p90, p99 (linear interpolation, NumPy's default) of the values that exist."""
    present = [v for v in values if v is not None]
    if not present:
        return None, None, None
    p50, p90, p99 = np.percentile(np.asarray(present, dtype=float), [50, 90, 99])
    return float(p50), float(p90), float(p99)


def slo_from_unloaded(ttft_unloaded_s: float, tpot_unloaded_s: float, factor: float) -> SLOSpec:
    """SLOs as ``factor`` times the latency the server shows when unloaded (one request at a time).

    Serving papers (DistServe's "SLO scale") set SLOs this way so that they mean the same on any
    hardware and model: ``factor`` = 1 asks for unloaded latency under load (unreachable at any real
    rate), 5 tolerates queueing and interference up to 5× the bare service time. Measure the
    unloaded TTFT and TPOT with a light run first (e.g. poisson at 0.2/s, one request at a time),
    then pass their medians.
    """
    if not (math.isfinite(factor) and factor >= 1.0):
        raise ConfigError(f"factor: must be a finite number >= 1, got {factor}")
    for name, value in (("ttft_unloaded_s", ttft_unloaded_s), ("tpot_unloaded_s", tpot_unloaded_s)):
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{name}: must be a finite number of seconds > 0, got {value}")
    return SLOSpec(ttft_s=ttft_unloaded_s * factor, tpot_s=tpot_unloaded_s * factor)


def time_to_quality(
    points: Sequence[tuple[float, float]], target_loss: float, tolerance: float = 0.0
) -> float | None:
    """The first time at which the served loss is at or below ``target_loss`` (within
    ``tolerance``; None: never).

    ``points`` are ``(time, served loss)`` pairs, in any order.
    """
    for t, loss in sorted(points):
        if loss <= target_loss + tolerance:
            return t
    return None


def served_quality_at(
    times: Sequence[float],
    version_switches: Sequence[tuple[float, int]],
    loss_by_version: Mapping[int, float],
) -> list[float]:
    """The held-out loss of the adapter version being served at each of ``times``.

    ``version_switches`` are ``(time, version)`` pairs: from that time on, ``version`` is served
    (put the base model first, under whatever version number ``loss_by_version`` gives it). A time
    before the first switch, or a served version without a loss, is a ConfigError: there is no
    right guess.
    """
    if not version_switches:
        raise ConfigError("version_switches: no version is ever served")
    switches = sorted(version_switches, key=lambda s: s[0])
    missing = sorted({v for _, v in switches} - set(loss_by_version))
    if missing:
        raise ConfigError(f"loss_by_version: no loss for served version(s) {missing}")
    starts = np.asarray([t for t, _ in switches], dtype=float)
    losses = [loss_by_version[v] for _, v in switches]
    at = np.searchsorted(starts, np.asarray(times, dtype=float), side="right") - 1
    if len(at) and int(at.min()) < 0:
        early = min(times)
        raise ConfigError(
            f"times: {early} is before the first version switch at {starts[0]}; "
            "add the base model as the first switch"
        )
    return [losses[int(i)] for i in at]
