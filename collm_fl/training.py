"""Local LoRA training and held-out evaluation on a PEFT-wrapped base model.

The base weights stay frozen; only the LoRA factors get gradients, so a training step costs one
forward and one backward through the base plus the small adapter update.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from transformers import PreTrainedModel

from collm_fl.adapters import AdapterState, LoraSpec, lora_module_names
from collm_fl.data.tokenize import TokenizedBlocks, batch_to
from collm_fl.errors import AdapterValidationError, ConfigError
from collm_fl.models import model_device

log = logging.getLogger(__name__)

DEFAULT_ADAPTER = "default"


@dataclass(frozen=True)
class TrainResult:
    steps: int
    loss: float  # mean training loss over the steps (token-weighted)
    tokens: int  # supervised tokens seen
    seconds: float


@dataclass(frozen=True)
class EvalResult:
    loss: float  # token-weighted mean cross-entropy (nats)
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))


def attach_lora(model: PreTrainedModel, spec: LoraSpec) -> PeftModel:
    """Wrap a frozen base model with a fresh LoRA adapter (B = 0, so it starts as the base)."""
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,  # type: ignore[arg-type]  # PEFT annotates int; floats work
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:  # (PEFT's NoMatchingPeftModuleError: no module has such a name)
        named = model.named_modules()
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in named if isinstance(m, torch.nn.Linear)})
        raise ConfigError(
            f"lora-targets {','.join(spec.target_modules)!r}: {e} This model's linear layers: "
            f"{','.join(linear)}"
        ) from e
    return peft_model  # type: ignore[return-value]


def get_adapter_state(model: PeftModel, adapter_name: str = DEFAULT_ADAPTER) -> AdapterState:
    """The adapter's tensors as float32 numpy arrays keyed like adapter_model.safetensors."""
    sd = get_peft_model_state_dict(model, adapter_name=adapter_name)
    return {k: v.detach().to("cpu", torch.float32).numpy().copy() for k, v in sd.items()}


def set_adapter_state(
    model: PeftModel, state: Mapping[str, np.ndarray], adapter_name: str = DEFAULT_ADAPTER
) -> None:
    """Load adapter tensors into ``adapter_name``; every LoRA weight must be covered, with the
    slot's shape (rank and module sizes) and finite values once in float32 (every problem is
    named in one :class:`AdapterValidationError`, the model left as it was)."""
    lora_module_names(state)  # raises on incomplete pairs or foreign keys
    current = get_peft_model_state_dict(model, adapter_name=adapter_name)
    expected = set(current)
    problems = [f"missing key {k}" for k in sorted(expected - set(state))]
    problems += [f"unexpected key {k}" for k in sorted(set(state) - expected)]
    arrays = {k: np.asarray(v, dtype=np.float32) for k, v in state.items() if k in expected}
    for k, a in sorted(arrays.items()):
        want = tuple(current[k].shape)
        if a.shape != want:
            problems.append(f"{k}: shape {a.shape}, expected {want}")
        elif not np.isfinite(a).all():
            problems.append(f"{k}: {int(a.size - np.isfinite(a).sum())} non-finite values")
    if problems:
        raise AdapterValidationError(problems)
    tensors = {k: torch.from_numpy(a) for k, a in arrays.items()}
    result = set_peft_model_state_dict(model, tensors, adapter_name=adapter_name)
    unexpected = [k for k in result.unexpected_keys if "lora_" in k]  # type: ignore[attr-defined]
    if unexpected:
        raise AdapterValidationError([f"unexpected key {k}" for k in unexpected])


def train_lora(
    model: PeftModel,
    batches: Iterator[Mapping[str, torch.Tensor]],
    steps: int,
    learning_rate: float,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    on_step: Callable[[int, float], None] | None = None,
    deadline_s: float | None = None,
) -> TrainResult:
    """Run ``steps`` AdamW steps on the trainable (LoRA) parameters; with ``deadline_s``, no step
    starts once that many seconds have passed since the call (``TrainResult.steps``: those done).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise AdapterValidationError(["model has no trainable parameters (no LoRA attached?)"])
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    device = model_device(model)
    model.train()
    started = time.perf_counter()
    loss_sum, tokens, done = 0.0, 0, 0
    try:
        for step in range(steps):
            if deadline_s is not None and time.perf_counter() - started >= deadline_s:
                log.info("deadline (%.1fs) reached after %d of %d steps", deadline_s, step, steps)
                break
            batch = batch_to(next(batches), device)
            out = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                labels=batch["labels"],
            )
            loss = out.loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss at step {step}: {loss.item()}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # max_norm inf measures without clipping (max_grad_norm <= 0: clipping off)
            norm = torch.nn.utils.clip_grad_norm_(
                params, max_grad_norm if max_grad_norm > 0 else math.inf
            )
            if not torch.isfinite(norm):  # clipping by it made every gradient NaN: no step
                optimizer.zero_grad(set_to_none=True)
                raise FloatingPointError(f"non-finite gradient norm at step {step}: {norm.item()}")
            optimizer.step()
            n = int((batch["labels"][:, 1:] != -100).sum())
            loss_sum += loss.item() * n
            tokens += n
            done += 1
            if on_step is not None:
                on_step(step, loss.item())
    finally:
        model.eval()
    seconds = time.perf_counter() - started
    return TrainResult(steps=done, loss=loss_sum / max(tokens, 1), tokens=tokens, seconds=seconds)


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module, blocks: TokenizedBlocks, batch_size: int = 8
) -> EvalResult:
    """Token-weighted mean next-token cross-entropy over all rows of ``blocks``."""
    model.eval()
    device = model_device(model)
    total, tokens = 0.0, 0
    n_rows = blocks.input_ids.shape[0]
    for start in range(0, n_rows, batch_size):
        ids = blocks.input_ids[start : start + batch_size].to(device)  # (b, L)
        labels = blocks.labels[start : start + batch_size].to(device)  # (b, L)
        mask = blocks.attention_mask[start : start + batch_size].to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits  # (b, L, V)
        shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
        shift_labels = labels[:, 1:].reshape(-1)
        loss = torch.nn.functional.cross_entropy(
            shift_logits.float(), shift_labels, ignore_index=-100, reduction="sum"
        )
        total += float(loss)
        tokens += int((shift_labels != -100).sum())
    if tokens == 0:
        raise ValueError("evaluation set has no supervised tokens")
    return EvalResult(loss=total / tokens, tokens=tokens)
