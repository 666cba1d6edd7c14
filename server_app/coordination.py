"""Round-to-round bookkeeping for the allocation policy: what each node reported, the loss curve.

The policy itself (strategies/allocation.py) is pure; this tracker turns Flower replies into its
inputs and records every decision, with those inputs, in the store.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import TypeGuard

from collm_fl.config import RunConfig
from collm_fl.store import VersionStore
from strategies.allocation import (
    STEP_HISTORY,
    AllocationInputs,
    NodeBudget,
    NodeLoad,
    NodeState,
    RateForecast,
    allocate,
    describe,
    forecast_rate,
    load_from_metrics,
    measured_step_seconds,
    merge_loads,
)

log = logging.getLogger(__name__)


# Below this a step time is no measurement (a LoRA micro-step of any LLM takes milliseconds at
# least): a node claiming it would make every later budget overflow.
MIN_STEP_SECONDS = 1e-4
STATE_KEY = "state"  # in each coordination-state event: forecasts, speeds, load reports
COORDINATION_STATE = "coordination-state"  # event after each round: what a resumed run takes back


@dataclass
class _Node:
    load: NodeLoad | None = None
    load_window_s: float = 0.0  # the seconds ``load`` covers
    load_used: bool = True  # ``load`` is in the forecast already: the next report replaces it
    # Decisions in a row this process made on ``load`` with no report since (1: a fresh one's)
    decisions_on_load: int = 0
    forecast: RateForecast | None = None
    step_history: deque[float] = field(default_factory=lambda: deque(maxlen=STEP_HISTORY))

    @property
    def step_seconds(self) -> float | None:
        return min(self.step_history) if self.step_history else None


@dataclass
class CoordinationState:
    """Everything the allocation policy needs, updated from each round's replies."""

    nodes: dict[int, _Node] = field(default_factory=dict)
    loss_history: list[tuple[float, float]] = field(default_factory=list)
    cumulative_steps: float = 0.0

    def observe(self, node_id: int, metrics: Mapping[str, float], accepted: bool = True) -> None:
        """Take a node's train or publish reply metrics (``load-*``, ``train-seconds``...). Of a
        reply that was not ``accepted`` (a rejected update, a publish ack) only the load report
        counts: its claims of steps and seconds are not believed (a made-up speed would stick as
        the node's fastest)."""
        if not accepted:
            metrics = {k: v for k, v in metrics.items() if k.startswith("load-")}
        node = self.nodes.setdefault(node_id, _Node())
        load = load_from_metrics(metrics)
        if load is not None:
            # A round brings two reports (the train reply's window, then the publish ack's):
            # the next decision sees their union, not just the last, short one.
            window = metrics.get("load-window-s", 0.0)
            if node.load is not None and not node.load_used:
                node.load = merge_loads(node.load, node.load_window_s, load, window)
                node.load_window_s += window
            else:
                node.load, node.load_window_s = load, window
            node.load_used, node.decisions_on_load = False, 0
        step_s = measured_step_seconds(metrics)
        if step_s is not None:  # (the fastest of the last rounds: the node's own speed)
            if step_s < MIN_STEP_SECONDS:
                log.warning(
                    "node %d: %.3g s per step is no measurement; its speed is not updated",
                    node_id,
                    step_s,
                )
            else:
                node.step_history.append(step_s)

    def snapshot(self) -> dict[str, dict[str, object]]:
        """What a resumed run cannot rebuild from its stored rounds: each node's rate forecast
        (level and trend), its last step times and its last load report (without it a replica
        would be budgeted as a device, with the whole replica, until it reports again), by node
        id."""
        return {
            str(n): {
                "level": node.forecast.level if node.forecast else None,
                "trend": node.forecast.trend if node.forecast else None,
                "step-seconds": list(node.step_history),
                "load": asdict(node.load) if node.load is not None else None,
                "load-used": node.load_used,  # (not yet in the forecast: taken in on restore)
            }
            for n, node in sorted(self.nodes.items())
        }

    def restore(self, snapshot: object, nodes: Iterable[int] | None = None) -> int:
        """Take back a ``snapshot()`` (from the store, so checked: an entry that is not a node id
        with finite numbers is skipped), of the ``nodes`` connected now if given (a node that
        registered again has a new id: an old id's entry would never be used). Returns how many
        nodes were restored."""
        if not isinstance(snapshot, Mapping):
            return 0
        known = None if nodes is None else set(nodes)
        restored = 0
        for key, entry in snapshot.items():
            if not (isinstance(key, str) and key.isdigit() and isinstance(entry, Mapping)):
                continue
            if known is not None and int(key) not in known:
                continue
            node = self.nodes.setdefault(int(key), _Node())
            level, trend = entry.get("level"), entry.get("trend")
            if finite_number(level) and finite_number(trend) and level >= 0:
                node.forecast = RateForecast(float(level), float(trend))
            steps = entry.get("step-seconds")
            if isinstance(steps, list):
                node.step_history.extend(
                    float(x) for x in steps if finite_number(x) and x >= MIN_STEP_SECONDS
                )
            load = _stored_load(entry.get("load"))
            if load is not None:
                if entry.get("load-used") is False:  # the last round's report: into the forecast
                    node.forecast = forecast_rate(node.forecast, load.request_rate)
                if node.load is None:  # (not over a fresher one: the resume's publish ack's)
                    node.load, node.load_used = load, True
            restored += 1
        return restored

    def observe_round(self, steps_trained: float, eval_loss: float | None) -> None:
        """A round's training (how far the aggregate moved, in one node's steps: the mean steps
        of the updates in it, under DP over every node asked) and its central loss, if
        promoted."""
        self.cumulative_steps += steps_trained
        if eval_loss is not None:
            self.loss_history.append((self.cumulative_steps, eval_loss))

    def budgets(
        self, cfg: RunConfig, node_ids: Iterable[int], store: VersionStore, run_id: int, rnd: int
    ) -> dict[int, NodeBudget] | None:
        """Per-node budgets for round ``rnd`` of the nodes asked, ``node_ids`` (None: static
        allocation, the same config for all)."""
        if cfg.allocation == "static":
            return None
        node_ids = sorted(node_ids)
        stale = []  # replicas with no report since the last decision: their last one again
        for n in node_ids:  # the forecast takes one observation per round: the merged reports
            node = self.nodes.get(n)
            if node is None or node.load is None:
                continue
            if not node.load_used:
                node.forecast = forecast_rate(node.forecast, node.load.request_rate)
            node.decisions_on_load += 1
            if node.decisions_on_load > 1:
                stale.append(n)
                # (said once a silence; the event lists it every round)
                log.log(
                    logging.WARNING if node.decisions_on_load == 2 else logging.DEBUG,
                    "round %d allocation: node %d sent no load report since the last decision; "
                    "its last one is used again",
                    rnd,
                    n,
                )
        states = tuple(
            NodeState(
                node_id=n,
                load=self.nodes.get(n, _Node()).load,
                forecast_rate=_next_rate(self.nodes.get(n, _Node()).forecast),
                step_seconds=self.nodes.get(n, _Node()).step_seconds,
                forecast_trend=_trend(self.nodes.get(n, _Node()).forecast),
            )
            for n in node_ids
        )
        inputs = AllocationInputs(
            nodes=states,
            ttft_slo_s=cfg.ttft_slo_s,
            tpot_slo_s=cfg.tpot_slo_s,
            deadline_s=cfg.round_deadline_s,
            max_steps=cfg.local_steps,
            loss_history=tuple(self.loss_history),
            min_share=cfg.min_training_share,
            backfill=cfg.backfill,
            turns=cfg.train_in_turns,
            rotation=rnd - 1,
        )
        budgets = allocate(inputs)
        for n in node_ids:
            if n in self.nodes:
                self.nodes[n].load_used = True
        for b in budgets:
            if b.sits_out and not b.reports_load and b.node_id in self.nodes:
                # A device too slow for any step by its measurements is not asked, so it is never
                # measured again: each round it sits out forgets its oldest step time, and once
                # none is left (as many rounds as it had) its speed is unknown and it is asked.
                history = self.nodes[b.node_id].step_history
                if history:
                    history.popleft()
        store.record_event(
            run_id,
            "allocation",
            {"round": rnd, **describe(inputs, budgets), "stale-loads": stale},
        )
        for b in budgets:
            log.info(
                "round %d allocation: node %d -> %d steps + %d backfill, share %.2f, at %.0fs (%s)",
                rnd,
                b.node_id,
                b.steps,
                b.backfill_steps,
                b.share,
                b.start_after_s,
                b.reason,
            )
        return {b.node_id: b for b in budgets}


def _stored_load(entry: object) -> NodeLoad | None:
    """A snapshot's load report, if it is one (every field a finite number >= 0; utilization
    may be absent)."""
    if not isinstance(entry, Mapping):
        return None
    values: dict[str, float | None] = {}
    for f in fields(NodeLoad):
        x = entry.get(f.name, f.default)  # (a field added since: its default)
        if x is None and f.name == "utilization":
            values[f.name] = None
        elif finite_number(x) and x >= 0:
            values[f.name] = float(x)
        else:
            return None
    return NodeLoad(**values)  # type: ignore[arg-type]


def finite_number(x: object) -> TypeGuard[float]:
    """A JSON number that is one (not a bool, not NaN or infinite)."""
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _next_rate(forecast: RateForecast | None) -> float:
    return forecast.next if forecast is not None else 0.0


def _trend(forecast: RateForecast | None) -> float | None:
    return forecast.trend if forecast is not None else None
