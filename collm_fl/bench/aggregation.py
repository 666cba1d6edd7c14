"""Aggregation benchmark: speed and accuracy of FedAvg vs exact LoRA aggregation at 7B shapes.

Builds synthetic client updates shaped like a 7B model's q/v adapters, times both aggregation modes
and measures how far each lands from the dense weighted sum ``Σ_k p_k B_k A_k`` it stands in for,
next to the best any rank-r adapter can do (truncated SVD of the dense sum).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypedDict

import numpy as np
import torch

from collm_fl.adapters import LORA_A_SUFFIX, LORA_B_SUFFIX, AdapterState, lora_pairs
from collm_fl.aggregation import (
    ComputeDtype,
    aggregate_lora_exact,
    aggregate_lora_fedavg,
    dense_lora_sum,
)
from collm_fl.errors import ConfigError
from collm_fl.reports import write_text_atomic

log = logging.getLogger(__name__)

EXACT_DTYPES: tuple[ComputeDtype, ...] = ("float32", "float64")


class BenchmarkRow(TypedDict):
    clients: int
    mode: str  # "fedavg", "exact-float32", "exact-float64"
    seconds: float  # wall time of one aggregation over all modules
    rel_error_mean: float  # ‖approx − dense‖_F / ‖dense‖_F, mean over the sampled modules
    rel_error_max: float
    optimal_rel_error_mean: float  # same for the truncated SVD of the dense sum (best rank r)
    excess_over_optimal_mean: float  # mean of (rel_error − optimal) per module; 0 = optimal


class MachineInfo(TypedDict):
    platform: str
    processor: str
    cpu_count: int
    torch_version: str
    torch_threads: int
    numpy_version: str
    matmul_gflops_start: float  # CPU speed probe before the run (shared VMs drift)
    matmul_gflops_end: float  # and after it; a large gap means the timings are noisy
    code: str  # the commit of the collm_fl that ran (code_version)


class AggregationBenchmark(TypedDict):
    layers: int
    d: int
    rank: int
    targets: list[str]
    modules: int
    seed: int
    client_noise: float
    error_modules: list[str]
    error_note: str
    data_note: str
    rows: list[BenchmarkRow]
    machine: MachineInfo


def matmul_gflops(n: int = 1024, repeats: int = 5) -> float:
    """Best-of-``repeats`` float32 matmul throughput: a probe of how fast the CPU is right now."""
    x = torch.randn(n, n)  # (n, n)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(x, x)  # (n, n)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e9


def machine_info(gflops_start: float, gflops_end: float, code: str | None = None) -> MachineInfo:
    """What the numbers were measured on; ``code``: the commit the run started on (default: now,
    :func:`code_version`; a long run should take it at its start, as its processes load the code
    when they start)."""
    return MachineInfo(
        platform=platform.platform(),
        processor=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count() or 0,
        torch_version=torch.__version__,
        torch_threads=torch.get_num_threads(),
        numpy_version=np.__version__,
        matmul_gflops_start=gflops_start,
        matmul_gflops_end=gflops_end,
        code=code if code is not None else code_version(),
    )


def code_note(info: Mapping[str, object]) -> str:
    """``; collm_fl at commit …`` for a machine line (empty for a report written before the
    commit was recorded)."""
    code = info.get("code")
    return f"; collm_fl at commit {code}" if code else ""


def code_version() -> str:
    """The git commit of the ``collm_fl`` package that is running, ``+changes`` when the package
    has uncommitted changes; ``unknown`` outside a git checkout (an installed wheel)."""
    here = Path(__file__).resolve().parents[1]  # the package (its bench/ folder alone missed
    # a change to the gateway the benchmark runs)

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(here), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short=7", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}+changes" if changed else commit


def _module_names(layers: int, targets: Sequence[str]) -> list[str]:
    return [
        f"base_model.model.model.layers.{i}.self_attn.{t}" for i in range(layers) for t in targets
    ]


def synthetic_updates(
    n_clients: int,
    modules: Sequence[str],
    d: int,
    rank: int,
    seed: int,
    client_noise: float = 1.0,
) -> list[AdapterState]:
    """Client states that share a common component plus client-specific noise.

    A ~ N(0, 1/d_in) and B ~ N(0, 0.01²) for both parts, the client part scaled by ``client_noise``.
    Purely independent clients would make the sum close to full rank K·r with a flat spectrum, and
    identical clients would make every method exact; the mix gives a meaningful truncation error.
    """
    rng = np.random.default_rng(seed)
    a_std, b_std = np.float32(1.0 / np.sqrt(d)), np.float32(0.01)
    shared = {
        m: (
            rng.standard_normal((rank, d), dtype=np.float32) * a_std,  # (r, d_in)
            rng.standard_normal((d, rank), dtype=np.float32) * b_std,  # (d_out, r)
        )
        for m in modules
    }
    updates: list[AdapterState] = []
    for _ in range(n_clients):
        state: AdapterState = {}
        for m, (a_s, b_s) in shared.items():
            noise_a = rng.standard_normal((rank, d), dtype=np.float32)  # (r, d_in)
            noise_b = rng.standard_normal((d, rank), dtype=np.float32)  # (d_out, r)
            state[m + LORA_A_SUFFIX] = a_s + noise_a * (client_noise * a_std)
            state[m + LORA_B_SUFFIX] = b_s + noise_b * (client_noise * b_std)
        updates.append(state)
    return updates


def _rel_errors(
    approx: AdapterState, dense: dict[str, np.ndarray], modules: Sequence[str]
) -> list[float]:
    pairs = lora_pairs(approx)
    out = []
    for m in modules:
        a, b = pairs[m]
        diff = b.astype(np.float64) @ a.astype(np.float64) - dense[m]  # (d_out, d_in)
        out.append(float(np.linalg.norm(diff) / np.linalg.norm(dense[m])))
    return out


def _optimal_rel_error(dense: np.ndarray, rank: int) -> float:
    """Relative error of the best rank-r approximation, from the singular values alone."""
    s = np.linalg.svd(dense, compute_uv=False)  # (min(d_out, d_in),)
    return float(np.sqrt(np.sum(s[rank:] ** 2) / np.sum(s**2)))


def _row(
    clients: int, mode: str, seconds: float, errs: list[float], opt: list[float]
) -> BenchmarkRow:
    return BenchmarkRow(
        clients=clients,
        mode=mode,
        seconds=seconds,
        rel_error_mean=float(np.mean(errs)),
        rel_error_max=float(np.max(errs)),
        optimal_rel_error_mean=float(np.mean(opt)),
        excess_over_optimal_mean=float(np.mean(np.subtract(errs, opt))),
    )


def run_aggregation_benchmark(
    client_counts: Sequence[int] = (10, 100),
    layers: int = 32,
    d: int = 4096,
    rank: int = 16,
    targets: Sequence[str] = ("q_proj", "v_proj"),
    seed: int = 0,
    error_modules: int = 4,
    progress: Callable[[str], None] | None = None,
    client_noise: float = 1.0,
) -> AggregationBenchmark:
    """Time FedAvg and exact aggregation and measure their error vs the dense sum.

    One repetition per (client count, mode). Clients for the smaller counts are the first ones of
    the largest set. Errors are measured on ``error_modules`` randomly sampled modules only.
    """
    if not client_counts or min(client_counts) < 1:
        raise ConfigError(f"--clients must be positive counts, got {list(client_counts)}")
    for name, value in (("--layers", layers), ("--dim", d), ("--rank", rank)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if rank > d:
        raise ConfigError(f"--rank ({rank}) must not exceed --dim ({d})")
    say = progress or (lambda line: log.info("%s", line))
    modules = _module_names(layers, targets)
    rng = np.random.default_rng(seed + 1)
    n_err = min(error_modules, len(modules))
    sampled = sorted(str(m) for m in rng.choice(modules, size=n_err, replace=False))
    k_max = max(client_counts)
    gflops_start = matmul_gflops()
    say(f"generating {k_max} clients x {len(modules)} modules (d={d}, r={rank})")
    updates = synthetic_updates(k_max, modules, d, rank, seed, client_noise)
    all_weights = rng.integers(50, 500, size=k_max).astype(np.float64)  # examples per client
    rows: list[BenchmarkRow] = []
    for k in client_counts:
        clients, weights = updates[:k], all_weights[:k].tolist()
        say(f"[{k} clients] dense reference on {n_err} sampled modules")
        sampled_states = [
            {key: u[key] for m in sampled for key in (m + LORA_A_SUFFIX, m + LORA_B_SUFFIX)}
            for u in clients
        ]
        dense = dense_lora_sum(sampled_states, weights)
        opt = [_optimal_rel_error(dense[m], rank) for m in sampled]
        say(f"[{k} clients] fedavg")
        t0 = time.perf_counter()
        avg = aggregate_lora_fedavg(clients, weights)
        seconds = time.perf_counter() - t0
        rows.append(_row(k, "fedavg", seconds, _rel_errors(avg, dense, sampled), opt))
        say(f"[{k} clients] fedavg: {seconds:.2f} s")
        for dtype in EXACT_DTYPES:
            say(f"[{k} clients] exact ({dtype})")
            t0 = time.perf_counter()
            ex = aggregate_lora_exact(clients, weights, rank, compute_dtype=dtype)
            seconds = time.perf_counter() - t0
            rows.append(_row(k, f"exact-{dtype}", seconds, _rel_errors(ex, dense, sampled), opt))
            say(f"[{k} clients] exact ({dtype}): {seconds:.2f} s")
    return AggregationBenchmark(
        layers=layers,
        d=d,
        rank=rank,
        targets=list(targets),
        modules=len(modules),
        seed=seed,
        client_noise=client_noise,
        error_modules=sampled,
        error_note=(
            f"errors are measured on {n_err} of {len(modules)} modules (sampled): forming each "
            f"{d}x{d} dense sum and its SVD takes seconds per module, too slow for all of them"
        ),
        data_note=(
            "synthetic: per module a shared A~N(0,1/d_in), B~N(0,0.01^2) plus per-client noise "
            f"of {client_noise}x that scale; weights = random example counts in [50, 500)"
        ),
        rows=rows,
        machine=machine_info(gflops_start, matmul_gflops()),
    )


def write_benchmark_report(
    result: AggregationBenchmark, out_dir: Path, command: str
) -> tuple[Path, Path]:
    """Write ``aggregation.json`` and ``aggregation.md`` into ``out_dir``; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "aggregation.json", out_dir / "aggregation.md"
    write_text_atomic(json_path, json.dumps({"command": command, **result}, indent=2) + "\n")
    mach = result["machine"]
    lines = [
        "# LoRA aggregation benchmark",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {mach['platform']}, {mach['processor']}, {mach['cpu_count']} CPUs, "
        f"torch {mach['torch_version']} ({mach['torch_threads']} threads), "
        f"numpy {mach['numpy_version']}; float32 matmul probe {mach['matmul_gflops_start']:.0f} "
        f"GFLOP/s before, {mach['matmul_gflops_end']:.0f} after{code_note(mach)}",
        "",
        f"Shapes: {result['layers']} layers x {result['targets']} = {result['modules']} modules, "
        f"d={result['d']}, rank={result['rank']}.",
        "",
        "| clients | mode | seconds | rel. error vs dense (mean / max) | optimal rank-r error "
        "| excess over optimal |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['clients']} | {row['mode']} | {row['seconds']:.2f} | "
            f"{row['rel_error_mean']:.6f} / {row['rel_error_max']:.6f} | "
            f"{row['optimal_rel_error_mean']:.6f} | {row['excess_over_optimal_mean']:.1e} |"
        )
    lines += [
        "",
        "Errors are ‖B A − Σ p_k B_k A_k‖_F / ‖Σ p_k B_k A_k‖_F (LoRA scale excluded; it factors "
        "out). The optimal error is that of the truncated SVD of the dense sum; the excess is the "
        "mean per-module difference to it. Seconds are one wall-clock run of the whole adapter.",
        "",
        f"Note: {result['error_note']}.",
        "",
        f"Data: {result['data_note']}.",
        "",
    ]
    write_text_atomic(md_path, "\n".join(lines))
    return json_path, md_path
