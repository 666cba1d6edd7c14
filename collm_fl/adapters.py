"""LoRA adapter state: the only thing that travels between clients, the server and replicas.

An adapter state is a flat ``dict[str, np.ndarray]`` keyed exactly as PEFT saves it in
``adapter_model.safetensors`` (``base_model.model.<module path>.lora_A.weight`` with shape
``(r, d_in)`` and ``...lora_B.weight`` with shape ``(d_out, r)``), always float32. Keeping PEFT's
names means a stored version is a PEFT directory as is, and vLLM can load it too.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from collm_fl.errors import AdapterValidationError, ConfigError

MAX_SERVER_LR = 16.0  # the largest server learning rate accepted (collm_fl.aggregation)
# A robust statistic's fewest updates: below it none can tell the outlier from the honest update
# (collm_fl.aggregation_robust; the run config asks for as many nodes).
MIN_ROBUST_UPDATES = 3

log = logging.getLogger(__name__)

AdapterState = dict[str, np.ndarray]

LORA_A_SUFFIX = ".lora_A.weight"
LORA_B_SUFFIX = ".lora_B.weight"


# adapter_config.json keys whose other values change what the adapter computes, with the values
# that mean plain LoRA (a key left out is plain too: PEFT's defaults).
PLAIN_LORA_OPTIONS: dict[str, tuple[object, ...]] = {
    "use_rslora": (None, False),
    "use_dora": (None, False),
    "bias": (None, "none"),
    "fan_in_fan_out": (None, False),
    "rank_pattern": (None, {}),
    "alpha_pattern": (None, {}),
    "modules_to_save": (None, [], ()),
    "layers_to_transform": (None,),
    "lora_bias": (None, False),
    # how the factors were initialized: PiSSA, OLoRA, LoftQ and the like change the base weights
    # too (an adapter of theirs is not a plain LoRA of the base served here)
    "init_lora_weights": (None, True, False, "gaussian"),
}
# Keys that name, describe or only set up the adapter (any value): the rest of an
# adapter_config.json must be left at a value meaning "not used" (None, False, empty), so that an
# option of a newer PEFT (activated LoRA, QALoRA, layer replication...) is refused, not served as
# plain LoRA.
DESCRIPTIVE_LORA_KEYS = frozenset(
    {
        "peft_type",
        "task_type",
        "base_model_name_or_path",
        "revision",
        "r",
        "lora_alpha",
        "lora_dropout",
        "target_modules",
        "inference_mode",
        "auto_mapping",
        "peft_version",
        "megatron_core",  # (a module name, used only with megatron_config)
        "qalora_group_size",  # (used only with use_qalora)
        "layers_pattern",  # (used only with layers_to_transform)
        "loftq_config",  # (LoftQ's settings, used only with init_lora_weights="loftq")
    }
)


@dataclass(frozen=True)
class LoraSpec:
    """The LoRA hyper-parameters every participant of a run must share."""

    rank: int = 8  # r: inner dimension of B @ A
    alpha: float = 16.0  # scaling = alpha / rank
    dropout: float = 0.0  # lora_dropout during local training
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")  # module names that get an adapter
    extra: dict[str, str] = field(default_factory=dict)  # reserved for forward compatibility

    def __post_init__(self) -> None:
        problems = []
        if self.rank < 1:
            problems.append(f"lora-rank must be >= 1, got {self.rank}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            problems.append(f"lora-alpha must be a finite number > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"lora-dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            problems.append("lora-targets must name at least one module")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_peft_config_dict(self, base_model_name: str) -> dict[str, object]:
        """The ``adapter_config.json`` PEFT (and vLLM) expect for this spec."""
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": sorted(self.target_modules),
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
            "modules_to_save": None,
            "use_rslora": False,
            "use_dora": False,
        }

    @classmethod
    def from_peft_config_dict(cls, cfg: Mapping[str, object]) -> LoraSpec:
        """Read back the fields this project uses from an ``adapter_config.json`` dict."""
        if cfg.get("peft_type", "LORA") != "LORA":
            raise AdapterValidationError([f"peft_type must be LORA, got {cfg.get('peft_type')!r}"])
        # Options that change the adapter's math: served as plain LoRA (alpha / r scaling, no
        # bias, every target layer alike) their logits would not be PEFT's.
        unsupported = [
            f"{key}={cfg[key]!r}"
            for key, plain in PLAIN_LORA_OPTIONS.items()
            if cfg.get(key) not in plain
        ]
        unsupported += [
            f"{key}={value!r}"
            for key, value in sorted(cfg.items())
            if key not in PLAIN_LORA_OPTIONS
            and key not in DESCRIPTIVE_LORA_KEYS
            and not _unused(value)
        ]
        if unsupported:
            raise AdapterValidationError(
                [f"unsupported LoRA options (plain LoRA only): {', '.join(unsupported)}"]
            )
        targets = cfg.get("target_modules")
        if isinstance(targets, str):
            targets_t: tuple[str, ...] = (targets,)
        elif isinstance(targets, list | tuple):
            targets_t = tuple(str(t) for t in targets)
        else:
            raise AdapterValidationError([f"target_modules must be a list, got {targets!r}"])
        # Types as PEFT writes them: a config read with coercion ("r": 8.5 or "8") was stored
        # as it came, and PEFT could not load the version.
        rank, alpha, dropout = cfg.get("r"), cfg.get("lora_alpha"), cfg.get("lora_dropout", 0.0)
        wrong = [f"r must be an integer, got {rank!r}"] if not _is_int(rank) else []
        wrong += [
            f"{key} must be a number, got {value!r}"
            for key, value in (("lora_alpha", alpha), ("lora_dropout", dropout))
            if not (_is_int(value) or isinstance(value, float))
        ]
        if wrong:
            raise AdapterValidationError(wrong)
        return cls(
            rank=rank,  # type: ignore[arg-type]
            alpha=float(alpha),  # type: ignore[arg-type]
            dropout=float(dropout),  # type: ignore[arg-type]
            target_modules=tuple(sorted(targets_t)),
        )

    def replace(self, **changes: object) -> LoraSpec:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def _unused(value: object) -> bool:
    """Whether an adapter_config.json value means "option not used": None, False or empty."""
    return value is None or value is False or (isinstance(value, dict | list | tuple) and not value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def lora_module_names(state: Mapping[str, np.ndarray]) -> list[str]:
    """The module prefixes that carry an (A, B) pair, sorted; raises if a pair is incomplete."""
    a_mods = {k[: -len(LORA_A_SUFFIX)] for k in state if k.endswith(LORA_A_SUFFIX)}
    b_mods = {k[: -len(LORA_B_SUFFIX)] for k in state if k.endswith(LORA_B_SUFFIX)}
    problems = [f"{m}: lora_B without lora_A" for m in sorted(b_mods - a_mods)]
    problems += [f"{m}: lora_A without lora_B" for m in sorted(a_mods - b_mods)]
    other = [k for k in state if not k.endswith((LORA_A_SUFFIX, LORA_B_SUFFIX))]
    problems += [f"unexpected key {k!r} (not a LoRA A/B weight)" for k in sorted(other)]
    if problems:
        raise AdapterValidationError(problems)
    return sorted(a_mods)


def lora_pairs(state: Mapping[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Module prefix -> (A (r, d_in), B (d_out, r))."""
    return {
        m: (state[m + LORA_A_SUFFIX], state[m + LORA_B_SUFFIX]) for m in lora_module_names(state)
    }


def state_from_pairs(pairs: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> AdapterState:
    """Inverse of :func:`lora_pairs`."""
    out: AdapterState = {}
    for m, (a, b) in pairs.items():
        out[m + LORA_A_SUFFIX] = np.ascontiguousarray(a, dtype=np.float32)
        out[m + LORA_B_SUFFIX] = np.ascontiguousarray(b, dtype=np.float32)
    return out


def adapter_nbytes(state: Mapping[str, np.ndarray]) -> int:
    return int(sum(v.nbytes for v in state.values()))
