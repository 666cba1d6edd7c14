"""The ClientApp's side of a round on a co-executing replica (light: no torch import).

Flower starts a ClientApp process per message in the deployment engine, so a replica node's app
must import fast; it only relays to the long-lived replica over its control API.
"""

from __future__ import annotations

from collections.abc import Mapping
from time import monotonic

import numpy as np

from collm_fl.adapters import AdapterState
from collm_fl.config import RunConfig, TrainBudget
from collm_fl.replica.control_client import ReplicaClient

MIN_DEADLINE_S = 0.001  # what a training job is given when the push before it used the deadline


def train_on_replica(
    cfg: RunConfig,
    client: ReplicaClient,
    global_state: Mapping[str, np.ndarray],
    global_version: int,
    budget: TrainBudget,
    server_round: int,
    deadline_s: float,
    training_share: float | None,
    backfill_steps: int = 0,
    run_key: str | None = None,
    start_after_s: float = 0.0,
) -> tuple[AdapterState, dict[str, float]]:
    """A round on a co-executing replica: make sure it serves the global version, train there.

    The replica trains on its site's private data while it keeps serving; its load report since
    the last round rides back with the metrics (``load-*`` keys) for the allocation policy.
    ``backfill_steps`` more steps run only while the replica has no request (see
    :mod:`collm_fl.policies.allocation`). ``run_key``: the run's name on the replica (the
    server's; default the run name). ``deadline_s`` counts from this call: the push before the
    training job comes out of it, and so does ``start_after_s`` (the allocation's turns: its
    first step waits this long after the call).
    """
    started = monotonic()
    run = run_key or cfg.run_name
    client.push_version(global_state, cfg.lora.to_peft_config_dict(cfg.model), global_version, run)
    state, metrics = client.train(
        server_round,
        budget.local_steps,
        budget.learning_rate,
        # (a push that took the whole deadline leaves the job a moment: it trains no step)
        max(deadline_s - (monotonic() - started), MIN_DEADLINE_S),
        base_version=global_version,
        base_run=run,
        share=training_share,
        backfill_steps=backfill_steps,
        start_after_s=max(start_after_s - (monotonic() - started), 0.0),
    )
    load = client.load_report(reset=True)
    metrics.update({f"load-{k}": float(v) for k, v in load.items()})
    return state, metrics


def publish_on_replica(
    cfg: RunConfig,
    client: ReplicaClient,
    state: Mapping[str, np.ndarray],
    version: int,
    run_key: str | None = None,
) -> dict[str, float]:
    """Swap a freshly aggregated version in; answer with the load since the last report."""
    peft = cfg.lora.to_peft_config_dict(cfg.model)
    client.push_version(state, peft, version, run_key or cfg.run_name)
    load = client.load_report(reset=True)
    return {"served-version": float(version), **{f"load-{k}": float(v) for k, v in load.items()}}
