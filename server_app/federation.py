"""The server's round loop: allocate, train, validate, aggregate, evaluate, gate, store, publish.

It drives any Flower ``Strategy`` through its four hooks (so Flower's DP wrappers compose), and
adds what ``Strategy.start`` does not do: resuming from the latest stored version, per-node
budgets from the quality-aware allocation policy, a quality gate before a version is served,
storing each version as a numbered PEFT directory with its metrics, recording per-client
outcomes, publishing each new version to every node at once, and one progress line per round.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from collm_fl.adapters import AdapterState
from collm_fl.central_eval import CentralEvaluator
from collm_fl.config import RunConfig
from collm_fl.errors import AdapterValidationError
from collm_fl.flower_records import (
    ARRAYS_KEY,
    CONFIG_KEY,
    PUBLISH,
    TRAIN_LOSS,
    arrayrecord_to_state,
    state_to_arrayrecord,
)
from collm_fl.privacy import epsilon_spent
from collm_fl.replica.relay import MIN_DEADLINE_S
from collm_fl.store import (
    RUN_FAILED,
    RUN_FINISHED,
    ParticipationRecord,
    ParticipationStatus,
    RoundRecord,
    RunInfo,
    VersionInfo,
    VersionStore,
)
from collm_fl.training import get_adapter_state
from server_app.coordination import (
    COORDINATION_STATE,
    STATE_KEY,
    CoordinationState,
    finite_number,
)
from strategies.allocation import NodeBudget, turn_before
from strategies.lora import NOT_DELIVERED, LoraFedAvg, ReplyOutcome, RoundReport

log = logging.getLogger(__name__)

WEIGHT_USED = "weight-used"  # participation metric: the node's aggregation weight this round
MEAN_SHARE = "mean-share"  # participation metric: its share of the aggregate (after FedNova)


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
    dp_epsilon: float | None = None  # with DP on: ε spent by the whole run, at its dp-delta


def open_store(cfg: RunConfig) -> VersionStore:
    root = cfg.output_path
    root.mkdir(parents=True, exist_ok=True)
    return VersionStore(root, cfg.store_url or None)


class Federation:
    """One run of ``cfg.run_name``: :meth:`run` does the remaining rounds (resuming if stored)."""

    def __init__(
        self,
        grid: Grid,
        cfg: RunConfig,
        strategy: Strategy,
        lora_strategy: LoraFedAvg,
        store: VersionStore,
    ) -> None:
        self.grid = grid
        self.cfg = cfg
        self.strategy = strategy  # possibly a wrapper (DP) around lora_strategy
        self.lora = lora_strategy
        self.store = store
        # (The model first: a run is recorded only once its model and held-out data load, so a
        # typo in either leaves nothing that a corrected rerun of the same name would be held to.)
        self.evaluator = CentralEvaluator(cfg)
        self.run_info = store.open_run(cfg.run_name, cfg.to_flat(), base_model=cfg.model)
        # What replicas file this run's versions under: the name plus when the run was created,
        # so a new run of the same name (another output-dir, a fresh store) starts its own
        # lineage on replicas that served an earlier one, instead of being refused as older.
        self.run_key = run_key(self.run_info)
        self.coordination = CoordinationState()
        # The noise multiplier of every noised aggregate so far (resumed runs: from the store).
        self.dp_releases: list[float] = []
        self.peft_config = cfg.lora.to_peft_config_dict(cfg.model)

    def run(self) -> FederationSummary:
        """The remaining rounds; the run's status in the store says how it ended."""
        run_id = self.run_info.id
        self.store.set_run_status(run_id, "running")
        try:
            summary = self._run()
        except BaseException as e:
            self.store.end_run(run_id, "failed", RUN_FAILED, {"error": f"{type(e).__name__}: {e}"})
            raise
        latest = {"latest_version": summary.latest_version}
        self.store.end_run(run_id, "finished", RUN_FINISHED, latest)
        return summary

    def _run(self) -> FederationSummary:
        latest = self._initial_version()
        done = max(self.store.last_completed_round(self.run_info.id), latest.round_number)
        first = done + 1
        if first > self.cfg.num_server_rounds:
            log.warning(
                "run %r in %s already completed %d rounds (num-server-rounds=%d); nothing to do "
                "(a new run needs another run-name or output-dir)",
                self.cfg.run_name,
                self.cfg.output_path,
                done,
                self.cfg.num_server_rounds,
            )
        arrays = state_to_arrayrecord(self.store.load_version(latest))
        for rnd in range(first, self.cfg.num_server_rounds + 1):
            arrays, latest = self._round(rnd, arrays, latest)
        versions = self.store.list_versions(self.run_info.id)
        return FederationSummary(
            run_name=self.cfg.run_name,
            first_round=first,
            last_round=self.cfg.num_server_rounds,
            latest_version=versions[-1].number,
            initial_eval_loss=versions[0].eval_loss,
            final_eval_loss=versions[-1].eval_loss,
            versions_dir=str(self.store.version_dir(versions[-1]).parent),
            store_url=self.store.url,
            dp_epsilon=(
                epsilon_spent(self.dp_releases, self.cfg.dp_delta)
                if self.cfg.dp_noise_multiplier > 0
                else None
            ),
        )

    def _initial_version(self) -> VersionInfo:
        """Version 0 (fresh LoRA, B = 0, so it serves exactly the base model), or the latest."""
        run_id = self.run_info.id
        latest = self.store.latest_version(run_id)
        if latest is None:
            state = get_adapter_state(self.evaluator.model)
            ev = self.evaluator.evaluate(state)
            metrics = {"eval-loss": ev.loss, "eval-perplexity": ev.perplexity}
            latest = self.store.save_version(run_id, 0, state, self.peft_config, metrics, ev.loss)
            log.info(
                "round 0: initial adapter v0 | central eval loss %.4f ppl %.2f",
                ev.loss,
                ev.perplexity,
            )
            if self.cfg.publish_versions:
                self._publish(state_to_arrayrecord(state), 0)
        else:
            log.info(
                "resuming run %r from version v%d (round %d)",
                self.cfg.run_name,
                latest.number,
                latest.round_number,
            )
            if self.cfg.publish_versions:  # a crash may have come between storing and publishing
                self._publish(state_to_arrayrecord(self.store.load_version(latest)), latest.number)
        first = self.store.list_versions(run_id)[0]
        if first.eval_loss is not None:
            self.coordination.loss_history.append((0, first.eval_loss))
        ok_nodes = Counter(
            p.round_number for p in self.store.participations(run_id) if p.status == "ok"
        )
        # Every release on record (noised or not: 0), an attempt at a round that crashed before
        # its row included (what came of it, a gate's loss, a log line, was out): each counts in
        # ε.
        releases = self.store.events(run_id, DP_RELEASE)
        self.dp_releases.extend(
            float(z) for e in releases if finite_number(z := e.payload.get("noise_multiplier"))
        )
        released_rounds = {e.payload.get("round") for e in releases}
        for r in self.store.list_rounds(run_id):  # the loss curve so far, for the policy
            promoted = r.status == "aggregated"  # as the live loop: a gated version's loss is not
            loss = r.eval_loss if promoted else None
            if "steps-per-node" in r.metrics:
                steps = r.metrics["steps-per-node"]
            else:  # (stored by an older collm: the total over its nodes)
                steps = r.metrics.get("steps-total", 0.0) / max(1, ok_nodes[r.number])
            self.coordination.observe_round(steps, loss)
            if r.number in released_rounds:  # (counted above, with any attempt that crashed)
                continue
            if DP_NOISE_MULTIPLIER in r.metrics:
                self.dp_releases.append(r.metrics[DP_NOISE_MULTIPLIER])
            elif r.eval_loss is not None:  # released by a collm that did not record its noise:
                # noised as the run was started, or not at all (which no later noise makes
                # private)
                stored = self.run_info.config.get("dp-noise-multiplier", 0.0)
                z = float(stored) if isinstance(stored, int | float) else 0.0
                self.dp_releases.append(z if z > 0 else 0.0)
        saved = [  # the forecasts, speeds and load reports as the last round left them
            e.payload.get(STATE_KEY) for e in self.store.events(run_id, COORDINATION_STATE)
        ]
        if saved:
            nodes = {int(n) for n in self.grid.get_node_ids()}  # (a restarted node has a new id)
            restored = self.coordination.restore(saved[-1], nodes)
            log.info(
                "allocation: forecasts, step times and load reports of %d node(s) restored",
                restored,
            )
        return latest

    def _round(
        self, rnd: int, arrays: ArrayRecord, latest: VersionInfo
    ) -> tuple[ArrayRecord, VersionInfo]:
        cfg, store, run_id = self.cfg, self.store, self.run_info.id
        started_at, started = datetime.now(UTC), time.perf_counter()
        self.lora.plan_budgets = lambda nodes: self.coordination.budgets(
            cfg, nodes, store, run_id, rnd
        )
        train_config = ConfigRecord(
            {
                "local-steps": cfg.local_steps,
                "learning-rate": cfg.learning_rate,
                "batch-size": cfg.batch_size,
                "global-version": latest.number,
                "deadline-s": cfg.round_deadline_s,
                "run-key": self.run_key,
            }
        )
        messages = list(self.strategy.configure_train(rnd, arrays, train_config, self.grid))
        messages, later = held_for_turns(messages, self.lora.node_budgets or {})
        undelivered: list[int] = []
        recipients: dict[str, int] = {}
        replies = exchange(
            self.grid,
            messages,
            cfg.round_timeout,
            undelivered=undelivered,
            recipients=recipients,
            later=later,
        )
        self.lora.not_delivered, self.lora.recipients = set(undelivered), recipients
        if self.strategy is not self.lora:
            # Flower's DP wrappers refuse a whole round over one error reply (a node that left
            # mid-round): ours counts it as a failed node, a zero update under uniform weights.
            self.lora.error_replies = {
                self.lora.node_of(r): str(r.error.reason) for r in replies if r.has_error()
            }
            replies = [r for r in replies if not r.has_error()]
        self.lora.last_report = None
        new_arrays, train_metrics = self.strategy.aggregate_train(rnd, replies)
        report = self.lora.last_report
        if report is None:  # a wrapping strategy (Flower's DP) did not pass the round on
            report = self.lora.report_unaggregated(rnd, replies)
        for o in report.outcomes:
            self.coordination.observe(o.node_id, o.metrics, accepted=o.status == "ok")
        steps_total = int(sum(_trained_steps(report)))
        steps_per_node = _aggregate_steps(report, self.lora.uniform_weights, new_arrays is not None)
        # The nodes' averaged metrics, less what only the server may say (a node sending
        # dp-epsilon must not set the run's privacy account) and anything not finite (a sum of
        # large finite claims can overflow; stored JSON and some databases refuse infinities).
        node_metrics = {
            k: float(v)
            for k, v in (train_metrics or {}).items()
            if isinstance(v, int | float) and k not in SERVER_METRICS and math.isfinite(v)
        }
        train_loss = node_metrics.get(TRAIN_LOSS)

        eval_loss = eval_ppl = None
        new_state, note, failure = None, "", report.failure
        if new_arrays is not None:
            # On record before anything comes of it (the gate's event holds its loss): a crash
            # after this and before the round's row must not make its release uncounted. Without
            # noise too (0): a run resumed with DP on must not count such a release as none.
            release = {"round": rnd, "noise_multiplier": cfg.dp_noise_multiplier}
            store.record_event(run_id, DP_RELEASE, release)
        if new_arrays is not None:
            new_state = arrayrecord_to_state(new_arrays)
            unusable = unusable_aggregate(new_state)
            if unusable is None:
                try:
                    ev = self.evaluator.evaluate(new_state)
                except AdapterValidationError as e:  # (the checks above should have caught it)
                    unusable = f"the aggregate cannot be evaluated: {e}"
                else:  # finite factors can still overflow the logits: never served, gate or not
                    if not math.isfinite(ev.loss):
                        unusable = f"the aggregate's central eval loss is {ev.loss}"
            if unusable is not None:
                log.error("round %d: %s; keeping the previous version", rnd, unusable)
                new_state, failure = None, unusable
            else:
                eval_loss, eval_ppl = ev.loss, ev.perplexity
                if not self._passes_quality_gate(rnd, ev.loss):
                    new_state, note = None, " (quality gate: kept previous)"
        if new_state is None and failure is not None:
            note = f" ({failure}: kept previous)"
            store.record_event(run_id, "aggregation-failed", {"round": rnd, "reason": failure})
        elif new_arrays is None and not report.aggregated:
            note = " (kept previous)"
        metrics = dict(node_metrics)
        metrics["steps-total"] = float(steps_total)
        metrics["steps-per-node"] = steps_per_node
        if new_arrays is not None:
            # An aggregate was released (gated out, found unusable or not: the server saw it),
            # with its noise (0: none), so a run resumed with DP on counts what came before. (An
            # unusable one counts too: over-counting ε is the safe side.)
            self.dp_releases.append(cfg.dp_noise_multiplier)
            metrics[DP_NOISE_MULTIPLIER] = cfg.dp_noise_multiplier
            if cfg.dp_noise_multiplier > 0:
                metrics[DP_EPSILON] = epsilon_spent(self.dp_releases, cfg.dp_delta)
        seconds = time.perf_counter() - started
        record = RoundRecord(
            number=rnd,
            status=(
                "aggregated"
                if new_state is not None
                else "failed"
                if failure is not None
                else "kept-previous"
            ),
            started_at=started_at,
            finished_at=datetime.now(UTC),
            num_ok=report.count("ok"),
            num_rejected=report.count("rejected"),
            num_failed=report.count("failed"),
            train_loss=train_loss,
            eval_loss=eval_loss,
            eval_perplexity=eval_ppl,
            version_number=latest.number,  # the version in force; a saved one replaces it
            seconds=seconds,
            metrics=metrics,
        )
        participations = [participation_record(o) for o in report.outcomes]
        version = latest
        if new_state is not None and new_arrays is not None:
            assert eval_loss is not None and eval_ppl is not None  # (evaluated above)
            version_metrics = {"eval-loss": eval_loss, "eval-perplexity": eval_ppl}
            if train_loss is not None:
                version_metrics["train-loss"] = train_loss
            if DP_EPSILON in metrics:
                version_metrics[DP_EPSILON] = metrics[DP_EPSILON]
            # The version, the round and its participations in one transaction.
            version = store.save_version(
                run_id,
                rnd,
                new_state,
                self.peft_config,
                version_metrics,
                eval_loss,
                round=record,
                participations=participations,
            )
            arrays = new_arrays
        else:
            store.record_round_result(run_id, record, participations)
        self.coordination.observe_round(
            steps_per_node, eval_loss if version is not latest else None
        )
        if cfg.publish_versions and version is not latest:
            # After the round is on record: a crash before this publish is healed on resume.
            self._publish(arrays, version.number)
        # What the round's replies and acknowledgements taught the allocation, for a resume.
        state = {"round": rnd, STATE_KEY: self.coordination.snapshot()}
        store.record_event(run_id, COORDINATION_STATE, state)
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
            note,
            seconds,
        )
        if DP_EPSILON in metrics:
            log.info(
                "round %d | privacy spent: epsilon %.4g at delta %g after %d noised aggregate(s) "
                "(node-level, no sampling amplification: an upper bound)",
                rnd,
                metrics[DP_EPSILON],
                cfg.dp_delta,
                len(self.dp_releases),
            )
        return arrays, version

    def _passes_quality_gate(self, rnd: int, loss: float) -> bool:
        """A version worse than the best promoted one by more than the margin is not promoted."""
        margin = self.cfg.quality_gate_margin
        best = gate_reference(self.store.list_versions(self.run_info.id))
        if best is None or passes_quality_gate(loss, best.eval_loss, margin):
            return True
        log.warning(
            "round %d: quality gate: eval loss %.4f > best v%d's %.4f + margin %.4f; not promoted",
            rnd,
            loss,
            best.number,
            best.eval_loss,
            margin,
        )
        self.store.record_event(
            self.run_info.id,
            "quality-gate",
            {
                "round": rnd,
                "loss": loss,
                "best_version": best.number,
                "best_loss": best.eval_loss,
                "margin": margin,
            },
        )
        return False

    def _publish(self, arrays: ArrayRecord, version: int) -> int:
        """Send ``version`` to every connected node right after aggregation.

        Replica nodes swap it in through their shadow slot (also those that sat the round out)
        and answer with their load report; devices ignore it. Returns how many nodes
        acknowledged within ``publish-timeout`` (at most ``round-timeout``); failures are logged,
        never raised. Acknowledgements only carry load reports, and a node that misses a publish
        gets the version with its next train message, so a node that hangs must not hold the
        server for a round's timeout after every round.
        """
        started = time.perf_counter()
        nodes = list(self.grid.get_node_ids())
        messages = [
            Message(
                RecordDict(
                    {
                        ARRAYS_KEY: arrays,
                        CONFIG_KEY: ConfigRecord({"version": version, "run-key": self.run_key}),
                    }
                ),
                dst_node_id=node,
                message_type=PUBLISH,
            )
            for node in nodes
        ]
        acked = 0
        timeout = min(self.cfg.round_timeout, self.cfg.publish_timeout)
        recipients: dict[str, int] = {}  # (a SuperLink's own error reply names node 1)
        for reply in exchange(self.grid, messages, timeout, recipients=recipients):
            sender = int(reply.metadata.src_node_id)
            node = recipients.get(reply.metadata.reply_to_message_id, sender)
            if reply.has_error():
                log.warning("publish v%d: node %d failed: %s", version, node, reply.error.reason)
                continue
            acked += 1
            for record in reply.content.metric_records.values():
                # (an ack carries a load report; steps and seconds in it are no training's)
                self.coordination.observe(node, _floats(record), accepted=False)
        log.info(
            "published v%d to %d/%d nodes in %.1fs",
            version,
            acked,
            len(nodes),
            time.perf_counter() - started,
        )
        return acked


