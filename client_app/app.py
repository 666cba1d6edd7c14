"""Flower ClientApp: trains or evaluates the global LoRA adapter on this node's private data.

Flower recreates the ClientApp for every message, so nothing heavy lives here between rounds.
Two kinds of node:
- **replica node**: ``node_config`` has ``replica-address`` (host:port of a ``collm replica``
  control API; token in ``$COLLM_CONTROL_TOKEN`` or ``replica-token``). The replica, a long-lived
  process beside the SuperNode, serves and trains on the same base weights; this app only relays.
- **device node**: no replica; it loads the model and trains in-process on its part of the run
  config's ``data`` (``partition-id``, ``num-partitions``), or on its own data: ``data``, a path
  on the device's host (all of it, or a part with ``partition-id`` / ``num-partitions``).
Replies carry only adapter tensors and scalar metrics; an error in a device's data file reaches
the server as where it is (its line), not what it says (the node's log has that).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from collm_fl.config import RunConfig, TrainBudget, config_int, config_number
from collm_fl.data.partition import SHAKESPEARE, DataSpec
from collm_fl.errors import ConfigError, DataFormatError
from collm_fl.flower_records import (
    ARRAYS_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    arrayrecord_to_state,
    message_arrays,
    metric_record,
    state_to_arrayrecord,
)
from collm_fl.logs import setup_logging
from collm_fl.replica.control_client import ReplicaClient
from collm_fl.replica.relay import publish_on_replica, train_on_replica

log = logging.getLogger(__name__)
T = TypeVar("T")


def dp_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's client-side DP clipping, when the server's DP wrapper asks for it (else a no-op).

    A node that trained nothing (asked for 0 steps under DP, where every node answers, or out of
    time) sends the global adapter back unchanged: a zero update, within any clipping norm, and
    Flower's clip would divide by its norm of 0 and turn the reply (and the load report it
    carries) into an error."""
    config = msg.content.config_records.get(CONFIG_KEY)
    if config is None or KEY_CLIPPING_NORM not in config:
        return call_next(msg, context)
    reply = call_next(msg, context)
    if not reply.has_error() and _unchanged(msg, reply):
        return reply
    return fixedclipping_mod(msg, context, lambda _msg, _context: reply)


def _unchanged(sent: Message, reply: Message) -> bool:
    """Whether ``reply`` carries exactly the arrays ``sent`` did (one record each, same keys)."""
    if len(sent.content.array_records) != 1 or len(reply.content.array_records) != 1:
        return False
    before = next(iter(sent.content.array_records.values()))
    after = next(iter(reply.content.array_records.values()))
    if list(before.keys()) != list(after.keys()):
        return False
    return all(np.array_equal(before[k].numpy(), after[k].numpy()) for k in before)


app = ClientApp()


def _partition(context: Context) -> tuple[int, int]:
    node = context.node_config
    if "data" in node and "partition-id" not in node and "num-partitions" not in node:
        return 0, 1  # the node's own data: all of it
    try:
        return int(node["partition-id"]), int(node["num-partitions"])
    except KeyError as e:
        raise ConfigError(
            f"node_config lacks {e.args[0]!r}: start the SuperNode with "
            '--node-config "partition-id=<i> num-partitions=<n>" (a part of the run config\'s '
            "data) or \"data='<path>'\" (its own data)"
        ) from e


def _own_data(context: Context, cfg: RunConfig) -> DataSpec | None:
    """A device's own data (node config ``data``, a path on its host, or ``shakespeare``), or
    None for its part of the run config's. Its own file is not the server's held-out set: nothing
    is set aside. The run's own corpus named again (``shakespeare`` in a run on it) keeps the
    server's held-out part out, as every other client does: trained on, it would pass the
    quality gate for the wrong reason."""
    path = _own_path(context)
    if path is None:
        return None
    run_corpus = _overlaps(path, cfg.data_spec.source)
    heldout = cfg.data_spec.central_heldout if run_corpus else 0
    return dataclasses.replace(cfg.data_spec, source=path, central_heldout=heldout)


def _overlaps(a: str, b: str) -> bool:
    """Whether two data sources share files: ``shakespeare`` both, one file or folder however
    written (``data/qa.jsonl``, ``./data/qa.jsonl``, its absolute path, a link to it), or a file
    in the other's folder (the server sets aside records of each file of a folder by the file's
    name, so the same records of that file are kept out here)."""
    if a == b:
        return True
    if SHAKESPEARE in (a, b):
        return False
    try:
        pa, pb = Path(a).expanduser().resolve(), Path(b).expanduser().resolve()
    except (OSError, RuntimeError):  # (a loop of links)
        return False
    return pa == pb or pa.is_relative_to(pb) or pb.is_relative_to(pa)


def _on_private_data(work: Callable[[], T], own_data: str | None = None) -> T:
    """``work`` on this device's data; a malformed data file raises an error that names its
    line (or record) only. Flower sends an error's text to the server, which logs and stores it,
    and a :class:`DataFormatError` names the file's path and may quote the record (a name given
    as a chat role, the keys of an unknown record): private data. The whole of it is logged here.
    With the device's ``own_data`` (a path on its host), a config or OS error naming that path or
    its files (no such file, no permission, a folder with no data file) reaches the server with
    them left out; one naming neither (a model that cannot load) goes as it is.
    """
    try:
        return work()
    except DataFormatError as e:
        log.error("this node's data is malformed: %s", e)
        where = "" if e.record is None or e.line is not None else f"record {e.record}: "
        raise DataFormatError(
            "this node's data file",
            f"{where}malformed (the node's log says what)",
            line=e.line,
            record=e.record,
        ) from None
    except (ConfigError, OSError) as e:
        private = None if own_data is None else _redacted(str(e), own_data)
        if private is None or private == str(e):
            raise
        log.error("this node's data cannot be used: %s", e)
        raise ConfigError(f"this node's data: {private}") from None


