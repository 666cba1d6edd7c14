"""Unmerged cost: decode tokens/s with no adapter, an unmerged adapter slot, and a merged adapter.

All three run the same decode loop (:class:`GreedyDecoder`, one torch thread, like the replica's
engine thread) on the same prompts:

- ``no-adapter``: the replica's model (multi-LoRA layers injected) with every row on slot -1;
- ``unmerged``: the same model with every row on one serving slot holding a random adapter;
- ``merged``: a second copy of the base with the same adapter merged into its weights by PEFT
  (``merge_and_unload``), i.e. the plain architecture with different weights.

Each configuration is timed ``repeats`` times, interleaved (rotating the order), after an untimed
warm-up; the ratios use the best run of each (the least disturbed one on a shared machine).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TypedDict

import torch
from torch import nn

from collm_fl.adapters import LoraSpec
from collm_fl.bench.replica_decode import (
    GreedyDecoder,
    prompt_ids,
    random_adapter_state,
    run_in_thread,
)
from collm_fl.models import load_base_model
from collm_fl.replica.lora_layers import NO_SLOT, inject_multi_lora, lora_context, serve
from collm_fl.training import attach_lora, set_adapter_state

log = logging.getLogger(__name__)

CONFIGS = ("no-adapter", "unmerged", "merged")
WARMUP_STEPS = 4


class UnmergedRow(TypedDict):
    batch: int
    no_adapter_tok_s: float  # best of the repeats
    unmerged_tok_s: float
    merged_tok_s: float
    unmerged_over_no_adapter: float  # tokens/s ratio (< 1: the unmerged adapter costs time)
    merged_over_no_adapter: float
    samples_tok_s: dict[str, list[float]]  # every repeat, per configuration


class UnmergedBenchmark(TypedDict):
    steps: int  # timed decode steps per run (after the prefill)
    repeats: int
    threads: int
    rows: list[UnmergedRow]


def _decode_tokens_per_s(
    model: nn.Module,
    prompts: list[list[int]],
    pad_id: int,
    steps: int,
    context: Callable[[], AbstractContextManager[None]] | None,
) -> float:
    """Tokens/s of ``steps`` batched decode steps (the prefill is not timed)."""

    def work() -> float:
        with torch.inference_mode():
            decoder = GreedyDecoder(model, prompts, pad_id, context)
            decoder.prefill()
            started = time.perf_counter()
            for _ in range(steps):
                decoder.step()
            return decoder.batch_size * steps / (time.perf_counter() - started)

    return run_in_thread(work, 1, "bench-decode")


def _serving(slots: list[int]) -> Callable[[], AbstractContextManager[None]]:
    """A forward context that serves every batch row from ``slots`` (-1: no adapter)."""
    return lambda: lora_context(serve(slots))


def measure_unmerged_cost(
    model: str = "smollm2-135m",
    batch_sizes: Sequence[int] = (1, 8),
    steps: int = 32,
    repeats: int = 3,
    spec: LoraSpec | None = None,
    progress: Callable[[str], None] | None = None,
) -> UnmergedBenchmark:
    """Decode tokens/s of the base, an unmerged adapter and a merged adapter, per batch size."""
    if steps < 1 or repeats < 1 or not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"steps {steps}, repeats {repeats}, batch sizes {list(batch_sizes)}")
    say = progress or (lambda line: log.info("%s", line))
    spec = spec or LoraSpec()
    served = load_base_model(model)
    modules = inject_multi_lora(served.model, spec, num_slots=1)
    state = random_adapter_state(modules.expected_shapes(), seed=0)
    modules.write_slot(0, state)
    merged_base = load_base_model(model)
    peft_model = attach_lora(merged_base.model, spec)
    set_adapter_state(peft_model, state)
    merged = peft_model.merge_and_unload()
    tokenizer = served.tokenizer
    pad = int(tokenizer.pad_token_id or 0)
    rows: list[UnmergedRow] = []
    for batch in batch_sizes:
        prompts = prompt_ids(tokenizer, batch)
        runs: dict[str, tuple[nn.Module, Callable[[], AbstractContextManager[None]] | None]] = {
            "no-adapter": (served.model, _serving([NO_SLOT] * batch)),
            "unmerged": (served.model, _serving([0] * batch)),
            "merged": (merged, None),
        }
        samples: dict[str, list[float]] = {name: [] for name in CONFIGS}
        for net, ctx in runs.values():
            _decode_tokens_per_s(net, prompts, pad, WARMUP_STEPS, ctx)
        for r in range(repeats):
            order = CONFIGS[r % 3 :] + CONFIGS[: r % 3]
            for name in order:
                net, ctx = runs[name]
                samples[name].append(_decode_tokens_per_s(net, prompts, pad, steps, ctx))
        best = {name: max(values) for name, values in samples.items()}
        rows.append(
            UnmergedRow(
                batch=batch,
                no_adapter_tok_s=best["no-adapter"],
                unmerged_tok_s=best["unmerged"],
                merged_tok_s=best["merged"],
                unmerged_over_no_adapter=best["unmerged"] / best["no-adapter"],
                merged_over_no_adapter=best["merged"] / best["no-adapter"],
                samples_tok_s=samples,
            )
        )
        say(
            f"unmerged: batch {batch}: no adapter {best['no-adapter']:.1f} tok/s, unmerged "
            f"{best['unmerged']:.1f}, merged {best['merged']:.1f}"
        )
    return UnmergedBenchmark(steps=steps, repeats=repeats, threads=1, rows=rows)
