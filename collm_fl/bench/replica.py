"""Replica benchmarks: what co-executing serving and training on one base copy costs and saves.

Four measurements (each in its own module), run by :func:`run_replica_benchmarks` and written by
:func:`write_replica_report` as ``replica.json``, ``replica.md`` and ``replica_*.png``:

- ``swap`` (:mod:`.replica_swap`): inter-token gaps while adapter versions keep arriving, shadow
  swap vs stop-the-world reload vs merge/unmerge;
- ``memory`` (:mod:`.replica_memory`): RSS of one co-executing process vs separate training and
  serving processes;
- ``unmerged`` (:mod:`.replica_unmerged`): decode tokens/s with no adapter, unmerged, merged;
- ``interference`` (:mod:`.replica_interference`): serving throughput/latency with training off
  and on at several training shares.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NotRequired, TypedDict

from collm_fl.bench.aggregation import MachineInfo, code_note, machine_info, matmul_gflops
from collm_fl.bench.replica_decode import checkpoint_parameters
from collm_fl.bench.replica_interference import InterferenceBenchmark, measure_interference
from collm_fl.bench.replica_memory import MemoryBenchmark, measure_memory
from collm_fl.bench.replica_plots import plot_interference, plot_memory, plot_swap
from collm_fl.bench.replica_swap import SwapBenchmark, measure_swap_stall
from collm_fl.bench.replica_unmerged import UnmergedBenchmark, measure_unmerged_cost
from collm_fl.errors import ConfigError
from collm_fl.reports import write_text_atomic

log = logging.getLogger(__name__)

MEASUREMENTS = ("swap", "memory", "unmerged", "interference")
SHARED_LOAD = 0.5  # a 1-minute load average above this before the run: someone else was busy


class ReplicaMachine(TypedDict):
    info: MachineInfo
    load_avg_start: list[float]  # 1, 5, 15-minute load averages before the run
    load_avg_end: list[float]


class ReplicaBenchmarks(TypedDict):
    model: str
    params: int
    param_bytes: int
    quick: bool
    measurements: list[str]
    seconds: dict[str, float]  # wall time of each measurement
    machine: ReplicaMachine
    swap: NotRequired[SwapBenchmark]
    memory: NotRequired[MemoryBenchmark]
    unmerged: NotRequired[UnmergedBenchmark]
    interference: NotRequired[InterferenceBenchmark]


def run_replica_benchmarks(
    model: str = "smollm2-135m",
    which: Sequence[str] = MEASUREMENTS,
    quick: bool = False,
    progress: Callable[[str], None] | None = None,
) -> ReplicaBenchmarks:
    """Run the chosen measurements on ``model``; ``quick`` shrinks every one to a smoke run.

    The full sizes take about 10 minutes on 2 cores with smollm2-135m; ``quick`` takes about a
    minute with ``tiny`` (pass ``model="tiny"``: the model is never changed behind your back).
    """
    unknown = sorted(set(which) - set(MEASUREMENTS))
    if unknown or not which:
        raise ConfigError(f"unknown measurements {unknown or '(none)'}; choose from {MEASUREMENTS}")
    say = progress or (lambda line: log.info("%s", line))
    params, param_bytes = checkpoint_parameters(model)
    load_start = list(os.getloadavg())
    gflops_start = matmul_gflops()
    result = ReplicaBenchmarks(
        model=model,
        params=params,
        param_bytes=param_bytes,
        quick=quick,
        measurements=[m for m in MEASUREMENTS if m in which],
        seconds={},
        machine=ReplicaMachine(
            info=machine_info(gflops_start, gflops_start),
            load_avg_start=load_start,
            load_avg_end=[],
        ),
    )
    for name in result["measurements"]:
        started = time.perf_counter()
        if name == "swap":
            result["swap"] = (
                measure_swap_stall(model, 8, 1024, 1.0, 0.2, quiet_s=0.1, progress=say)
                if quick
                else measure_swap_stall(model, 8, 1024, 8.0, 0.5, quiet_s=2.0, progress=say)
            )
        elif name == "memory":
            result["memory"] = (
                measure_memory(model, train_steps=2, clients=1, max_tokens=8, progress=say)
                if quick
                else measure_memory(model, train_steps=3, clients=2, max_tokens=32, progress=say)
            )
        elif name == "unmerged":
            result["unmerged"] = (
                measure_unmerged_cost(model, (1, 8), steps=4, repeats=1, progress=say)
                if quick
                else measure_unmerged_cost(model, (1, 8), steps=24, repeats=3, progress=say)
            )
        else:
            result["interference"] = (
                measure_interference(model, clients=2, max_tokens=16, duration_s=1.0, progress=say)
                if quick
                else measure_interference(
                    model, clients=4, max_tokens=64, duration_s=25.0, progress=say
                )
            )
        result["seconds"][name] = time.perf_counter() - started
    result["machine"]["info"] = machine_info(gflops_start, matmul_gflops())
    result["machine"]["load_avg_end"] = list(os.getloadavg())
    return result


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f}"


def _machine_lines(result: ReplicaBenchmarks, note: str | None) -> list[str]:
    mach = result["machine"]
    info = mach["info"]
    load = ", ".join(f"{x:.1f}" for x in mach["load_avg_start"])
    lines = [
        f"Machine: {info['platform']}, {info['processor']}, {info['cpu_count']} CPUs, torch "
        f"{info['torch_version']} ({info['torch_threads']} threads in the main thread; each "
        f"measurement sets its own, see below), numpy {info['numpy_version']}; float32 matmul "
        f"probe {info['matmul_gflops_start']:.0f} GFLOP/s before, {info['matmul_gflops_end']:.0f} "
        f"after; load average (1/5/15 min) {load} before the run{code_note(info)}.",
        "",
        f"Model: `{result['model']}`, {result['params'] / 1e6:.1f}M parameters "
        f"({_mib(result['param_bytes'])} MiB in fp32). "
        + ("Quick (smoke) sizes. " if result["quick"] else "")
        + "Wall time: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in result["seconds"].items())
        + ".",
        "",
    ]
    if note:
        lines += [f"**Note:** {note}", ""]
    elif mach["load_avg_start"][0] >= SHARED_LOAD:
        lines += [
            "**Note:** other work was running on this machine when the run started (see the load "
            "average); timings are noisy.",
            "",
        ]
    return lines


def _swap_lines(r: SwapBenchmark) -> list[str]:
    lines = [
        "## Swap stall",
        "",
        f"{r['requests']} greedy requests of up to {r['max_tokens']} tokens decode together while "
        f"a new adapter version arrives every {r['interval_s']:g} s for {r['duration_s']:g} s "
        f"(after {r['quiet_s']:g} s without swaps). "
        f"Decode thread: {r['decode_threads']} torch thread; swap thread: {r['swap_threads']}. A "
        "gap is *in a swap* when it overlaps a swap's window; the decode step is the median gap "
        "outside swaps. Goal: no gap in a swap beyond a normal decode step.",
        "",
        "| method | swaps | swap op ms (p50 / max) | decode step ms | gaps in swaps ms "
        "(p50 / p99 / max) | gaps outside ms (p50 / p99 / max) | max gap in swaps / step |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in r["methods"]:
        i, o, s = m["in_swap"], m["outside"], m["swap_ms"]
        lines.append(
            f"| {m['method']} | {m['swaps']} | {s['p50_ms']:.1f} / {s['max_ms']:.1f} | "
            f"{m['decode_step_ms']:.1f} | {i['p50_ms']:.1f} / {i['p99_ms']:.1f} / "
            f"{i['max_ms']:.1f} | {o['p50_ms']:.1f} / {o['p99_ms']:.1f} / {o['max_ms']:.1f} | "
            f"{m['max_gap_over_step']:.2f} |"
        )
    lines += [
        "",
        "Shadow swap: `Replica.push_version` (validate, persist, shadow-load, promote) while "
        "the engine keeps stepping; running requests stay on the version they were admitted on. "
        "Baselines: the same batch in a plain decode loop over a `PeftModel` that pauses between "
        "two steps to `load_adapter` + `set_adapter` + `delete_adapter` (reload) or to "
        "`unmerge_adapter`, copy the new weights in, `merge_adapter` (merge/unmerge); those change "
        "the adapter under running requests.",
        "",
        "![inter-token gaps](replica_swap.png)",
        "",
    ]
    return lines


def _memory_lines(r: MemoryBenchmark) -> list[str]:
    return [
        "## Memory",
        "",
        f"Peak RSS (psutil, whole process) while serving a request stream and training "
        f"{r['train_steps']} LoRA steps (batch 4 x 128 tokens).",
        "",
        "| setup | RSS MiB |",
        "|---|---:|",
        f"| co-executing replica (serving + training, one process) | "
        f"{_mib(r['coexec_rss_bytes'])} |",
        f"| separate: serving replica (`--data none`) | {_mib(r['serving_rss_bytes'])} |",
        f"| separate: training process (PEFT + `train_lora`) | {_mib(r['training_rss_bytes'])} |",
        f"| **separate total** | **{_mib(r['separate_rss_bytes'])}** |",
        f"| for reference: base model parameters (fp32) | {_mib(r['param_bytes'])} |",
        f"| for reference: a process with the libraries imported, no model | "
        f"{_mib(r['runtime_rss_bytes'])} |",
        "",
        f"Separate / co-executing: **{r['separate_over_coexec']:.2f}x**; co-execution saves "
        f"{_mib(r['saved_bytes'])} MiB = {r['saved_over_param_bytes']:.2f} base-weight copies "
        "(the rest of the saving is the second Python/torch runtime). Requests served during the "
        f"measured phase: {r['serving_requests']}.",
        "",
        "![memory](replica_memory.png)",
        "",
    ]


def _unmerged_lines(r: UnmergedBenchmark) -> list[str]:
    lines = [
        "## Unmerged cost",
        "",
        f"Greedy decode tokens/s, {r['steps']} steps after the prefill, {r['threads']} torch "
        f"thread, best of {r['repeats']} interleaved runs. No adapter = the replica's model with "
        "every row on slot -1; unmerged = one serving slot; merged = PEFT `merge_and_unload`.",
        "",
        "| batch | no adapter tok/s | unmerged tok/s | merged tok/s | unmerged / no adapter "
        "| merged / no adapter |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['batch']} | {row['no_adapter_tok_s']:.1f} | {row['unmerged_tok_s']:.1f} | "
            f"{row['merged_tok_s']:.1f} | {row['unmerged_over_no_adapter']:.2f} | "
            f"{row['merged_over_no_adapter']:.2f} |"
        )
    return [*lines, ""]


def _interference_lines(r: InterferenceBenchmark) -> list[str]:
    lines = [
        "## Interference",
        "",
        f"{r['clients']} closed-loop clients, greedy requests of {r['max_tokens']} tokens, "
        f"{r['duration_s']:g} s per setting; training batch {r['train_batch_size']} x "
        f"{r['seq_len']} tokens. Thread budget: engine {r['engine_threads']} thread; trainer "
        f"{r['trainer_threads_serving']} while requests are present, {r['trainer_threads_idle']} "
        f"when idle. SLOs: TTFT {r['ttft_slo_s']:g} s, TPOT {r['tpot_slo_s']:g} s.",
        "",
        "| setting | serving tok/s | requests | TTFT ms (p50 / p99) | TPOT ms (p50 / p99) "
        "| train steps | train steps/s | guard yields |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['setting']} | {row['tokens_per_s']:.1f} | {row['requests']} | "
            f"{row['ttft_p50_ms']:.0f} / {row['ttft_p99_ms']:.0f} | {row['tpot_p50_ms']:.0f} / "
            f"{row['tpot_p99_ms']:.0f} | {row['train_steps']} | {row['train_steps_per_s']:.3f} | "
            f"{row['train_yields']} |"
        )
    return [*lines, "", "![interference](replica_interference.png)", ""]


def write_replica_report(
    result: ReplicaBenchmarks, out_dir: Path, command: str, note: str | None = None
) -> tuple[Path, Path]:
    """Write ``replica.json``, ``replica.md`` and the ``replica_*.png`` plots; return (json, md).

    ``note`` is printed at the top of the markdown (e.g. "the machine was shared").
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "replica.json", out_dir / "replica.md"
    payload: dict[str, object] = {"command": command, **result}
    if note:
        payload["note"] = note
    write_text_atomic(json_path, json.dumps(payload, indent=2) + "\n")
    lines = ["# Replica benchmarks", "", f"Command: `{command}`", ""]
    lines += _machine_lines(result, note)
    if "swap" in result:
        plot_swap(result["swap"], out_dir / "replica_swap.png")
        lines += _swap_lines(result["swap"])
    if "memory" in result:
        plot_memory(result["memory"], out_dir / "replica_memory.png")
        lines += _memory_lines(result["memory"])
    if "unmerged" in result:
        lines += _unmerged_lines(result["unmerged"])
    if "interference" in result:
        plot_interference(result["interference"], out_dir / "replica_interference.png")
        lines += _interference_lines(result["interference"])
    write_text_atomic(md_path, "\n".join(lines))
    return json_path, md_path