def _redacted(text: str, path: str) -> str:
    """``text`` with ``path`` (as given, expanded, resolved) and the names of its files left out."""
    try:
        where = Path(path).expanduser()
        resolved = where.resolve()
        files = list(resolved.iterdir()) if resolved.is_dir() else [resolved]
    except (OSError, RuntimeError):
        where, resolved, files = Path(path), Path(path), []
    names = {path, str(where), str(resolved)}
    names |= {n for f in files for n in (f.name, f.stem)}
    for name in sorted((n for n in names if n), key=len, reverse=True):
        text = re.sub(rf"(?<![\w.-]){re.escape(name)}(?![\w-])", "<private>", text)
    return text


def _replica(context: Context, cfg: RunConfig) -> ReplicaClient | None:
    address = context.node_config.get("replica-address")
    if not address:
        return None
    token = os.environ.get("COLLM_CONTROL_TOKEN") or str(
        context.node_config.get("replica-token", "")
    )
    if not token:
        raise ConfigError(
            "replica-address is set but no control token: export COLLM_CONTROL_TOKEN for the "
            "SuperNode (or set replica-token in its node config)"
        )
    return ReplicaClient(str(address), token, timeout=cfg.round_timeout)


def _own_path(context: Context) -> str | None:
    """The device's own data as its node config names it (``data``), or None."""
    data = context.node_config.get("data")
    return None if data is None else str(data)


def _required_int(config: ConfigRecord, key: str) -> int:
    """An integer the server must send (a replica's versions: a default would name the arrays
    another version)."""
    if key not in config:
        raise ConfigError(f"the server's message has no {key!r} (a ServerApp of another app?)")
    return config_int(config, key, 0)


def _round_config(msg: Message) -> ConfigRecord:
    return msg.content.config_records.get(CONFIG_KEY, ConfigRecord())


def _run_key(config: ConfigRecord) -> str | None:
    key = config.get("run-key")
    return str(key) if key is not None else None


@app.train(mods=[dp_clipping_mod])
def train(msg: Message, context: Context) -> Message:
    setup_logging()
    cfg = RunConfig.from_flower(context.run_config)
    global_state = arrayrecord_to_state(message_arrays(msg))
    rc = _round_config(msg)
    budget = TrainBudget.from_config(cfg, dict(rc))
    server_round = config_int(rc, "server-round", 0)
    replica = _replica(context, cfg)
    if replica is not None:
        with replica:
            share = rc.get("training-share")
            state, metrics = train_on_replica(
                cfg,
                replica,
                global_state,
                _required_int(rc, "global-version"),
                budget,
                server_round,
                deadline_s=config_number(rc, "deadline-s", cfg.round_deadline_s),
                training_share=None if share is None else config_number(rc, "training-share", 1.0),
                backfill_steps=config_int(rc, "backfill-steps", 0),
                run_key=_run_key(rc),
                start_after_s=config_number(rc, "start-after-s", 0.0),
            )
    else:
        from collm_fl.client_task import train_on_partition  # torch + transformers: devices only

        partition_id, num_partitions = _partition(context)
        state, metrics = _on_private_data(
            lambda: train_on_partition(
                cfg,
                partition_id,
                num_partitions,
                global_state,
                budget,
                server_round,
                deadline_s=config_number(rc, "deadline-s", cfg.round_deadline_s),
                data_spec=_own_data(context, cfg),
            ),
            _own_path(context),
        )
    content = RecordDict(
        {ARRAYS_KEY: state_to_arrayrecord(state), METRICS_KEY: metric_record(metrics)}
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    from collm_fl.client_task import evaluate_on_partition

    setup_logging()
    cfg = RunConfig.from_flower(context.run_config)
    if context.node_config.get("replica-address"):
        raise ConfigError(
            "this node relays to a replica, which evaluates nothing for the federation: the "
            "server evaluates each version on its central held-out set (fraction-evaluate 0)"
        )
    partition_id, num_partitions = _partition(context)
    state = arrayrecord_to_state(message_arrays(msg))
    metrics = _on_private_data(
        lambda: evaluate_on_partition(
            cfg, partition_id, num_partitions, state, data_spec=_own_data(context, cfg)
        ),
        _own_path(context),
    )
    return Message(content=RecordDict({METRICS_KEY: metric_record(metrics)}), reply_to=msg)


@app.query("publish")
def publish(msg: Message, context: Context) -> Message:
    """A new global version: a replica node swaps it in now (shadow slot); a device ignores it."""
    setup_logging()
    cfg = RunConfig.from_flower(context.run_config)
    replica = _replica(context, cfg)
    metrics = {"served-version": -1.0}
    if replica is not None:
        version = _required_int(_round_config(msg), "version")
        with replica:
            state = arrayrecord_to_state(message_arrays(msg))
            metrics = publish_on_replica(cfg, replica, state, version, _run_key(_round_config(msg)))
    return Message(content=RecordDict({METRICS_KEY: metric_record(metrics)}), reply_to=msg)
