"""Soak test: the gateway and its replicas at and above capacity, with hundreds of adapter swaps.

Bounded in time and count, loopback only. It checks what an operator cares about under load:
every request gets a response or an explicit 503 (no hangs, no other errors), memory stays flat
across many swaps (RSS at the end of each load phase and its slope over the phase's second half:
a leak keeps growing at a steady load, a high-water mark does not; going back to 1× after 2× tells
them apart), and how many requests of each kind there were. Writes ``soak.json``, ``soak.md`` and
``soak_rss.png``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import platform
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil

from collm_fl.adapters import LoraSpec
from collm_fl.launch import LocalFederation
from collm_fl.loadgen.arrivals import arrival_times
from collm_fl.loadgen.client import RequestResult, build_requests, replay
from collm_fl.replica.control_client import ReplicaClient, ReplicaUnavailable
from collm_fl.reports import save_figure, write_text_atomic

log = logging.getLogger(__name__)


def run_soak(
    model: str = "tiny",
    replicas: int = 2,
    duration_s: float = 240.0,
    load_factors: tuple[float, ...] = (1.0, 2.0),
    swap_every_s: float = 0.5,
    output_tokens: int = 16,
    progress: Callable[[str], None] | None = None,
) -> dict[str, object]:
    """Calibrate capacity, then run each load factor × capacity for an equal share of the time."""
    say = progress or (lambda _: None)
    with tempfile.TemporaryDirectory(prefix="collm-soak-") as tmp:
        fed = LocalFederation(
            Path(tmp),
            num_replicas=replicas,
            model=model,
            with_flower=False,
            replica_args=("--data", "none", "--max-queue", "32"),
        )
        with fed:
            url, gateway = fed.start_gateway()
            procs = {f"replica{n.index}": psutil.Process(n.process.popen.pid) for n in fed.replicas}
            procs["gateway"] = psutil.Process(gateway.popen.pid)

            capacity = _calibrate(url, model, output_tokens)
            say(f"capacity ≈ {capacity:.2f} req/s (closed loop, {output_tokens} output tokens)")
            rss: list[tuple[float, str, float]] = []
            swaps = _Swapper(fed, model, swap_every_s)
            started = time.monotonic()
            sampler = threading.Thread(
                target=_sample_rss, args=(procs, rss, swaps.stop, started), daemon=True
            )
            swaps.start()
            sampler.start()
            phases = []
            bounds: list[tuple[float, float]] = []  # (start, end) of each phase, since `started`
            try:
                for factor in load_factors:
                    rate = capacity * factor
                    phase_s = duration_s / len(load_factors)
                    say(f"phase: {factor:.1f}× capacity = {rate:.2f} req/s for {phase_s:.0f}s")
                    t_phase = time.monotonic() - started
                    results = _run_phase(url, model, rate, phase_s, output_tokens)
                    bounds.append((t_phase, time.monotonic() - started))
                    phases.append(_phase_summary(factor, rate, phase_s, results))
                    say(f"  {phases[-1]['counts']}, {swaps.done} swaps so far")
            finally:
                swaps.stop.set()
                swaps.join()
                sampler.join(timeout=10)
            healthy = all(n.process.alive() for n in fed.replicas) and gateway.alive()
            elapsed = time.monotonic() - started
    return {
        "model": model,
        "replicas": replicas,
        "duration_s": elapsed,
        "capacity_rps": capacity,
        "phases": phases,
        "swaps": swaps.done,
        "swap_errors": swaps.errors,
        "rss": _rss_summary(rss, bounds),
        "phase_bounds_s": bounds,
        "rss_samples": rss,
        "all_processes_alive": healthy,
        "machine": {"platform": platform.platform(), "cpus": psutil.cpu_count()},
    }


def _calibrate(url: str, model: str, output_tokens: int, seconds: float = 15.0) -> float:
    """Closed-loop throughput with 8 concurrent clients: the capacity estimate."""
    offsets = np.zeros(8)
    n_done = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        reqs = build_requests(offsets, 32, output_tokens)
        results = asyncio.run(replay(url, model, reqs, timeout_s=60))
        n_done += sum(1 for r in results if r.status == "ok")
    return max(n_done / (time.monotonic() - t0), 0.1)


def _run_phase(
    url: str, model: str, rate: float, seconds: float, output_tokens: int
) -> list[RequestResult]:
    offsets = arrival_times("poisson", rate, seconds, seed=int(rate * 1000) % 9973)
    reqs = build_requests(offsets, 32, output_tokens)
    return asyncio.run(replay(url, model, reqs, timeout_s=120, max_in_flight=1024))


def _phase_summary(
    factor: float, rate: float, seconds: float, results: list[RequestResult]
) -> dict[str, object]:
    counts = Counter(r.status for r in results)
    # "dropped" = never sent: the load generator's own in-flight cap, not a server answer.
    unexplained = sum(n for s, n in counts.items() if s not in ("ok", "http_503", "dropped"))
    return {
        "load_factor": factor,
        "rate_rps": rate,
        "seconds": seconds,
        "requests": len(results),
        "counts": dict(counts),
        "unexplained_failures": unexplained,  # neither a response nor an explicit 503
        "versions_seen": sorted(
            {r.adapter_version for r in results if r.adapter_version is not None}
        ),
    }


class _Swapper(threading.Thread):
    """Pushes a new random adapter version to every replica every ``every_s`` seconds."""

    def __init__(self, fed: LocalFederation, model: str, every_s: float) -> None:
        super().__init__(name="collm-soak-swapper", daemon=True)
        self.fed, self.every_s = fed, every_s
        self.stop = threading.Event()
        self.done = 0
        self.errors: list[str] = []
        self.spec = LoraSpec()
        self.peft_config = self.spec.to_peft_config_dict(model)

    def run(self) -> None:
        clients = [
            ReplicaClient(n.control_address, self.fed.control_token, 60) for n in self.fed.replicas
        ]
        shapes = _adapter_shapes(clients[0])
        rng = np.random.default_rng(0)
        version = 0
        try:
            while not self.stop.wait(self.every_s):
                version += 1
                state = {
                    k: (rng.standard_normal(s) * 0.01).astype(np.float32) for k, s in shapes.items()
                }
                for c in clients:
                    try:
                        c.push_version(state, self.peft_config, version, run="soak")
                        # As the federation's publish does: the load window restarts with each
                        # version (unread, it holds up to 100,000 request records, ~25 MiB).
                        c.load_report(reset=True)
                        self.done += 1
                    except ReplicaUnavailable as e:
                        self.errors.append(str(e)[:200])
        finally:
            for c in clients:
                c.close()


def _adapter_shapes(client: ReplicaClient) -> dict[str, tuple[int, ...]]:
    """Shapes of the replica's adapter keys, read from a training-free status call."""
    status = client.status()
    shapes = status.get("adapter_shapes")
    if not isinstance(shapes, dict):
        raise ReplicaUnavailable("replica status has no adapter_shapes")
    return {str(k): tuple(int(d) for d in v) for k, v in shapes.items()}


