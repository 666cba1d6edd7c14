"""Conversions between adapter states and Flower records, and the message keys both sides use."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord

from collm_fl.adapters import AdapterState
from collm_fl.errors import ConfigError

ARRAYS_KEY = "arrays"  # the adapter (global on the way out, local on the way back)
CONFIG_KEY = "config"  # the round's budget and settings
METRICS_KEY = "metrics"  # client metrics (num-examples, train-loss, tokens, seconds)

PUBLISH = "query.publish"  # message type: a new global version for every node

# Keys of the train MetricRecord a client returns.
NUM_EXAMPLES = "num-examples"
LOCAL_STEPS = "local-steps"  # micro-steps a client actually trained this round
TRAIN_LOSS = "train-loss"
TRAIN_TOKENS = "train-tokens"
TRAIN_SECONDS = "train-seconds"
EVAL_LOSS = "eval-loss"


def state_to_arrayrecord(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    # Sorted keys: every sender uses the same order (Flower's DP clipping mod compares key lists).
    return ArrayRecord(
        {k: Array(np.ascontiguousarray(state[k], dtype=np.float32)) for k in sorted(state)}
    )


def arrayrecord_to_state(record: ArrayRecord) -> AdapterState:
    return {k: np.asarray(v.numpy()) for k, v in record.items()}


def metric_record(metrics: Mapping[str, float]) -> MetricRecord:
    """A MetricRecord of scalar metrics."""
    values: dict[str, int | float | list[int] | list[float]] = {
        k: float(v) for k, v in metrics.items()
    }
    return MetricRecord(values)


def message_arrays(msg: Message) -> ArrayRecord:
    """The adapter a message carries (``ARRAYS_KEY``); a clear error when it carries none."""
    record = msg.content.array_records.get(ARRAYS_KEY)
    if record is None:
        raise ConfigError(f"the message carries no {ARRAYS_KEY!r} ArrayRecord")
    return record
