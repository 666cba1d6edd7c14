"""One client's work in a round: train the global adapter on its private partition, or evaluate it.

Used by the Flower ClientApp for nodes without a replica (devices train in-process). Only the
adapter tensors and scalar metrics are returned; the base weights and the raw data stay here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import numpy as np
import torch

from collm_fl.adapters import AdapterState
from collm_fl.config import RunConfig, TrainBudget
from collm_fl.data import DataSpec, load_client_data
from collm_fl.data.tokenize import iterate_batches, tokenize_samples
from collm_fl.errors import ConfigError
from collm_fl.models import check_seq_len, load_base_model
from collm_fl.training import (
    attach_lora,
    evaluate_loss,
    get_adapter_state,
    set_adapter_state,
    train_lora,
)

log = logging.getLogger(__name__)


def apply_thread_budget(cfg: RunConfig) -> None:
    if cfg.torch_threads > 0:
        torch.set_num_threads(cfg.torch_threads)


def train_on_partition(
    cfg: RunConfig,
    partition_id: int,
    num_partitions: int,
    global_state: Mapping[str, np.ndarray],
    budget: TrainBudget,
    server_round: int,
    deadline_s: float | None = None,
    data_spec: DataSpec | None = None,
) -> tuple[AdapterState, dict[str, float]]:
    """Train ``budget.local_steps`` steps from the global adapter, none starting after
    ``deadline_s`` (from the call, loading included); return it with metrics. ``data_spec``:
    the node's own data (default: the run config's)."""
    apply_thread_budget(cfg)
    started = time.perf_counter()
    loaded = load_base_model(cfg.model, quantization=cfg.quantization, device=cfg.device)
    check_seq_len(loaded.model, cfg.seq_len)
    model = attach_lora(loaded.model, cfg.lora)
    set_adapter_state(model, global_state)
    spec = data_spec or cfg.data_spec
    data = load_client_data(spec, partition_id, num_partitions, loaded.tokenizer)
    blocks = tokenize_samples(data.train, loaded.tokenizer, cfg.seq_len)
    if len(blocks) == 0 and data.train:  # (plain text always gives a row: these were prompts)
        raise ConfigError(
            f"this node's data: none of its {len(data.train)} sample(s) fits "
            f"seq-len={cfg.seq_len}: every instruction prompt fills the row, leaving no answer "
            "to learn (a longer seq-len, or shorter prompts)"
        )
    batches = iterate_batches(blocks, budget.batch_size, seed=cfg.seed * 100_003 + server_round)
    loading_s = time.perf_counter() - started
    left = None if deadline_s is None else max(0.0, deadline_s - loading_s)
    if left == 0.0 and budget.local_steps > 0:
        log.warning(
            "the round's deadline (%.0fs) passed while the model and data loaded (%.1fs): no "
            "step trained this round (a later round-deadline-s, or less data on this node)",
            deadline_s,
            loading_s,
        )
    with torch.random.fork_rng(devices=[]):  # LoRA dropout: the same for the same seed
        torch.manual_seed(cfg.seed * 100_003 + server_round * 1_009 + partition_id)
        result = train_lora(
            model, batches, budget.local_steps, budget.learning_rate, deadline_s=left
        )
    state = get_adapter_state(model)
    metrics = {
        "num-examples": float(blocks.input_ids.shape[0]),
        "train-loss": result.loss,
        "train-tokens": float(result.tokens),
        "train-seconds": result.seconds,
        "total-seconds": time.perf_counter() - started,
        "local-steps": float(result.steps),
    }
    log.info(
        "partition %d (%s): %d steps, loss %.4f, %d tokens in %.1fs",
        partition_id,
        data.name,
        result.steps,
        result.loss,
        result.tokens,
        result.seconds,
    )
    return state, metrics


def evaluate_on_partition(
    cfg: RunConfig,
    partition_id: int,
    num_partitions: int,
    global_state: Mapping[str, np.ndarray],
    data_spec: DataSpec | None = None,
) -> dict[str, float]:
    """Held-out loss of the global adapter on this client's own held-out split."""
    apply_thread_budget(cfg)
    loaded = load_base_model(cfg.model, quantization=cfg.quantization, device=cfg.device)
    check_seq_len(loaded.model, cfg.seq_len)
    model = attach_lora(loaded.model, cfg.lora)
    set_adapter_state(model, global_state)
    spec = data_spec or cfg.data_spec
    data = load_client_data(spec, partition_id, num_partitions, loaded.tokenizer)
    if not data.heldout:
        raise ConfigError(
            f"partition {partition_id} of {num_partitions} ({data.name}) has no held-out split to"
            f" evaluate on: heldout-fraction={cfg.heldout_fraction:g} and"
            f" {len(data.train)} training sample(s) (it needs 2 distinct ones and a fraction > 0)"
        )
    blocks = tokenize_samples(data.heldout, loaded.tokenizer, cfg.seq_len)
    result = evaluate_loss(model, blocks, batch_size=cfg.batch_size)
    return {
        "num-examples": float(blocks.input_ids.shape[0]),
        "eval-loss": result.loss,
        "eval-perplexity": result.perplexity,
    }
