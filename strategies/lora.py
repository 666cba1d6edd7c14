"""LoRA-aware federated averaging: validate every update, then aggregate factors or products.

``LoraFedAvg`` is Flower's ``FedAvg`` with two hooks changed:
- ``configure_train`` remembers the global adapter it sends (the reference replies are checked
  against) and never mutates the caller's ConfigRecord;
- ``aggregate_train`` validates each reply (keys, shapes, finite values, update-norm bound), logs
  and reports every rejection with its node and reason, and aggregates the good ones with
  :func:`aggregate_lora_exact` (default) or :func:`aggregate_lora_fedavg`, or, with ``robust``
  set, the coordinate-wise median or trimmed mean of :func:`aggregate_lora_robust`. A round with
  fewer good replies that trained than ``min_good_replies`` returns no arrays, so the previous
  version stays in force (under DP too, where a reply that trained nothing stays in as a zero
  update); so does a robust round of fewer than ``MIN_ROBUST_UPDATES`` (3) updates, of which no
  statistic can outvote one. A reply that claims steps but sends the global adapter back as it
  was is left out as one that trained nothing is. Each good reply weighs its claimed
  ``num-examples``, capped at ``max_weight_ratio`` times the round's median claim when that is
  set (a capped node is logged and its outcome says so).
  Replies that ran different ``local-steps`` (one cut short by its deadline, or given a small
  budget by the allocation) are averaged as FedNova does (:func:`step_normalized`): the mean of
  their per-step updates, moved the examples-weighted mean number of steps, so an update cut
  short neither pulls the average back nor tilts it toward the nodes that trained most (equal
  steps: FedAvg); a claimed step count counts as at least the round's most / 4, so no claim
  raises an update's share of the step more than 4× (``MAX_STEP_RATIO``). An outcome's
  ``weight_used`` is its (capped) examples weight, before that normalization; ``mean_share`` its
  share of the aggregate the round produced, after it. In ``fedavg`` mode (A and B averaged
  apart) with ``max_update_norm`` set, a reply whose factor change per step is over
  ``MAX_FACTOR_DELTA_RATIO`` × the round's lower median is rejected (2+ replies that trained):
  ``(B/c, A·c)`` passes the product-norm bound whatever c, and its A·c would multiply everyone's
  B. (Not with a robust statistic, which combines the products, nor under uniform weights,
  where DP's clipping bounds the factors and a screen against the others' median would let one
  node decide whether another counts.) A round in which no good reply trained a step releases
  nothing (under DP, its noise would spend privacy for nothing). A reply is credited to the
  node its message went to (``recipients``, set by the ServerApp): the SuperLink's own error
  replies come from node 1.
  With ``server_lr`` η ≠ 1 the new global adapter is ``global + η·(aggregate − global)`` (a
  server step as in FedOpt; see :func:`~collm_fl.aggregation.check_server_lr`) wherever 2+
  updates are averaged; one update alone is applied as it is. With
  ``uniform_weights`` (set under differential privacy) no node sits a round out, every good reply
  weighs 1 whatever it claims, and a node that trained nothing (whatever arrays it sent), failed,
  was rejected or did not answer counts as a zero update: the plain mean of the clipped updates
  over every node asked (at least ``min-train-nodes``), so one node moves it by at most C / that
  many, the sensitivity Flower's noise (σ·C / ``min-train-nodes``) is calibrated for; with
  ``clipping_norm`` C (the ServerApp sets it under DP) a reply whose change of the factors is
  over C was not clipped by its client and is rejected, and one over C by no more than float32
  rounding (``CLIP_SLACK``) is clipped to C here. Metrics are averaged over the
  nodes that send them, weighted by their examples weight (a reply that trained nothing weighs
  0 there);
  a ``train_metrics_aggr_fn`` given to FedAvg is not used.

It composes with Flower's wrappers, e.g.
``DifferentialPrivacyClientSideFixedClipping(LoraFedAvg(mode="fedavg", uniform_weights=True),
...)``: the plain mean Flower's noise is calibrated for (uniform weights require fedavg mode, no
robust statistic and a server learning rate of 1; any other aggregate changes one node's
influence).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from collm_fl.adapters import MAX_SERVER_LR, AdapterState
from collm_fl.aggregation import (
    MAX_STEP_RATIO,
    aggregate_lora_exact,
    aggregate_lora_fedavg,
    check_server_lr,
    factor_delta_norm,
    step_normalized,
)
from collm_fl.aggregation_robust import (
    MIN_ROBUST_UPDATES,
    ROBUST_METHODS,
    RobustMethod,
    aggregate_lora_robust,
    cap_weights,
)
from collm_fl.config import config_int
from collm_fl.flower_records import (
    ARRAYS_KEY,
    CONFIG_KEY,
    LOCAL_STEPS,
    NUM_EXAMPLES,
    arrayrecord_to_state,
    state_to_arrayrecord,
)
from collm_fl.validation import clip_factor_update, key_problems, validate_update
from strategies.allocation import NodeBudget

log = logging.getLogger(__name__)

OK, REJECTED, FAILED = "ok", "rejected", "failed"
ROBUST_CHOICES = ("none", *ROBUST_METHODS)
# A claim of more examples than a float counts exactly is no count (and would overflow the
# store's 64-bit integers, or the weights' total).
MAX_NUM_EXAMPLES = 2**53
# A clipped update sent as float32 factors (reference + clipped change), its norm recomputed
# here in float64: rounding can put it a little over the clipping norm.
CLIP_SLACK = 1e-3
CLIP_SLACK_ABS = 1e-6
# fedavg mode with max_update_norm: a reply whose factor change is over this x the round's median
# is rejected (see LoraFedAvg._reject_factor_outliers)
MAX_FACTOR_DELTA_RATIO = 10.0
NOT_DELIVERED = "not delivered: the SuperLink did not take the message (did the node leave?)"


@dataclass(frozen=True)
class ReplyOutcome:
    """What happened to one node's reply in a round."""

    node_id: int
    status: str  # "ok" | "rejected" | "failed"
    reason: str | None = None
    num_examples: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    update_norm: float | None = None
    weight_used: float | None = None  # aggregation weight (claimed num-examples, maybe capped)
    mean_share: float | None = None  # its share of the mean (after FedNova); None: robust mode