POLL_FIRST_S, POLL_MAX_S = 0.05, 1.0  # how often exchange() asks the SuperLink for replies
# A message lives as long as its reply is waited for, plus this much for clocks that differ
# between the ServerApp's machine and the SuperLink's (Flower's default is 12 hours).
TTL_SLACK_S = 60.0


@dataclass
class Later:
    """A message held back: pushed when ``after``'s reply comes, or ``due_s`` seconds into the
    exchange if that comes first (a turn: it starts when the turn before it ends, at its own
    start time at the latest). ``prepare(elapsed_s)`` sets it for when it goes."""

    message: Message
    after: int  # the node whose reply releases it
    due_s: float
    prepare: Callable[[float], None] | None = None


def exchange(
    grid: Grid,
    messages: Sequence[Message],
    timeout: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    undelivered: list[int] | None = None,
    recipients: dict[str, int] | None = None,
    later: Sequence[Later] = (),
) -> list[Message]:
    """Flower's ``send_and_receive``, polling for the replies sooner: push every message, then
    pull until each has its reply or ``timeout`` seconds have passed.

    Flower's deployment grid pulls every 3 s, so a reply waits there 1.5 s on average (twice a
    round: the training replies and the publish acknowledgements). Here the interval starts at
    ``POLL_FIRST_S`` and grows by half each time to ``POLL_MAX_S``: a reply that comes quickly is
    taken quickly, and a long round asks the SuperLink about once a second. The nodes whose
    message the SuperLink did not store are appended to ``undelivered`` (all of them when it
    took none: e.g. a batch refused as too large), and each stored message's id is mapped to the
    node it went to in ``recipients`` (a SuperLink's own error reply names node 1 as its sender).

    The ``later`` messages are pushed one by one as they are released (see :class:`Later`; one
    whose ``after`` node got no message, or refused it, goes at once); those not released
    before the timeout are never sent.

    Each message expires ``TTL_SLACK_S`` after the wait for it ends: a node back from an outage
    longer than that is not handed a round the server has given up on (it would train, or swap in
    a version, for nothing; with Flower's default time-to-live it would work through twelve hours
    of them).
    """
    started = clock()
    deadline = started + timeout
    sent_to: dict[str, int] = {}  # message id -> node
    done: set[int] = set()  # nodes whose reply came, or whose message went nowhere

    def push(batch: Sequence[Message]) -> list[str]:
        for msg in batch:
            # Flower counts a message's time-to-live from its creation: a held one was made
            # with the others, so it is made anew here (else it would expire early by the time
            # it was held, and one held past half its life would be refused as expired).
            msg.metadata.created_at = time.time()
            msg.metadata.ttl = max(0.0, deadline - clock()) + TTL_SLACK_S
        ids = list(grid.push_messages(batch))
        if len(ids) == len(batch) or not any(ids):
            for msg, message_id in itertools.zip_longest(batch, ids[: len(batch)]):
                node = int(msg.metadata.dst_node_id)
                if message_id:
                    sent_to[message_id] = node
                    if recipients is not None:
                        recipients[message_id] = node
                    continue
                log.warning("node %d: %s", node, NOT_DELIVERED)  # (its node left meanwhile?)
                done.add(node)
                if undelivered is not None:
                    undelivered.append(node)
        else:  # (a grid that leaves out what it refused: which ones, it does not say)
            log.warning(
                "the SuperLink took %d of %d messages; the others get no reply",
                sum(1 for i in ids if i),
                len(batch),
            )
            done.update(int(m.metadata.dst_node_id) for m in batch)
        # (No reply can come for a message that was not stored: waiting for it would take the
        # whole timeout.)
        return [i for i in ids if i]

    waiting = list(later)
    # (a held message's own node counts: the turn after it waits for it to go and reply)
    asked = {int(m.metadata.dst_node_id) for m in [*messages, *(w.message for w in waiting)]}

    def release() -> list[str]:
        now = clock() - started
        go = [w for w in waiting if w.after in done or w.after not in asked or now >= w.due_s]
        for w in go:
            waiting.remove(w)
            if w.prepare is not None:
                w.prepare(now)
        return push([w.message for w in go]) if go else []

    pending = set(push(messages)) if messages else set()
    pending.update(release())
    replies: list[Message] = []
    interval = POLL_FIRST_S
    while pending or waiting:
        if pending:
            got = list(grid.pull_messages(pending))
            replies += got
            for m in got:
                answered = m.metadata.reply_to_message_id
                pending.discard(answered)
                if answered in sent_to:
                    done.add(sent_to[answered])
        released = release()
        if released:
            pending.update(released)
            interval = POLL_FIRST_S  # (a reply to a new message may come quickly)
            continue
        left = deadline - clock()
        if not (pending or waiting) or left <= 0:
            break
        due = min((w.due_s - (clock() - started) for w in waiting), default=left)
        sleep(max(0.0, min(interval, left, due)))  # the SuperLink offers no wait-for-reply call
        interval = min(POLL_MAX_S, interval * 1.5)
    return replies