def _sample_rss(
    procs: dict[str, psutil.Process],
    out: list[tuple[float, str, float]],
    stop: threading.Event,
    t0: float,
) -> None:
    while not stop.wait(2.0):
        for name, p in procs.items():
            try:
                out.append((time.monotonic() - t0, name, p.memory_info().rss / 2**20))
            except psutil.Error:
                continue


def _slope_mib_per_min(pts: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MiB) points in MiB/min (0 with fewer than 3 points)."""
    if len(pts) < 3:
        return 0.0
    ts, ms = np.array([t for t, _ in pts]), np.array([m for _, m in pts])
    return float(np.polyfit(ts, ms, 1)[0] * 60)


def _rss_summary(
    samples: list[tuple[float, str, float]], bounds: list[tuple[float, float]]
) -> dict[str, dict[str, object]]:
    """Per process: first, peak and last RSS (MiB), the slope over the second half of the run,
    and per load phase (``bounds``: its start and end second) the RSS at its end and the slope over
    its second half (MiB/min), where the allocator's high-water mark for that load is reached."""
    out: dict[str, dict[str, object]] = {}
    for name in sorted({n for _, n, _ in samples}):
        pts = [(t, m) for t, n, m in samples if n == name]
        phases = []
        for start, end in bounds:
            mid = (start + end) / 2
            inside = [(t, m) for t, m in pts if start <= t <= end]
            phases.append(
                {
                    "end_mib": inside[-1][1] if inside else 0.0,
                    "slope_mib_per_min": _slope_mib_per_min([p for p in inside if p[0] >= mid]),
                }
            )
        out[name] = {
            "first_mib": pts[0][1] if pts else 0.0,
            "peak_mib": max((m for _, m in pts), default=0.0),
            "last_mib": pts[-1][1] if pts else 0.0,
            "slope_second_half_mib_per_min": _slope_mib_per_min(pts[len(pts) // 2 :]),
            "phases": phases,
        }
    return out


def write_soak_report(result: dict[str, object], out_dir: Path, command: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "soak.json", json.dumps(result, indent=2))
    lines = [
        "# Soak: gateway + replicas at and above capacity, with adapter swaps",
        "",
        f"Model `{result['model']}`, {result['replicas']} replicas behind `collm gateway`, "
        f"{result['duration_s']:.0f} s, capacity ≈ {result['capacity_rps']:.2f} req/s "
        f"(closed loop), {result['swaps']} adapter swaps ({len(result['swap_errors'])} failed), "  # type: ignore[arg-type]
        f"all processes alive at the end: {result['all_processes_alive']}.",
        "",
        "| load | rate (req/s) | scheduled | not sent (client cap) | ok | 503 | other failures "
        "| versions served |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in result["phases"]:  # type: ignore[attr-defined]
        counts = p["counts"]
        lines.append(
            f"| {p['load_factor']:.1f}× | {p['rate_rps']:.2f} | {p['requests']} | "
            f"{counts.get('dropped', 0)} | {counts.get('ok', 0)} | {counts.get('http_503', 0)} | "
            f"{p['unexplained_failures']} | {len(p['versions_seen'])} |"
        )
    factors = [f"{p['load_factor']:.1f}×" for p in result["phases"]]  # type: ignore[attr-defined]
    lines += [
        "",
        "RSS in MiB; per phase, at its end and (in brackets) the slope over its second half in "
        "MiB/min.",
        "",
        "| process | first | peak | last | "
        + " | ".join(f"phase {k + 1} ({f})" for k, f in enumerate(factors))
        + " |",
        "|---|---:|---:|---:|" + "---:|" * len(factors),
    ]
    for name, r in result["rss"].items():  # type: ignore[attr-defined]
        cells = [f"{p['end_mib']:.0f} ({p['slope_mib_per_min']:+.2f})" for p in r["phases"]]
        lines.append(
            f"| {name} | {r['first_mib']:.0f} | {r['peak_mib']:.0f} | {r['last_mib']:.0f} | "
            + " | ".join(cells)
            + " |"
        )
    lines += [
        "",
        "Every request the load generator sent got a response or an explicit 503 when *other "
        "failures* is 0. *Not sent* counts requests the load generator itself skipped because "
        "1,024 of its requests were already in flight (its own cap, on the same 2 cores).",
        "",
        f"Command: `{command}`  ",
        f"Machine: {result['machine']}",
        "",
    ]
    md = out_dir / "soak.md"
    write_text_atomic(md, "\n".join(lines))
    _plot(result, out_dir / "soak_rss.png")
    return md


def _plot(result: dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["rss_samples"]
    assert isinstance(samples, list)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name in sorted({n for _, n, _ in samples}):
        pts = [(t, m) for t, n, m in samples if n == name]
        ax.plot([t for t, _ in pts], [m for _, m in pts], label=name)
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title("memory under load with adapter swaps")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
