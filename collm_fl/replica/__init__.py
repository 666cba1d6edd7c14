"""The edge replica's inference core: one base model serving several adapter versions through
unmerged multi-LoRA slots while a training adapter is trained on the same weights.

- ``lora_layers``: the multi-LoRA layer and the thread-local adapter context.
- ``slots``: serving slots, shadow loading, validation and promotion of adapter versions.
- ``sampling``: per-request sampling parameters, samplers and stop-string rules.
- ``engine``: the continuous-batching inference engine and its request handles.
"""

from collm_fl.replica.engine import (
    EngineStats,
    EngineStoppedError,
    GenerationRequest,
    InferenceEngine,
    InvalidPromptError,
    PromptTooLongError,
    QueueFullError,
    RequestHandle,
    TokenEvent,
)
from collm_fl.replica.lora_layers import (
    LoraMode,
    MultiLoraLinear,
    MultiLoraModules,
    inject_multi_lora,
    lora_context,
    serve,
    train,
)
from collm_fl.replica.sampling import SamplingParams, sample_next
from collm_fl.replica.slots import (
    AdapterSlots,
    NoFreeSlotError,
    ShadowSlot,
    ShadowStateError,
    SlotInfo,
    canary_check,
    validate_adapter_state,
)

__all__ = [
    "AdapterSlots",
    "EngineStats",
    "EngineStoppedError",
    "GenerationRequest",
    "InferenceEngine",
    "InvalidPromptError",
    "LoraMode",
    "MultiLoraLinear",
    "MultiLoraModules",
    "NoFreeSlotError",
    "PromptTooLongError",
    "QueueFullError",
    "RequestHandle",
    "SamplingParams",
    "ShadowSlot",
    "ShadowStateError",
    "SlotInfo",
    "TokenEvent",
    "canary_check",
    "inject_multi_lora",
    "lora_context",
    "sample_next",
    "serve",
    "train",
    "validate_adapter_state",
]