def _aggregate_steps(report: RoundReport, uniform_weights: bool, aggregated: bool) -> float:
    """How far the aggregate moved, in one node's steps, for the policy's quality-gain fit: the
    mean steps of the updates in it (a reply left out, weighing 0, moved nothing), under uniform
    weights (DP) over every node asked (the mean's divisor: those that trained nothing, failed or
    were rejected are zero updates in it); none when no aggregate came of them."""
    if not aggregated:
        return 0.0
    steps = _trained_steps(report, in_aggregate=True)
    divisor = len(report.outcomes) if uniform_weights else len(steps)
    return sum(steps) / divisor if steps else 0.0


def _trained_steps(report: RoundReport, in_aggregate: bool = False) -> list[float]:
    """The steps of each accepted reply that trained (``in_aggregate``: and was not left out,
    weighing 0); a node that reports no local-steps trained one, as the strategy counts it."""
    return [
        steps
        for o in report.outcomes
        if o.status == "ok"
        and not (in_aggregate and o.weight_used == 0.0)
        and (steps := o.metrics.get("local-steps", 1.0)) > 0
    ]


def held_for_turns(
    messages: Sequence[Message], budgets: Mapping[int, NodeBudget]
) -> tuple[list[Message], list[Later]]:
    """The train messages to push now, and those held until the turn before theirs has replied
    (the allocation's turns, ``turn_before``, among the nodes asked: a strategy that samples
    some nodes leaves the others' turns out), or until the turn's planned start: such a message
    goes out with ``start-after-s`` 0 and what is left of its ``deadline-s``. The first turn
    asked goes now, with ``start-after-s`` 0 too: a turn left out before it (a node sampled out,
    or gone) leaves no one to wait for."""
    asked = {int(m.metadata.dst_node_id) for m in messages}
    before = turn_before(b for node, b in budgets.items() if node in asked)
    now: list[Message] = []
    held: list[Later] = []
    for msg in messages:
        node = int(msg.metadata.dst_node_id)
        if node not in before:
            if node in budgets and budgets[node].turn > 0:
                msg.content.config_records[CONFIG_KEY]["start-after-s"] = 0.0
            now.append(msg)
            continue
        budget = budgets[node]

        def prepare(elapsed: float, msg: Message = msg, budget: NodeBudget = budget) -> None:
            config = msg.content.config_records[CONFIG_KEY]
            config["start-after-s"] = 0.0
            config["deadline-s"] = max(budget.deadline_s - elapsed, MIN_DEADLINE_S)

        held.append(Later(msg, before[node], budget.start_after_s, prepare))
    return now, held


