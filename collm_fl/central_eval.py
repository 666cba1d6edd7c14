"""Central evaluation: held-out loss and perplexity of an adapter on data no client trains on."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from collm_fl.config import RunConfig
from collm_fl.data import load_central_heldout
from collm_fl.data.tokenize import TokenizedBlocks, tokenize_samples
from collm_fl.errors import ConfigError
from collm_fl.models import LoadedModel, check_seq_len, load_base_model
from collm_fl.training import (
    EvalResult,
    attach_lora,
    evaluate_loss,
    set_adapter_state,
)

log = logging.getLogger(__name__)


def central_heldout_blocks(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase) -> TokenizedBlocks:
    """The tokenized central held-out set (a seeded, spread-out subset when capped)."""
    samples = load_central_heldout(cfg.data_spec, cfg.central_eval_samples or None, tokenizer)
    blocks = tokenize_samples(samples, tokenizer, cfg.seq_len)
    if blocks.input_ids.shape[0] == 0:  # every version is evaluated (and gated) on this set
        raise ConfigError(
            f"the central held-out set is empty (central-heldout={cfg.central_heldout}, "
            f"data {cfg.data!r}): the server evaluates every version on it; hold out at least "
            "one play, or give files with enough records to set some aside"
        )
    log.info("central held-out set: %d rows of %d tokens", blocks.input_ids.shape[0], cfg.seq_len)
    return blocks


class CentralEvaluator:
    """One base model with a LoRA slot, and the tokenized central held-out set."""

    def __init__(self, cfg: RunConfig, loaded: LoadedModel | None = None) -> None:
        self.cfg = cfg
        self.loaded = loaded or load_base_model(
            cfg.model, quantization=cfg.quantization, device=cfg.device
        )
        check_seq_len(self.loaded.model, cfg.seq_len)
        self.blocks = central_heldout_blocks(cfg, self.loaded.tokenizer)
        with torch.random.fork_rng(devices=[]):  # the run's v0: the same for the same seed
            torch.manual_seed(cfg.seed)
            self.model = attach_lora(self.loaded.model, cfg.lora)

    def evaluate(self, state: Mapping[str, np.ndarray]) -> EvalResult:
        set_adapter_state(self.model, state)
        return evaluate_loss(self.model, self.blocks, batch_size=self.cfg.batch_size)
