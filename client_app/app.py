"""Flower ClientApp: trains or evaluates the global LoRA adapter on this node's private data.

Flower recreates the ClientApp for every message, so nothing heavy lives here between rounds: the
node's partition comes from ``node_config`` (``partition-id``, ``num-partitions``), the round's
budget from the message's ConfigRecord, the rest from the run config. The reply carries only the
adapter tensors and scalar metrics.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from collm_fl.client_task import TrainBudget, evaluate_on_partition, train_on_partition
from collm_fl.config import RunConfig
from collm_fl.errors import ConfigError
from collm_fl.flower_records import (
    ARRAYS_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    arrayrecord_to_state,
    state_to_arrayrecord,
)
from collm_fl.logs import setup_logging

app = ClientApp()


def _partition(context: Context) -> tuple[int, int]:
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as e:
        raise ConfigError(
            f"node_config lacks {e.args[0]!r}: start the SuperNode with "
            '--node-config "partition-id=<i> num-partitions=<n>"'
        ) from e


@app.train()
def train(msg: Message, context: Context) -> Message:
    setup_logging()
    cfg = RunConfig.from_flower(context.run_config)
    partition_id, num_partitions = _partition(context)
    global_state = arrayrecord_to_state(msg.content[ARRAYS_KEY])
    round_config = msg.content.config_records.get(CONFIG_KEY, {})
    budget = TrainBudget.from_config(cfg, dict(round_config))
    server_round = int(round_config.get("server-round", 0))
    state, metrics = train_on_partition(
        cfg, partition_id, num_partitions, global_state, budget, server_round
    )
    content = RecordDict(
        {ARRAYS_KEY: state_to_arrayrecord(state), METRICS_KEY: MetricRecord(metrics)}
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    setup_logging()
    cfg = RunConfig.from_flower(context.run_config)
    partition_id, num_partitions = _partition(context)
    arrays: ArrayRecord = msg.content[ARRAYS_KEY]
    metrics = evaluate_on_partition(cfg, partition_id, num_partitions, arrayrecord_to_state(arrays))
    return Message(content=RecordDict({METRICS_KEY: MetricRecord(metrics)}), reply_to=msg)
