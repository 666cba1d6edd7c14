"""Replica metrics: Prometheus series for /metrics, and the load report a round's strategy reads.

The Prometheus registry is per replica (no module-level global), so tests can run several replicas
in one process. ``LoadWindow`` keeps the finished requests since the last report; the report is
what the quality-aware allocation uses to size the next round's training budget.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, replace

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


@dataclass(frozen=True)
class SLO:
    """Latency objectives of one replica (seconds)."""

    ttft_s: float = 2.0  # time to first token
    tpot_s: float = 0.2  # time per output token after the first

    def met(self, ttft: float | None, tpot: float | None) -> bool:
        return ttft is not None and ttft <= self.ttft_s and (tpot is None or tpot <= self.tpot_s)


@dataclass(frozen=True)
class RequestRecord:
    finished_at: float
    ttft: float | None
    tpot: float | None
    status: str  # "ok" | "error" | "cancelled" | "rejected"
    output_tokens: int
    waited_s: float | None = None  # a request cancelled before its first token: how long it waited


@dataclass(frozen=True)
class LoadReport:
    """Load since the previous report (what the server's allocation policy reads each round)."""

    window_s: float
    requests: int  # finished requests, those whose client left included
    request_rate: float  # finished requests per second
    rejected: int  # refused with 503 (queue full)
    queue_depth: int
    running: int
    ttft_p50: float
    ttft_p95: float
    ttft_p99: float
    tpot_p50: float
    tpot_p95: float
    tpot_p99: float
    slo_attainment: float  # share of judged requests meeting both SLOs (1.0 when none)
    output_tokens_per_s: float
    training_share: float
    training_steps: int
    serving_utilization: float  # share of the window the engine spent computing (0..1)

    def to_metrics(self, prefix: str = "load-") -> dict[str, float]:
        return {prefix + k.replace("_", "-"): float(v) for k, v in asdict(self).items()}


class LoadWindow:
    """Finished requests since the last :meth:`report` (bounded, thread-safe)."""

    def __init__(self, slo: SLO, max_records: int = 100_000) -> None:
        self.slo = slo
        self._lock = threading.Lock()
        self._records: deque[RequestRecord] = deque(maxlen=max_records)
        self._since = time.monotonic()
        self._busy_at_since = 0.0  # the engine's cumulative busy seconds at the window start
        self._steps_at_since = 0  # the trainer's cumulative steps at the window start
        self._overflowed = False  # older records of this window were dropped

    def add(self, record: RequestRecord) -> None:
        with self._lock:
            self._overflowed |= len(self._records) == self._records.maxlen
            self._records.append(record)

    def report(
        self,
        queue_depth: int,
        running: int,
        training_share: float,
        training_steps: int,
        reset: bool,
        serving_busy_s: float = 0.0,
    ) -> LoadReport:
        """Summary since the last reset. ``training_steps`` and ``serving_busy_s`` are the
        trainer's cumulative steps and the engine's cumulative busy time: the report has those
        of this window."""
        with self._lock:
            records = list(self._records)
            now = time.monotonic()
            window = max(now - self._since, 1e-9)
            busy = max(0.0, serving_busy_s - self._busy_at_since)
            steps = max(0, training_steps - self._steps_at_since)
            # Rates are per the time the kept records span: over a full window, the oldest ones
            # were dropped, and dividing what is left by the whole window would undercount.
            kept = max(now - records[0].finished_at, 1e-9) if self._overflowed else window
            if reset:
                self._records.clear()
                self._since = now
                self._busy_at_since = serving_busy_s
                self._steps_at_since = training_steps
                self._overflowed = False
        report = summarize(
            records,
            min(window, kept),
            self.slo,
            queue_depth,
            running,
            training_share,
            steps,
            min(1.0, busy / window),
        )
        return replace(report, window_s=window) if kept < window else report


def summarize(
    records: list[RequestRecord],
    window_s: float,
    slo: SLO,
    queue_depth: int,
    running: int,
    training_share: float,
    training_steps: int,
    serving_utilization: float = 0.0,
) -> LoadReport:
    """Pure summary of a window of finished requests.

    A request whose client left (``cancelled``) is load like any other. It is judged, as a miss,
    when its first token came after the TTFT SLO or it waited past that SLO without one (clients
    that give up on a slow replica are its SLO misses; a report without them would read overload
    as health), and its wait then enters the TTFT percentiles as the lower bound it is. One that
    left early with nothing late is not judged.
    """
    served = [r for r in records if r.status in ("ok", "error")]
    left = [r for r in records if r.status == "cancelled"]
    late_left = [t for t in (_first_token_or_wait(r) for r in left) if t > slo.ttft_s]
    ttfts = np.array([*(r.ttft for r in served if r.ttft is not None), *late_left], dtype=float)
    tpots = np.array([r.tpot for r in served if r.tpot is not None], dtype=float)

    def pct(a: np.ndarray, q: float) -> float:
        return float(np.percentile(a, q)) if a.size else 0.0

    ok = sum(1 for r in served if r.status == "ok" and slo.met(r.ttft, r.tpot))
    rejected = sum(1 for r in records if r.status == "rejected")
    judged = len(served) + len(late_left) + rejected
    finished = len(served) + len(left)
    return LoadReport(
        window_s=window_s,
        requests=finished,
        request_rate=finished / window_s,
        rejected=sum(1 for r in records if r.status == "rejected"),
        queue_depth=queue_depth,
        running=running,
        ttft_p50=pct(ttfts, 50),
        ttft_p95=pct(ttfts, 95),
        ttft_p99=pct(ttfts, 99),
        tpot_p50=pct(tpots, 50),
        tpot_p95=pct(tpots, 95),
        tpot_p99=pct(tpots, 99),
        slo_attainment=ok / judged if judged else 1.0,
        output_tokens_per_s=sum(r.output_tokens for r in (*served, *left)) / window_s,
        training_share=training_share,
        training_steps=training_steps,
        serving_utilization=serving_utilization,
    )


def _first_token_or_wait(r: RequestRecord) -> float:
    return r.ttft if r.ttft is not None else (r.waited_s or 0.0)


class ReplicaMetrics:
    """The Prometheus series one replica exports on /metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "collm_requests", "Finished requests by status", ["status"], registry=r
        )
        self.ttft = Histogram(
            "collm_ttft_seconds", "Time to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "collm_tpot_seconds", "Time per output token", buckets=TPOT_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "collm_e2e_seconds", "End-to-end latency", buckets=LATENCY_BUCKETS, registry=r
        )
        self.tokens = Counter("collm_generated_tokens", "Generated tokens", registry=r)
        self.queue_depth = Gauge("collm_queue_depth", "Requests waiting for admission", registry=r)
        self.running = Gauge("collm_running_requests", "Requests being decoded", registry=r)
        self.tokens_per_s = Gauge("collm_tokens_per_second", "Decode tokens/s (recent)", registry=r)
        self.prefill_fixed_s = Gauge(
            "collm_prefill_fixed_seconds", "Fitted prefill seconds per forward", registry=r
        )
        self.prefill_s_per_token = Gauge(
            "collm_prefill_seconds_per_token", "Fitted prefill seconds per padded token", registry=r
        )
        self.served_version = Gauge(
            "collm_served_adapter_version", "Version new requests get", registry=r
        )
        self.training_share = Gauge(
            "collm_training_share", "Compute share given to training", registry=r
        )
        self.training_steps = Counter(
            "collm_training_steps", "Training micro-steps run", registry=r
        )
        self.training_tokens = Counter("collm_training_tokens", "Tokens trained on", registry=r)
        self.swaps = Counter("collm_adapter_swaps", "Adapter promotions", ["result"], registry=r)
        self.swap_seconds = Histogram(
            "collm_swap_seconds", "Load+validate+promote time of a new adapter", registry=r
        )

    def observe_request(self, record: RequestRecord, e2e: float | None) -> None:
        self.requests.labels(record.status).inc()
        if record.ttft is not None:
            self.ttft.observe(record.ttft)
        if record.tpot is not None:
            self.tpot.observe(record.tpot)
        if e2e is not None:
            self.e2e.observe(e2e)
        self.tokens.inc(record.output_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
