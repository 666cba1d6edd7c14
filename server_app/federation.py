"""The server's round loop: train, validate, aggregate, evaluate, store a version, report.

It drives any Flower ``Strategy`` through its four hooks (so Flower's DP wrappers compose), and
adds what ``Strategy.start`` does not do: resuming from the latest stored version, storing each
aggregated adapter as a numbered PEFT version with its metrics, recording per-client outcomes,
and one progress line per round.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from collm_fl.adapters import AdapterState
from collm_fl.central_eval import CentralEvaluator
from collm_fl.config import RunConfig
from collm_fl.flower_records import (
    ARRAYS_KEY,
    CONFIG_KEY,
    PUBLISH,
    TRAIN_LOSS,
    arrayrecord_to_state,
    state_to_arrayrecord,
)
from collm_fl.store import ParticipationRecord, RoundRecord, VersionInfo, VersionStore
from collm_fl.training import get_adapter_state
from strategies.lora import LoraFedAvg, RoundReport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FederationSummary:
    run_name: str
    first_round: int
    last_round: int
    latest_version: int
    initial_eval_loss: float | None
    final_eval_loss: float | None
    versions_dir: str
    store_url: str


def open_store(cfg: RunConfig) -> VersionStore:
    root = cfg.output_path
    root.mkdir(parents=True, exist_ok=True)
    return VersionStore(root, cfg.store_url or None)


def run_federation(
    grid: Grid,
    cfg: RunConfig,
    strategy: Strategy,
    lora_strategy: LoraFedAvg,
    store: VersionStore,
) -> FederationSummary:
    """Run the remaining rounds of ``cfg.run_name`` (resuming if some are stored)."""
    evaluator = CentralEvaluator(cfg)
    run = store.open_run(cfg.run_name, cfg.to_flat(), base_model=cfg.model)
    peft_config = cfg.lora.to_peft_config_dict(cfg.model)

    latest = store.latest_version(run.id)
    initial_loss: float | None = None
    if latest is None:
        state = get_adapter_state(evaluator.model)  # fresh LoRA: B = 0, so version 0 == base
        ev = evaluator.evaluate(state)
        initial_loss = ev.loss
        latest = store.save_version(
            run.id,
            0,
            state,
            peft_config,
            {"eval-loss": ev.loss, "eval-perplexity": ev.perplexity},
            ev.loss,
        )
        log.info(
            "round 0: initial adapter v0 | central eval loss %.4f ppl %.2f", ev.loss, ev.perplexity
        )
    else:
        state = store.load_version(latest)
        log.info(
            "resuming run %r from version v%d (round %d)",
            cfg.run_name,
            latest.number,
            latest.round_number,
        )
    done = max(store.last_completed_round(run.id), latest.round_number)
    first = done + 1
    if first > cfg.num_server_rounds:
        log.info("run %r already completed %d rounds; nothing to do", cfg.run_name, done)

    arrays = state_to_arrayrecord(state)
    for rnd in range(first, cfg.num_server_rounds + 1):
        arrays, latest = _run_round(
            grid, cfg, strategy, lora_strategy, store, evaluator, run.id, rnd, arrays, latest
        )

    final = store.latest_version(run.id)
    assert final is not None  # version 0 was saved above
    versions = store.list_versions(run.id)
    return FederationSummary(
        run_name=cfg.run_name,
        first_round=first,
        last_round=cfg.num_server_rounds,
        latest_version=final.number,
        initial_eval_loss=initial_loss if initial_loss is not None else versions[0].eval_loss,
        final_eval_loss=final.eval_loss,
        versions_dir=str(store.version_dir(final).parent),
        store_url=store.url,
    )


def _run_round(
    grid: Grid,
    cfg: RunConfig,
    strategy: Strategy,
    lora_strategy: LoraFedAvg,
    store: VersionStore,
    evaluator: CentralEvaluator,
    run_id: int,
    rnd: int,
    arrays: ArrayRecord,
    latest: VersionInfo,
) -> tuple[ArrayRecord, VersionInfo]:
    started_at = datetime.now(UTC)
    started = time.perf_counter()
    train_config = ConfigRecord(
        {
            "local-steps": cfg.local_steps,
            "learning-rate": cfg.learning_rate,
            "batch-size": cfg.batch_size,
            "global-version": latest.number,
        }
    )
    messages = list(strategy.configure_train(rnd, arrays, train_config, grid))
    replies = grid.send_and_receive(messages=messages, timeout=cfg.round_timeout)
    new_arrays, train_metrics = strategy.aggregate_train(rnd, replies)
    report = lora_strategy.last_report or RoundReport(rnd, (), False)

    eval_loss = eval_ppl = None
    train_loss = (
        float(train_metrics[TRAIN_LOSS]) if train_metrics and TRAIN_LOSS in train_metrics else None
    )
    version = latest
    if new_arrays is not None:
        new_state: AdapterState = arrayrecord_to_state(new_arrays)
        ev = evaluator.evaluate(new_state)
        eval_loss, eval_ppl = ev.loss, ev.perplexity
        version = store.save_version(
            run_id,
            rnd,
            new_state,
            cfg.lora.to_peft_config_dict(cfg.model),
            {
                "eval-loss": ev.loss,
                "eval-perplexity": ev.perplexity,
                **({"train-loss": train_loss} if train_loss is not None else {}),
            },
            ev.loss,
        )
        arrays = new_arrays
        if cfg.publish_versions:
            publish_version(grid, arrays, version.number, timeout=cfg.round_timeout)
    seconds = time.perf_counter() - started
    store.record_round_result(
        run_id,
        RoundRecord(
            number=rnd,
            status="aggregated" if new_arrays is not None else "kept-previous",
            started_at=started_at,
            finished_at=datetime.now(UTC),
            num_ok=report.count("ok"),
            num_rejected=report.count("rejected"),
            num_failed=report.count("failed"),
            train_loss=train_loss,
            eval_loss=eval_loss,
            eval_perplexity=eval_ppl,
            version_number=version.number,
            seconds=seconds,
            metrics={
                k: float(v) for k, v in (train_metrics or {}).items() if isinstance(v, int | float)
            },
        ),
        [
            ParticipationRecord(
                node_id=o.node_id,
                status=o.status,
                reason=o.reason,
                num_examples=o.num_examples,
                train_loss=o.metrics.get(TRAIN_LOSS),
                metrics=dict(o.metrics),
            )
            for o in report.outcomes
        ],
    )
    log.info(
        "round %d | clients ok %d rejected %d failed %d | train loss %s | "
        "central eval loss %s ppl %s | version v%d%s | %.1fs",
        rnd,
        report.count("ok"),
        report.count("rejected"),
        report.count("failed"),
        _fmt(train_loss),
        _fmt(eval_loss),
        _fmt(eval_ppl, 2),
        version.number,
        "" if new_arrays is not None else " (kept previous)",
        seconds,
    )
    return arrays, version


def publish_version(grid: Grid, arrays: ArrayRecord, version: int, timeout: float) -> int:
    """Send version ``version`` to every connected node right after aggregation.

    Replica nodes swap it in through their shadow slot (also those that sat the round out);
    devices ignore it. Returns how many nodes acknowledged; failures are logged, never raised.
    """
    nodes = list(grid.get_node_ids())
    messages = [
        Message(
            RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: ConfigRecord({"version": version})}),
            dst_node_id=node,
            message_type=PUBLISH,
        )
        for node in nodes
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    acked = 0
    for reply in replies:
        if reply.has_error():
            log.warning(
                "publish v%d: node %d failed: %s",
                version,
                reply.metadata.src_node_id,
                reply.error.reason,
            )
        else:
            acked += 1
    log.info("published v%d to %d/%d nodes", version, acked, len(nodes))
    return acked


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"