@dataclass(frozen=True)
class RoundReport:
    """Per-round bookkeeping the ServerApp stores: who contributed, who was rejected and why."""

    server_round: int
    outcomes: tuple[ReplyOutcome, ...]
    aggregated: bool
    failure: str | None = None  # why the good replies could not be aggregated, if they could not

    def count(self, status: str) -> int:
        return sum(1 for o in self.outcomes if o.status == status)


class LoraFedAvg(FedAvg):
    """FedAvg for LoRA adapters with reply validation and exact (product-space) aggregation."""

    def __init__(
        self,
        *,
        mode: str = "exact",
        max_update_norm: float | None = None,
        min_good_replies: int = 1,
        robust: str = "none",
        trim_fraction: float = 0.2,
        max_weight_ratio: float = 0.0,
        server_lr: float = 1.0,
        uniform_weights: bool = False,
        clipping_norm: float | None = None,
        **fedavg_kwargs: object,
    ) -> None:
        if mode not in ("exact", "fedavg"):
            raise ValueError(f"mode must be 'exact' or 'fedavg', got {mode!r}")
        if min_good_replies < 1:
            raise ValueError(f"min_good_replies must be >= 1, got {min_good_replies}")
        if robust not in ROBUST_CHOICES:
            raise ValueError(f"robust must be one of {', '.join(ROBUST_CHOICES)}, got {robust!r}")
        if not 0.0 <= trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
        if not (max_weight_ratio == 0.0 or 1.0 <= max_weight_ratio < float("inf")):
            raise ValueError(f"max_weight_ratio must be 0 (off) or >= 1, got {max_weight_ratio}")
        if max_update_norm is not None and not (
            max_update_norm >= 0 and math.isfinite(max_update_norm)
        ):
            raise ValueError(
                f"max_update_norm must be 0 (off) or a finite bound > 0, got {max_update_norm}"
            )
        check_server_lr(server_lr)
        if uniform_weights and (mode != "fedavg" or robust != "none" or server_lr != 1.0):
            raise ValueError(
                "uniform_weights (the plain mean differential privacy is calibrated for) needs "
                f"mode='fedavg', robust='none' and server_lr=1, got mode={mode!r}, "
                f"robust={robust!r}, server_lr={server_lr}"
            )
        if clipping_norm is not None and not (clipping_norm > 0 and math.isfinite(clipping_norm)):
            raise ValueError(f"clipping_norm must be a finite norm > 0, got {clipping_norm}")
        super().__init__(**fedavg_kwargs)  # type: ignore[arg-type]
        if robust != "none" and self.min_train_nodes < MIN_ROBUST_UPDATES:
            log.warning(
                "robust-aggregation=%s with min-train-nodes=%d: a round of fewer than %d updates "
                "keeps the previous version (none of them could be outvoted)",
                robust,
                self.min_train_nodes,
                MIN_ROBUST_UPDATES,
            )
        self.mode = mode
        self.max_update_norm = max_update_norm if max_update_norm else None
        self.min_good_replies = min_good_replies
        self.robust = robust  # "none": combine with ``mode``; else the robust statistic
        self.trim_fraction = trim_fraction
        self.max_weight_ratio = max_weight_ratio  # 0: claimed num-examples used as they are
        self.server_lr = server_lr  # η of the server step (1: plain FedAvg)
        self.uniform_weights = uniform_weights  # DP: each reply weighs 1, claims ignored
        # DP with client-side clipping: the L2 norm every reply's change of the factors must be
        # within (the clients clip to it; one that did not is rejected, not trusted)
        self.clipping_norm = clipping_norm
        self.current_arrays = ArrayRecord()
        self.last_report: RoundReport | None = None
        # Per-node budgets for the next round (from the allocation policy); a replica sitting
        # the round out is asked for 0 steps (for its load report), a device that sits out is
        # not asked. None: every sampled node gets the round config.
        self.node_budgets: dict[int, NodeBudget] | None = None
        # Set by the ServerApp: the budgets of the nodes sampled (called once Flower's sampling
        # has waited for its nodes: budgets planned before it missed a node that connected in
        # the wait, which then trained the plain round config, its decision stored nowhere).
        self.plan_budgets: Callable[[list[int]], dict[int, NodeBudget] | None] | None = None
        # Nodes asked to train this round -> most steps they were asked for (None: not known).
        self._asked: dict[int, int | None] = {}
        # Nodes of this round whose message the SuperLink did not take (set by the ServerApp).
        self.not_delivered: set[int] = set()
        # This round's message id -> the node it went to (set by the ServerApp): the SuperLink's
        # own error replies (node unavailable, reply expired) come from node 1, not the node.
        self.recipients: dict[str, int] = {}
        # Error replies a wrapping strategy was not shown (node -> reason; set by the ServerApp).
        self.error_replies: dict[int, str] = {}

    def node_of(self, msg: Message) -> int:
        """The node a reply answers for: the one its message went to, where known."""
        return self.recipients.get(msg.metadata.reply_to_message_id, int(msg.metadata.src_node_id))

    def summary(self) -> None:
        log.info(
            "LoraFedAvg: mode=%s robust=%s trim-fraction=%g max-update-norm=%s "
            "max-weight-ratio=%g server-lr=%g min-good-replies=%d uniform-weights=%s",
            self.mode,
            self.robust,
            self.trim_fraction,
            self.max_update_norm,
            self.max_weight_ratio,
            self.server_lr,
            self.min_good_replies,
            self.uniform_weights,
        )
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current_arrays = arrays
        messages = list(
            super().configure_train(server_round, arrays, ConfigRecord(dict(config)), grid)
        )
        if self.plan_budgets is not None:
            self.node_budgets = self.plan_budgets(
                sorted(int(m.metadata.dst_node_id) for m in messages)
            )
        if not self.node_budgets:
            messages = list(messages)
            self._asked = {int(m.metadata.dst_node_id): _steps_asked(m) for m in messages}
            return messages
        out = []
        for msg in messages:
            node = int(msg.metadata.dst_node_id)
            budget = self.node_budgets.get(node)
            if budget is None:
                out.append(msg)
                continue
            if budget.sits_out and not (budget.reports_load or self.uniform_weights):
                # (A device no step of which fits the deadline: asking it would only load its
                # model for nothing.)
                log.info("round %d: node %d sits out (%s)", server_round, node, budget.reason)
                continue
            if budget.sits_out:
                # A replica is still asked, for 0 steps: its reply is the only way its load
                # report reaches the next round's allocation (skipped, one that sat out once
                # would be judged on that stale report for ever). Under uniform weights every
                # node's zero update also belongs in the mean DP's noise is calibrated for.
                log.info(
                    "round %d: node %d sits out (%s): asked for 0 steps, for its load report",
                    server_round,
                    node,
                    budget.reason,
                )
            node_config = ConfigRecord(
                {
                    **dict(msg.content.config_records.get(CONFIG_KEY, ConfigRecord())),
                    "local-steps": budget.steps,
                    "backfill-steps": budget.backfill_steps,
                    "training-share": budget.share,
                    "deadline-s": budget.deadline_s,
                    "start-after-s": budget.start_after_s,
                }
            )
            out.append(
                Message(
                    RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: node_config}),
                    dst_node_id=node,
                    message_type=msg.metadata.message_type,
                )
            )
        self._asked = {int(m.metadata.dst_node_id): _steps_asked(m) for m in out}
        return out

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return super().configure_evaluate(server_round, arrays, ConfigRecord(dict(config)), grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        reference = arrayrecord_to_state(self.current_arrays)
        outcomes: list[ReplyOutcome] = []
        good: list[tuple[AdapterState, int, Message]] = []
        good_at: list[int] = []  # index in outcomes of each good reply
        for msg in self._first_per_node(server_round, replies):
            node = self.node_of(msg)
            screened = self._screen(server_round, msg, reference)
            if isinstance(screened, ReplyOutcome):  # failed or rejected
                outcomes.append(screened)
                continue
            state, metrics, norm = screened
            n = int(metrics[NUM_EXAMPLES])
            idle = metrics.get(LOCAL_STEPS, 1.0) <= 0
            if idle and self.uniform_weights:
                # Under DP it stays in as a zero update: the reference, not what it sent (a node
                # that trained nothing moved nothing; its arrays would move the mean).
                state = reference
            elif idle or _unchanged(state, reference):
                # Nothing trained (the deadline came first, or a backfill-only budget found no
                # idle time), or steps claimed and the global state sent back as it was: it would
                # only dilute the others' updates (and, in fedavg mode, a rescaled update's A·c
                # would pass the factor screen beside it). (Under uniform weights it stays in: a
                # zero update in the mean DP's noise is calibrated for.)
                reason = (
                    "trained 0 steps: nothing to aggregate"
                    if idle
                    else "claimed steps but changed nothing: nothing to aggregate"
                )
                log.info("round %d: node %d %s", server_round, node, reason)
                outcomes.append(ReplyOutcome(node, OK, reason, n, metrics, norm, weight_used=0.0))
                continue
            good_at.append(len(outcomes))
            outcomes.append(ReplyOutcome(node, OK, None, n, metrics, norm))
            good.append((state, n, msg))
        # The rescaled-factor screen guards fedavg's mean of A and B apart. A robust statistic
        # combines the products B·A, which the rescaling leaves unchanged; and under uniform
        # weights (DP) clipping (each reply checked against C in _screen) bounds every node's
        # factors, while a screen judged against the other nodes' median would let one node
        # decide whether others count, beyond the C / nodes the noise is calibrated for.
        if (
            self.mode == "fedavg"
            and self.max_update_norm is not None
            and self.robust == "none"
            and not self.uniform_weights
        ):
            good, good_at = self._reject_factor_outliers(
                server_round, outcomes, good, good_at, reference
            )
        weights = self._cap_weights(server_round, outcomes, good_at)

        self._add_missing_replies(server_round, outcomes)
        # Under uniform weights replies that trained nothing stay in (zero updates), but they
        # are no updates: counted as good, one update halved (and noised) was released where
        # without DP the round keeps the previous version. And a round where none trained has
        # nothing to release: its noise would spend privacy for nothing.
        n_trained = sum(outcomes[i].metrics.get(LOCAL_STEPS, 1.0) > 0 for i in good_at)
        aggregated = n_trained >= self.min_good_replies  # (>= 1: some node trained)
        # A robust statistic of fewer updates is their weighted mean (none can be outvoted): the
        # defence asked for would be off in the rounds where nodes dropped out.
        too_few_robust = self.robust != "none" and 0 < n_trained < MIN_ROBUST_UPDATES
        aggregated = aggregated and not too_few_robust
        self.last_report = RoundReport(server_round, tuple(outcomes), aggregated)
        if not aggregated:
            if good and not n_trained:
                log.warning("round %d: no node trained; keeping the previous version", server_round)
            elif too_few_robust and n_trained >= self.min_good_replies:
                log.warning(
                    "round %d: %d updates, robust-aggregation=%s needs %d to outvote one; keeping "
                    "the previous version",
                    server_round,
                    n_trained,
                    self.robust,
                    MIN_ROBUST_UPDATES,
                )
            else:
                log.warning(
                    "round %d: %d replies that trained < min-good-replies=%d; keeping the "
                    "previous version",
                    server_round,
                    n_trained,
                    self.min_good_replies,
                )
            return None, None
        states = [state for state, _, _ in good]
        mean_weights, step_scale = weights, 1.0
        if not self.uniform_weights and self.robust == "none":
            steps = [outcomes[i].metrics.get(LOCAL_STEPS) for i in good_at]
            mean_weights, step_scale = step_normalized(weights, steps)
            if step_scale != 1.0:
                log.info(
                    "round %d: local steps differ (%s): FedNova's normalized mean, server step "
                    "x%.3g",
                    server_round,
                    ", ".join(f"{s:g}" for s in steps if s is not None),
                    step_scale,
                )
        if self.uniform_weights:
            # The mean over every node asked: one that failed, was rejected or did not answer
            # counts as a zero update, so no single reply weighs more than the noise assumes.
            missing = len(outcomes) - len(good)  # every node asked has an outcome by now
            states += [reference] * missing
            mean_weights = weights = weights + [1.0] * missing
        try:
            new_state = self._aggregate(states, mean_weights, reference, step_scale, len(good))
        except (np.linalg.LinAlgError, RuntimeError, FloatingPointError, ValueError) as e:
            # A numerical failure of the aggregate must not take the server down: the round
            # keeps the previous version, with the reason on record.
            log.error(
                "round %d: aggregation failed (%s); keeping the previous version", server_round, e
            )
            self.last_report = replace(
                self.last_report, aggregated=False, failure=f"aggregation failed: {e}"
            )
            return None, None
        if self.robust == "none":  # (a median or trimmed mean has no per-node share)
            total = float(sum(mean_weights))
            for k, i in enumerate(good_at):
                outcomes[i] = replace(outcomes[i], mean_share=float(mean_weights[k]) / total)
            self.last_report = replace(self.last_report, outcomes=tuple(outcomes))
        good_metrics = [outcomes[i].metrics for i in good_at]
        # A reply that trained nothing (kept as a zero update under DP) says nothing of training.
        trained = [m.get(LOCAL_STEPS, 1.0) > 0 for m in good_metrics]
        metric_weights = [w if t else 0.0 for w, t in zip(weights, trained, strict=False)]
        return state_to_arrayrecord(new_state), aggregate_metrics(good_metrics, metric_weights)

    def _aggregate(
        self,
        states: list[AdapterState],
        weights: list[float],
        reference: AdapterState,
        step_scale: float = 1.0,
        updates: int = 2,
    ) -> AdapterState:
        # η offsets the averaging of parallel updates: one update alone is applied as it is.
        server_lr = self.server_lr if updates > 1 else 1.0
        eta = server_lr * step_scale  # (FedNova's τ_eff factor; 1 when steps are equal)
        if eta > MAX_SERVER_LR:
            log.warning(
                "server step %.3g (server-lr %g x step normalization %.3g) capped to %g",
                eta,
                server_lr,
                step_scale,
                MAX_SERVER_LR,
            )
            eta = MAX_SERVER_LR
        if self.robust != "none":
            new_state = aggregate_lora_robust(
                states, weights, reference, cast(RobustMethod, self.robust), self.trim_fraction
            )
            if eta != 1.0:  # the server step on the robust statistic, in product space
                new_state = aggregate_lora_exact(
                    [new_state], [1.0], server_lr=eta, reference=reference
                )
            return new_state
        if self.mode == "exact":
            return aggregate_lora_exact(states, weights, server_lr=eta, reference=reference)
        return aggregate_lora_fedavg(states, weights, server_lr=eta, reference=reference)

    def report_unaggregated(self, server_round: int, replies: Iterable[Message]) -> RoundReport:
        """The report of a round a wrapping strategy did not pass on (Flower's DP wrappers refuse
        a round with any failed reply): failures with their reason, every other reply checked as
        :meth:`aggregate_train` would (an invalid one rejected with its reasons, a valid one ok
        but weighing 0), and the nodes that never answered."""
        reference = arrayrecord_to_state(self.current_arrays)
        outcomes: list[ReplyOutcome] = []
        for msg in self._first_per_node(server_round, replies):
            screened = self._screen(server_round, msg, reference)
            if isinstance(screened, ReplyOutcome):  # failed or rejected
                outcomes.append(screened)
                continue
            _, metrics, norm = screened
            node = self.node_of(msg)
            reason = "valid, not aggregated: the wrapping strategy refused the round"
            n = int(metrics[NUM_EXAMPLES])
            outcomes.append(ReplyOutcome(node, OK, reason, n, metrics, norm, weight_used=0.0))
        self._add_missing_replies(server_round, outcomes)
        failed = sum(o.status == FAILED for o in outcomes)
        failure = f"the wrapping strategy refused the round ({failed} failed replies)"
        log.warning("round %d: %s; keeping the previous version", server_round, failure)
        self.last_report = RoundReport(server_round, tuple(outcomes), False, failure)
        return self.last_report

    def _first_per_node(self, server_round: int, replies: Iterable[Message]) -> Iterator[Message]:
        """Each node's first reply of the round; a later one is logged and dropped (the
        SuperLink takes one reply per message: defence in depth, so that no node's update is
        aggregated twice nor recorded twice)."""
        seen: set[int] = set()
        for msg in replies:
            node = self.node_of(msg)
            if node in seen:
                log.warning(
                    "round %d: rejected update from node %d: a second reply in the round "
                    "(only its first counts)",
                    server_round,
                    node,
                )
                continue
            seen.add(node)
            yield msg

    def _add_missing_replies(self, server_round: int, outcomes: list[ReplyOutcome]) -> None:
        """Flower drops the nodes that did not answer within the round's timeout: a ``failed``
        outcome for each node asked this round that is not in ``outcomes`` (in place)."""
        answered = {o.node_id for o in outcomes}
        for node in sorted(set(self._asked) - answered):
            if node in self.error_replies:
                reason = f"error reply: {self.error_replies[node]}"
            elif node in self.not_delivered:
                reason = NOT_DELIVERED
            else:
                reason = "no reply within the round timeout"
            log.warning("round %d: node %d failed: %s", server_round, node, reason)
            outcomes.append(ReplyOutcome(node, FAILED, reason))
        self._asked = {}
        self.not_delivered, self.recipients, self.error_replies = set(), {}, {}

    def _reject_factor_outliers(
        self,
        server_round: int,
        outcomes: list[ReplyOutcome],
        good: list[tuple[AdapterState, int, Message]],
        good_at: list[int],
        reference: AdapterState,
    ) -> tuple[list[tuple[AdapterState, int, Message]], list[int]]:
        """FedAvg mode averages A and B separately, so ``max_update_norm`` (a bound on the change
        of B·A) does not bound what a reply does to the mean: (B/c, A·c) has the same product and
        norm for any c, and its A·c multiplies everyone's B. With 2+ good replies, one whose
        factor change per step is over ``MAX_FACTOR_DELTA_RATIO`` × the round's lower median
        (with two, the smaller) is rejected (outcomes updated in place); the rest go on. (Of two,
        the larger is the one judged: a node can at most get an honest one rejected by sending a
        tiny update, which then moves the adapter by little.) Per step (the claimed steps floored
        at the round's most / ``MAX_STEP_RATIO``, as FedNova's weights): a node that trained 10
        steps beside nodes that trained 1 is no outlier. Replies that trained nothing (kept as
        zero updates under DP) are neither judged nor counted in the median."""
        trained = [
            (k, steps)
            for k, i in enumerate(good_at)
            if (steps := outcomes[i].metrics.get(LOCAL_STEPS, 1.0)) > 0
        ]
        if len(trained) < 2:
            return good, good_at
        most = max(steps for _, steps in trained)
        per_step = {
            k: factor_delta_norm(good[k][0], reference) / max(steps, most / MAX_STEP_RATIO)
            for k, steps in trained
        }
        # The lower median: with two replies the smaller one (a mean of the two would put the
        # rescaled one at 2x its own yardstick), with an odd count the median; of the replies that
        # changed the factors (ones that claim steps and send the global adapter back unchanged
        # would put the median, and the limit, at 0: every honest reply rejected).
        ordered = sorted(v for v in per_step.values() if v > 0)
        if len(ordered) < 2:
            return good, good_at
        median = ordered[(len(ordered) - 1) // 2]
        limit = MAX_FACTOR_DELTA_RATIO * median
        kept: list[tuple[AdapterState, int, Message]] = []
        kept_at: list[int] = []
        for k, (item, i) in enumerate(zip(good, good_at, strict=True)):
            if per_step.get(k, 0.0) <= limit:
                kept.append(item)
                kept_at.append(i)
                continue
            reason = (
                f"factor change {per_step[k]:.3g} per step is over {MAX_FACTOR_DELTA_RATIO:g} x "
                f"the round's median ({median:.3g}): fedavg averages A and B apart, where a "
                "rescaled (B/c, A*c) update passes the product-norm bound"
            )
            node = outcomes[i].node_id
            log.warning("round %d: rejected update from node %d: %s", server_round, node, reason)
            outcomes[i] = replace(outcomes[i], status=REJECTED, reason=reason)
        return kept, kept_at

    def _cap_weights(
        self, server_round: int, outcomes: list[ReplyOutcome], good_at: list[int]
    ) -> list[float]:
        """The good replies' aggregation weights; records each in its outcome (in place).

        With ``max_weight_ratio`` set, a claim above that many times the round's median claim is
        capped (see :func:`cap_weights`); the capped node is logged and its outcome's ``reason``
        says what it claimed and what was used, so the store keeps it with the participation.
        """
        claimed = [float(outcomes[i].num_examples or 0) for i in good_at]
        if self.uniform_weights:
            for i in good_at:
                outcomes[i] = replace(outcomes[i], weight_used=1.0)
            return [1.0] * len(good_at)
        used = cap_weights(claimed, self.max_weight_ratio).tolist() if claimed else []
        for i, c, u in zip(good_at, claimed, used, strict=True):
            note = None
            if u < c:
                note = (
                    f"num-examples {c:g} capped to {u:g} "
                    f"(max-weight-ratio {self.max_weight_ratio:g} x the round median)"
                )
                log.warning(
                    "round %d: node %d claimed %g examples; weight capped to %g",
                    server_round,
                    outcomes[i].node_id,
                    c,
                    u,
                )
            outcomes[i] = replace(outcomes[i], reason=note, weight_used=u)
        return used

    def _screen(
        self, server_round: int, msg: Message, reference: AdapterState
    ) -> ReplyOutcome | tuple[AdapterState, dict[str, float], float]:
        """A reply's fate before aggregation: the failed or rejected outcome (logged with its
        reasons), or the valid update with its metrics and update norm."""
        node = self.node_of(msg)
        if msg.has_error():
            reason = f"error reply: {msg.error.reason}"
            log.warning("round %d: node %d failed: %s", server_round, node, reason)
            return ReplyOutcome(node, FAILED, reason)
        problems, state, metrics = self._check_reply(msg, self._asked.get(node), reference)
        if not problems:
            check = validate_update(state, reference, self.max_update_norm)
            problems = list(check.reasons)
            if check.ok and self.clipping_norm is not None:
                moved = factor_delta_norm(state, reference)
                if not moved <= self.clipping_norm * (1 + CLIP_SLACK) + CLIP_SLACK_ABS:
                    problems.append(
                        f"its change of the factors has norm {moved:.6g}, over the DP clipping "
                        f"norm {self.clipping_norm:g}: its client did not clip it"
                    )
                elif moved > self.clipping_norm:
                    # Within the slack (float32 rounding of a clipped change), but the noise is
                    # sized for C: clipped to C here, so no node moves the mean by more.
                    state, _ = clip_factor_update(state, reference, self.clipping_norm)
            if not problems:
                return state, metrics, check.update_norm
        reason = "; ".join(problems)
        log.warning("round %d: rejected update from node %d: %s", server_round, node, reason)
        return ReplyOutcome(node, REJECTED, reason, metrics=metrics)

    def _check_reply(
        self,
        msg: Message,
        steps_asked: int | None = None,
        reference: AdapterState | None = None,
    ) -> tuple[list[str], AdapterState, dict[str, float]]:
        """Structural checks Flower's own consistency check would raise on, and the metrics'
        (finite numbers; at most the steps the node was asked for): here they reject. Keys and
        shapes are checked on the arrays' descriptions against ``reference`` before any is
        decoded: a reply of a huge array is refused without the server copying it twice more."""
        content = msg.content
        problems: list[str] = []
        state: AdapterState = {}
        metrics: dict[str, float] = {}
        if len(content.array_records) != 1 or ARRAYS_KEY not in content.array_records:
            problems.append(
                f"expected one ArrayRecord {ARRAYS_KEY!r}, got {list(content.array_records)}"
            )
        else:
            record = content.array_records[ARRAYS_KEY]
            described = _described_problems(record, reference) if reference is not None else []
            problems += described
            try:
                if not described:
                    state = arrayrecord_to_state(record)
            except Exception as e:  # whatever a node's bytes make the decoder raise: its fault
                problems.append(f"unreadable arrays: {type(e).__name__}: {e}")
        if len(content.metric_records) != 1:
            problems.append(f"expected one MetricRecord, got {list(content.metric_records)}")
        else:
            raw = next(iter(content.metric_records.values()))
            for key, value in raw.items():
                if isinstance(value, bool) or not isinstance(value, int | float):
                    problems.append(f"metric {key!r} must be a number, got {value!r}")
                elif not math.isfinite(value):
                    problems.append(f"metric {key!r} must be finite, got {value!r}")
                else:
                    metrics[key] = float(value)
            n = metrics.get(NUM_EXAMPLES)
            if n is None or not 1 <= n <= MAX_NUM_EXAMPLES:
                got = "none" if n is None else f"{n:g}"
                problems.append(f"{NUM_EXAMPLES} must be a number in [1, 2^53], got {got}")
            steps = metrics.get(LOCAL_STEPS)
            if steps is not None and not (
                steps >= 0 and (steps_asked is None or steps <= steps_asked)
            ):
                asked = steps_asked is not None
                limit = f"[0, {steps_asked}] (the steps asked for)" if asked else ">= 0"
                problems.append(f"{LOCAL_STEPS} must be in {limit}, got {steps:g}")
        return problems, state, metrics


def _steps_asked(msg: Message) -> int | None:
    """The most steps a train message asks for (planned + backfill), None if it does not say."""
    config = msg.content.config_records.get(CONFIG_KEY)
    if config is None or "local-steps" not in config:
        return None
    return config_int(config, "local-steps", 0) + config_int(config, "backfill-steps", 0)


def aggregate_metrics(
    metrics: Sequence[Mapping[str, float]], weights: Sequence[float]
) -> MetricRecord:
    """Each metric's mean over the replies that report it, weighted as their updates were
    (``num-examples``, the weighting key, is left out, as Flower's FedAvg does). A metric only some
    nodes send (a replica's ``load-*``) is the mean of those nodes', not diluted by the others."""
    out = MetricRecord()
    for key in sorted({k for m in metrics for k in m} - {NUM_EXAMPLES}):
        pairs = [(m[key], w) for m, w in zip(metrics, weights, strict=True) if key in m]
        total = sum(w for _, w in pairs)
        if total > 0:
            out[key] = sum(v * w for v, w in pairs) / total
    return out


def _described_problems(record: ArrayRecord, reference: AdapterState) -> list[str]:
    """Missing and unexpected keys and wrong shapes, read from the arrays' descriptions (as
    :func:`collm_fl.validation.validate_update` words them), nothing decoded."""
    problems = key_problems(record, reference)
    for key in sorted(set(record) & set(reference)):
        shape = tuple(getattr(record[key], "shape", ()))
        if shape != reference[key].shape:
            problems.append(f"{key}: shape {shape} != expected {reference[key].shape}")
    return problems


def _unchanged(state: AdapterState, reference: AdapterState) -> bool:
    """Whether an update is the reference itself, array for array."""
    return all(np.array_equal(state[k], reference[k]) for k in reference)