DP_NOISE_MULTIPLIER = "dp-noise-multiplier"  # round metric: the noise of the aggregate it released
DP_RELEASE = "dp-release"  # event: an aggregate released (round, noise_multiplier; 0: none)
DP_EPSILON = "dp-epsilon"  # round metric: ε spent by the run so far, at the run's dp-delta
# Metrics only the server sets (of a round, or of a node's participation): the same names in
# the nodes' metrics are dropped.
SERVER_METRICS = frozenset(
    {"steps-total", "steps-per-node", DP_NOISE_MULTIPLIER, DP_EPSILON, WEIGHT_USED, MEAN_SHARE}
)


def run_key(run: RunInfo) -> str:
    """A run's name on the replicas: ``<name>.<created, UTC, to the second>`` (a database that
    drops microseconds or hands back another time zone gives a resumed run the same key)."""
    created = run.created_at
    created = created.replace(tzinfo=UTC) if created.tzinfo is None else created.astimezone(UTC)
    return f"{run.name[:100]}.{created.strftime('%Y%m%dT%H%M%S')}"


def unusable_aggregate(state: AdapterState) -> str | None:
    """Why an aggregate cannot become a version (a value that is not finite in float32, what
    the model computes in), or None."""
    for key, value in sorted(state.items()):
        with np.errstate(over="ignore"):  # (an overflow is what is looked for)
            as_served = np.asarray(value, dtype=np.float32)
        bad = int(as_served.size - np.count_nonzero(np.isfinite(as_served)))
        if bad:
            return f"the aggregate has {bad} non-finite values in {key}"
    return None


