"""Server learning rate: K clients × s parallel steps against one client running K·s steps.

At an equal step budget, averaging K clients that each ran s steps from the same start moves the
adapter far less than one client running all K·s steps in sequence (the goodput benchmark's
static split trains that way). A server step ``global + η·(aggregate − global)`` (FedOpt's server
learning rate) makes up the distance. This benchmark measures the held-out loss after every round
for the sequential reference and for the federated rounds at each η, with the goodput benchmark's
data, model, optimizer and aggregation (``aggregate_lora_exact``, also for the one sequential
update), in one process.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from collm_fl.adapters import AdapterState
from collm_fl.aggregation import aggregate_lora_exact
from collm_fl.bench.aggregation import code_note, machine_info, matmul_gflops
from collm_fl.central_eval import CentralEvaluator
from collm_fl.config import RunConfig
from collm_fl.data.partition import load_client_data
from collm_fl.data.tokenize import iterate_batches, tokenize_samples
from collm_fl.errors import ConfigError
from collm_fl.reports import write_text_atomic
from collm_fl.training import get_adapter_state, set_adapter_state, train_lora

log = logging.getLogger(__name__)

SEQUENTIAL = "sequential"


def run_server_lr_benchmark(
    model: str,
    clients: int,
    rounds: int,
    steps: int,
    server_lrs: Sequence[float],
    out_dir: Path,
    command: str,
    eval_samples: int = 8,
    progress: Callable[[str], None] | None = None,
) -> dict[str, object]:
    """Write ``server_lr.{json,md}`` to ``out_dir``; returns the JSON content."""
    say = progress or (lambda line: log.info("%s", line))
    if clients < 2 or rounds < 1 or steps < 1 or not server_lrs:
        raise ConfigError("need clients >= 2, rounds >= 1, steps >= 1 and at least one server lr")
    if any(not (0 < eta <= 16) for eta in server_lrs):
        raise ConfigError(f"server lrs must be in (0, 16], got {list(server_lrs)}")
    started = time.monotonic()
    gflops = matmul_gflops()
    cfg = RunConfig(model=model, central_eval_samples=eval_samples)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)  # the same version 0 as the goodput benchmark
        evaluator = CentralEvaluator(cfg)
    tokenizer, peft_model = evaluator.loaded.tokenizer, evaluator.model
    start = get_adapter_state(peft_model)
    parts = [
        tokenize_samples(
            load_client_data(cfg.data_spec, i, clients, tokenizer).train, tokenizer, cfg.seq_len
        )
        for i in range(clients)
    ]
    weights = [len(p) for p in parts]

    def train_from(state: Mapping[str, np.ndarray], batches: Iterator, n: int) -> AdapterState:
        set_adapter_state(peft_model, state)
        train_lora(peft_model, batches, n, cfg.learning_rate)
        return get_adapter_state(peft_model)

    curves: dict[str, list[float]] = {}
    base_loss = evaluator.evaluate(start).loss
    # Sequential: client 0 alone runs clients × steps per round (the static split's trainer).
    batches = iterate_batches(parts[0], cfg.batch_size, seed=cfg.seed)
    state, losses = start, [base_loss]
    for rnd in range(1, rounds + 1):
        update = train_from(state, batches, clients * steps)
        state = aggregate_lora_exact([update], [1.0])
        losses.append(evaluator.evaluate(state).loss)
        say(f"{SEQUENTIAL}: round {rnd} loss {losses[-1]:.4f}")
    curves[SEQUENTIAL] = losses
    for eta in server_lrs:
        its = [iterate_batches(p, cfg.batch_size, seed=cfg.seed) for p in parts]
        state, losses = start, [base_loss]
        for rnd in range(1, rounds + 1):
            updates = [train_from(state, it, steps) for it in its]
            state = aggregate_lora_exact(updates, weights, server_lr=eta, reference=state)
            losses.append(evaluator.evaluate(state).loss)
            say(f"server lr {eta:g}: round {rnd} loss {losses[-1]:.4f}")
        curves[f"{eta:g}"] = losses
    result: dict[str, object] = {
        "command": command,
        "model": model,
        "clients": clients,
        "rounds": rounds,
        "steps_per_client": steps,
        "learning_rate": cfg.learning_rate,
        "batch": [cfg.batch_size, cfg.seq_len],
        "eval_rows": int(evaluator.blocks.input_ids.shape[0]),
        "losses": curves,
        "machine": machine_info(gflops, matmul_gflops()),
        "seconds": time.monotonic() - started,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "server_lr.json", json.dumps(result, indent=2))
    write_text_atomic(out_dir / "server_lr.md", _markdown(result, curves, clients, steps, rounds))
    say(f"wrote {out_dir / 'server_lr.md'}")
    return result


def _markdown(
    result: Mapping[str, object],
    curves: Mapping[str, list[float]],
    clients: int,
    steps: int,
    rounds: int,
) -> str:
    seq = curves[SEQUENTIAL]
    lines = [
        "# Server learning rate: parallel clients vs one sequential trainer",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {_machine_text(result['machine'])}. "  # type: ignore[arg-type]
        f"Wall time {float(result['seconds']) / 60:.1f} min.",  # type: ignore[arg-type]
        "",
        f"`{result['model']}`, LoRA as in the run config, AdamW lr {result['learning_rate']} "
        f"(fresh each round), batch {result['batch'][0]} × {result['batch'][1]} tokens. Per round: "  # type: ignore[index]
        f"**sequential** = client 0 alone runs {clients * steps} steps; **η = x** = {clients} "
        f"clients (partitions of the Shakespeare plays) each run {steps} steps from the global "
        "adapter, aggregated with `aggregate_lora_exact` (weighted by rows) and the server step "
        "global + η·(aggregate − global). Held-out loss on the central set "
        f"({result['eval_rows']} rows of the two held-out plays), round 0 = the fresh adapter.",
        "",
        "| aggregation | " + " | ".join(f"round {r}" for r in range(rounds + 1)) + " | "
        "≤ sequential in every round |",
        "|---|" + "---:|" * (rounds + 1) + ":---:|",
    ]
    for name, losses in curves.items():
        label = name if name == SEQUENTIAL else f"η = {name}"
        never_worse = (
            "-"
            if name == SEQUENTIAL
            else (
                "yes"
                if all(a <= b + 1e-9 for a, b in zip(losses[1:], seq[1:], strict=True))
                else "no"
            )
        )
        lines.append(
            f"| {label} | " + " | ".join(f"{x:.4f}" for x in losses) + f" | {never_worse} |"
        )
    return "\n".join(lines) + "\n"


def _machine_text(m: Mapping[str, object]) -> str:
    return (
        f"{m['platform']}, {m['processor']}, {m['cpu_count']} CPUs, torch {m['torch_version']} "
        f"({m['torch_threads']} threads); float32 matmul probe "
        f"{float(m['matmul_gflops_start']):.0f} GFLOP/s before, "  # type: ignore[arg-type]
        f"{float(m['matmul_gflops_end']):.0f} after"  # type: ignore[arg-type]
        f"{code_note(m)}"
    )
