"""Shared helpers of the strategy tests: small adapters, train replies, a ready strategy."""

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from collm_fl.flower_records import state_to_arrayrecord
from strategies.lora import LoraFedAvg

SHAPES = {
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": (2, 8),
    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": (8, 2),
    "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight": (2, 8),
    "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight": (4, 2),
}


def adapter(seed: int, scale: float = 0.1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in SHAPES.items()}


def reply(node: int, state, num_examples: float = 10.0, extra_metrics=None) -> Message:
    instruction = Message(
        RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type="train"
    )
    metrics = {"num-examples": num_examples, "train-loss": 1.0 + node / 10, **(extra_metrics or {})}
    content = RecordDict({"arrays": state_to_arrayrecord(state), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=instruction)


def strategy(**kw) -> LoraFedAvg:
    s = LoraFedAvg(min_train_nodes=1, min_available_nodes=1, **kw)
    s.current_arrays = state_to_arrayrecord(adapter(0))
    return s