def participation_record(outcome: ReplyOutcome) -> ParticipationRecord:
    """What the store keeps of one node's round: its outcome, metrics and the weight it got.

    The aggregation weight goes into the metrics as ``weight-used`` (it differs from the claimed
    ``num-examples`` when ``max-weight-ratio`` capped it; the reason then says so), and its share
    of the aggregate as ``mean-share`` (FedNova's normalization moves it off the weights' share
    when the nodes ran different numbers of steps; absent when no aggregate was computed, or under
    ``robust``; present when one was computed and then gated out).
    """
    # (the server's own keys: a node's claim of them is not kept, whatever the outcome)
    metrics = {k: v for k, v in outcome.metrics.items() if k not in SERVER_METRICS}
    if outcome.weight_used is not None:
        metrics[WEIGHT_USED] = outcome.weight_used
    if outcome.mean_share is not None:
        metrics[MEAN_SHARE] = outcome.mean_share
    return ParticipationRecord(
        node_id=outcome.node_id,
        status=cast(ParticipationStatus, outcome.status),
        reason=outcome.reason,
        num_examples=outcome.num_examples,
        train_loss=outcome.metrics.get(TRAIN_LOSS),
        metrics=metrics,
    )


def gate_reference(versions: Sequence[VersionInfo]) -> VersionInfo | None:
    """The version a new one is held against: the best (lowest central loss) promoted so far,
    so that regressions each within the margin cannot add up."""
    scored = [v for v in versions if v.eval_loss is not None]
    return min(scored, key=lambda v: (v.eval_loss, -v.number)) if scored else None


def passes_quality_gate(loss: float, served_loss: float | None, margin: float) -> bool:
    """May a version with central ``loss`` replace one with ``served_loss``? (margin < 0: off)."""
    if margin < 0 or served_loss is None:
        return True
    return math.isfinite(loss) and loss <= served_loss + margin


def _floats(record: MetricRecord) -> dict[str, float]:
    """The finite numbers of a node's metric record (what the coordination may take in)."""
    return {
        k: float(v)
        for k, v in record.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"
