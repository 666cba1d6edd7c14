"""Quality-aware allocation: per round, how much of each replica's capacity trains vs serves.

The long-timescale half of CoLLM-FL's coordination, as pure functions of measured inputs (the same
code runs live in the ServerApp, in tests and in the simulator):

1. **Quality gain.** From the history of central held-out loss vs training steps, estimate how
   much the next steps still buy: the latest per-step improvement relative to the best so far.
   Gains flattening → a smaller round budget (down to ``min_gain_factor``).
2. **Load headroom.** Training takes the compute serving leaves: a replica reports the share of
   its time its engine computed (``serving_utilization``); scaled by the forecast growth of its
   request rate (Holt's linear trend: a smoothed level plus a smoothed trend, so a rate that has
   been rising is expected to go on rising; the growth is the forecast over the present rate,
   the smoothed level or the latest report, whichever is higher, so a forecast lagging a sudden
   fall, or a trend turning, costs no sudden training) that is the
   serving it must keep, and the rest is headroom. A replica whose
   p95 latencies already exceed the SLOs keeps up to ``SLO_RESERVE`` more for serving. (Without a
   utilization report, latency relative to the SLOs stands in for it.) The training share is
   that headroom.
   A busy replica trains at no less than ``min_share`` (its steps give way to serving at every
   layer and borrow serving's time only when behind the plan, at most the share);
   with ``min_share`` 0 a replica without headroom sits the round out; an idle one trains with
   the whole replica.
3. **Deadline.** A replica trains as many of the target's steps as fit the round deadline at its
   share (``steps × step_seconds / share <= deadline``, with ``step_seconds`` its own measured
   speed); before its speed is known, the target scaled by the share.
4. **Backfill.** The forecast is made from one short, bursty window and errs on the side of
   serving, so a replica that will not sit out also gets the rest of the target as *backfill*
   steps: it trains them only while it has no request queued or running (or only requests that
   have already missed their TTFT SLO, which earn no goodput), and only before the deadline (the
   replica enforces both). A forecast that was too cautious then costs no training, and one that
   was right costs no goodput: backfill runs on cycles that earn none.
5. **Turns.** While load is light, the replicas train one after another instead of all at once:
   when the replicas are forecast to need at most ``TURN_UTILIZATION`` of all but one replica's
   compute for serving, and every replica's target, at its measured step time, fits the deadline
   one after the other, each trains its whole target with the whole replica (share 1, no
   backfill) in its turn (``turn``; the order rotating with the round), and sits idle for
   training the rest of the round. A turn starts when the one before it has sent its update back
   (the server holds its message until then: ``turn_before``), or at its planned start
   (``start_after_s``: the lengths before it summed, × ``TURN_SLACK``, at most the deadline less
   its own length) if that comes first: a turn that ends early gives its time to the next, one
   that runs over its planned length overlaps the next. The gateway's routing sends requests
   around a replica while it trains (its predicted latency counts the training share), so
   serving always has replicas that no training step slows; what lands on the training replica
   anyway still has priority over its steps.
   (On one machine the co-executed steps of every replica at once cost light-load requests their
   tail TTFT and TPOT, docs/bench/goodput-dc17cae-slow/; the rolling baseline, one replica at a
   time, did not pay it.) Off by default (``AllocationInputs.turns``, run-config
   ``train-in-turns``): in one run beside the same system without them
   (docs/bench/goodput-ab-5ea9eef/) they met about as many SLOs and published versions later.

Devices (nodes without a replica) have no serving load: they get the gain-scaled budget.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

IDLE_RATE = 0.05  # requests/s below which a replica counts as idle
# Holt's weights: the newest load report's in the forecast's level, the newest change of level's
# in its trend. `collm bench forecast` (docs/bench/forecast.md) scores a grid of them on the
# arrival processes: none is best on all, and these stay near the least worst-case regret.
FORECAST_ALPHA = 0.5
FORECAST_BETA = 0.5
SLO_RESERVE = 0.1  # extra share kept for serving by a replica missing its SLOs (pressure >= 2)
MIN_GAIN_POINTS = 4  # loss points (three per-step rates) before the gain factor moves off 1.0
# A round's loss change below this share of the loss is measurement noise, no gain (the central
# held-out set is small); real rounds gain more (1.3-2 % per round in the committed goodput
# reports and quickstart runs).
GAIN_NOISE = 1e-3
# Turns (module doc, 5): the most serving, as a share of one replica's compute, that each replica
# not training may be forecast to carry. Batching makes load moved onto fewer replicas cost less
# than its sum; above this the others would queue (the light-rate reports of
# docs/bench/goodput-dc17cae-slow/ summed to 0.43-0.56 over two replicas).
TURN_UTILIZATION = 0.6
# A turn's planned length: its steps' measured time × this (a step's time varies); the next turn
# starts then at the latest, or sooner when this one's update comes back sooner.
TURN_SLACK = 1.25
# A node's speed (NodeState.step_seconds): the fastest of its last this many rounds' step times
# (a loaded round's slower steps are its serving, which the share counts; an old fast one ages out)
STEP_HISTORY = 5


@dataclass(frozen=True)
class NodeLoad:
    """What a node reported about its serving since the previous round (None for devices)."""

    request_rate: float
    queue_depth: float
    ttft_p95: float
    tpot_p95: float
    slo_attainment: float
    utilization: float | None = None  # share of the window serving computed; None: not reported


@dataclass(frozen=True)
class NodeState:
    node_id: int
    load: NodeLoad | None  # None: a device (no replica)
    forecast_rate: float  # forecast requests/s for the next round (see forecast_rate())
    step_seconds: float | None  # measured seconds per training micro-step (None: unknown yet)
    # The forecast's trend (RateForecast.trend; None: not known). Only a rising forecast eats
    # headroom: after a sudden fall the smoothed forecast still lies above the latest report.
    forecast_trend: float | None = None


@dataclass(frozen=True)
class AllocationInputs:
    nodes: tuple[NodeState, ...]
    ttft_slo_s: float
    tpot_slo_s: float
    deadline_s: float  # the round's training deadline
    max_steps: int  # the configured local steps (the most any node trains in a round)
    # (cumulative training steps, central eval loss): the steps of one node's share of each round
    # (live: the mean over the nodes that trained), so nodes joining or leaving move no gain
    loss_history: tuple[tuple[float, float], ...]
    min_gain_factor: float = 0.2  # the budget never shrinks below this share of max_steps
    min_share: float = 0.1  # the least a replica trains with, however busy
    backfill: bool = True  # replicas may train the rest of the target on idle cycles
    turns: bool = False  # under light load replicas train one after another (module doc, 5)
    rotation: int = 0  # which replica's turn comes first (the round number: every one in turn)

    def __post_init__(self) -> None:
        for name, value in (
            ("min_gain_factor", self.min_gain_factor),
            ("min_share", self.min_share),
        ):
            if not 0.0 <= value <= 1.0:  # (False for NaN)
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if not self.deadline_s > 0:  # (inf: no deadline)
            raise ValueError(f"deadline_s must be positive, got {self.deadline_s}")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {self.max_steps}")


@dataclass(frozen=True)
class NodeBudget:
    node_id: int
    steps: int  # planned steps (0 with no backfill = sit this round out)
    share: float  # training share of the replica's compute while it serves (1.0 for devices)
    deadline_s: float
    reason: str
    backfill_steps: int = 0  # more steps, trained only while the replica is idle (see module doc)
    reports_load: bool = True  # the node sent a load report (False: a device, or not heard from)
    start_after_s: float = 0.0  # its training starts at the latest this long into the round
    turn: int = 0  # its place in the round's turns (1, 2, ...; 0: no turns this round)

    @property
    def sits_out(self) -> bool:
        return self.steps == 0 and self.backfill_steps == 0


@dataclass(frozen=True)
class RateForecast:
    """A node's request rate, smoothed: ``level`` and its per-round ``trend`` (Holt)."""

    level: float
    trend: float = 0.0

    @property
    def next(self) -> float:
        """The forecast request rate of the next round (never below 0)."""
        return max(0.0, self.level + self.trend)


def forecast_rate(
    previous: RateForecast | None,
    current: float,
    alpha: float = FORECAST_ALPHA,
    beta: float = FORECAST_BETA,
) -> RateForecast:
    """Holt's linear-trend update with this round's reported rate: a steady rate forecasts
    itself, a rising one more than its latest report, a falling one less."""
    if not (math.isfinite(current) and current >= 0):  # a broken report changes nothing
        return previous if previous is not None else RateForecast(0.0)
    if previous is None:
        return RateForecast(current)
    level = alpha * current + (1 - alpha) * previous.next
    return RateForecast(level, beta * (level - previous.level) + (1 - beta) * previous.trend)


def quality_gain_factor(
    history: Sequence[tuple[float, float]], floor: float = 0.2, round_steps: float = 0.0
) -> float:
    """How much training still helps, in [floor, 1]: latest per-step gain / early per-step gain.

    The central held-out loss is measured on a small set and each round's change is noisy, so a
    trend needs at least ``MIN_GAIN_POINTS`` points (three per-step rates); until then: 1.0; and
    a loss change below ``GAIN_NOISE`` of the loss is no gain (a flat curve's blip is not a gain,
    nor does a tiny early one set the scale). A change is judged over at least ``round_steps``
    steps (one full round's, the configured local steps): rounds that trained fewer (a busy
    round's few steps, whose change no measurement could tell from noise) are judged together
    with the rounds after them, by steps alone. The latest gain is the mean of
    the last two rates (one noisy round does not cut the budget), the early gain the best before
    those two (with an early gain, a larger latest gain raises the factor, never lowers it;
    without one, rounds that happened to measure none do not pin the factor to the floor: a
    latest gain is then no sign of flattening but of learning that started late). A loss that
    got worse counts as no gain (the quality gate elsewhere keeps a bad version from being
    served).
    """
    if len(history) < MIN_GAIN_POINTS:
        return 1.0
    pts = sorted(history)
    rates: list[float] = []
    s0, l0 = pts[0]
    for s1, l1 in pts[1:]:
        span, gain = s1 - s0, l0 - l1
        if span <= 0 or span < round_steps:  # (judged with the next)
            continue
        rates.append(gain / span if gain > GAIN_NOISE * abs(l0) else 0.0)
        s0, l0 = s1, l1
    if len(rates) < MIN_GAIN_POINTS - 1:  # rounds that trained nothing add no rate
        return 1.0
    latest = sum(rates[-2:]) / 2
    if latest <= 0:
        return floor
    early = max(rates[:-2])
    if early <= 0:
        return 1.0
    return float(min(1.0, max(floor, latest / early)))


def headroom(
    load: NodeLoad,
    forecast: float,
    ttft_slo_s: float,
    tpot_slo_s: float,
    trend: float | None = None,
) -> float:
    """Share of a replica's compute serving can spare next round, in [0, 1]."""
    if forecast < IDLE_RATE and load.queue_depth == 0 and load.utilization is None:
        return 1.0  # (a measured utilization says it even of a few long requests)
    # p95 rather than p99: under bursty arrivals p99 measures the bursts, which the per-step SLO
    # guard handles; the round-level share follows the typical pressure.
    pressure = max(
        load.ttft_p95 / ttft_slo_s if ttft_slo_s > 0 else 0.0,
        load.tpot_p95 / tpot_slo_s if tpot_slo_s > 0 else 0.0,
    )
    growth = load_growth(load, forecast, trend)  # growth in the forecast rate eats headroom
    if load.utilization is None:  # no measure of serving's compute: latency pressure stands in
        return float(min(1.0, max(0.0, 1.0 - pressure * growth)))
    reserve = SLO_RESERVE * min(1.0, max(0.0, pressure - 1.0))
    return float(min(1.0, max(0.0, 1.0 - load.utilization * growth - reserve)))


def load_growth(load: NodeLoad, forecast: float, trend: float | None = None) -> float:
    """How much more serving the forecast rate needs than the present one (never below 1).

    With the forecast's ``trend`` known and rising: the forecast over the present rate, the
    smoothed level or the latest report, whichever is higher, so 1 at a trend of 0. Not over the
    report alone: Holt's forecast lags a sudden fall (reports 1.0 then 0.1 req/s forecast
    0.325), and a fall must not cost training, nor may a trend turning from falling to rising
    cut it at once; not over the level alone: after a spike (1, 1, 1, then 10 req/s: level 5.5,
    forecast 7.75) the report, which the utilization measured, already holds more than the
    forecast. Without the trend: the forecast over the latest report.

    More load, utilization and rate rising together (in proportion or faster), never gives more
    training; a rate that rises while utilization barely does (batching absorbing it) can give a
    little more: the serving needed is the utilization scaled by the forecast's growth over the
    present rate, and a higher report lowers that growth.
    """
    rate = load.request_rate if load.request_rate > IDLE_RATE else 0.0
    if trend is None:
        ratio = forecast / rate if rate > 0 else 1.0
    elif trend > 0:
        present = max(forecast - trend, rate)  # (the level: the forecast less its trend)
        ratio = forecast / present if present > IDLE_RATE else 1.0
    else:
        ratio = 1.0
    return ratio if math.isfinite(ratio) and ratio > 1.0 else 1.0


def allocate(inputs: AllocationInputs) -> list[NodeBudget]:
    """Per-node training budgets for the next round (see module docstring)."""
    gain = quality_gain_factor(inputs.loss_history, inputs.min_gain_factor, inputs.max_steps)
    target = max(1, math.ceil(inputs.max_steps * gain))
    budgets: list[NodeBudget] = []
    for node in inputs.nodes:
        if node.load is None:
            steps = _fit_deadline(target, node.step_seconds, 1.0, inputs.deadline_s)
            budgets.append(
                NodeBudget(
                    node.node_id,
                    steps,
                    1.0,
                    inputs.deadline_s,
                    # (a replica whose control API never answered has no load report either)
                    f"no load report: a device, or a replica not heard from; gain {gain:.2f}",
                    reports_load=False,
                )
            )
            continue
        room = headroom(
            node.load,
            node.forecast_rate,
            inputs.ttft_slo_s,
            inputs.tpot_slo_s,
            node.forecast_trend,
        )
        # A busy replica still trains a little: its steps give way to serving at every layer and
        # borrow serving's time only when behind the plan, so a small share costs serving little
        # and keeps the model improving. With min_share 0 it sits the round out.
        room = max(room, inputs.min_share)
        if room <= 0.0:  # only with min_share 0: no backfill either
            reason = f"no headroom (SLO attainment {node.load.slo_attainment:.2f}): sits out"
            budgets.append(NodeBudget(node.node_id, 0, 0.0, inputs.deadline_s, reason))
            continue
        # Busy replicas train less: as many of the target's steps as fit the deadline at the share
        # serving leaves; with the step time unknown yet, the target scaled by that share.
        if _step_time(node.step_seconds) is None:
            steps = max(1, round(target * room))
        else:
            steps = _fit_deadline(target, node.step_seconds, room, inputs.deadline_s)
        backfill = target - steps if inputs.backfill else 0
        reason = f"headroom {room:.2f}, gain {gain:.2f}"
        if steps == 0:
            reason += ": not one step fits the deadline at this share"
            reason += f"; {backfill} on idle or late-only cycles" if backfill else "; sits out"
        elif backfill:
            reason += f"; +{backfill} backfill on idle or late-only cycles"
        budgets.append(NodeBudget(node.node_id, steps, room, inputs.deadline_s, reason, backfill))
    return in_turns(inputs, budgets, target, gain) if inputs.turns else budgets


def in_turns(
    inputs: AllocationInputs, budgets: Sequence[NodeBudget], target: int, gain: float
) -> list[NodeBudget]:
    """``budgets`` with the replicas taking turns when load allows (module doc, 5); else as they
    are. ``target``: the round's steps per node (gain-scaled)."""
    nodes = {n.node_id: n for n in inputs.nodes}
    replicas = [b for b in budgets if nodes[b.node_id].load is not None]
    if len(replicas) < 2:
        return list(budgets)
    serving, lengths = 0.0, []
    for b in replicas:
        node = nodes[b.node_id]
        load = node.load
        assert load is not None
        measured = (load.utilization, node.step_seconds, node.forecast_rate)
        if b.sits_out or not all(x is not None and math.isfinite(x) for x in measured):
            return list(budgets)  # overloaded, or its serving or its steps not measured yet
        assert load.utilization is not None and node.step_seconds is not None
        if load.utilization < 0 or node.step_seconds <= 0:
            return list(budgets)
        serving += load.utilization * load_growth(load, node.forecast_rate, node.forecast_trend)
        lengths.append(target * node.step_seconds)
    if serving > TURN_UTILIZATION * (len(replicas) - 1) or sum(lengths) > inputs.deadline_s:
        return list(budgets)
    k = inputs.rotation % len(replicas)
    order = [*range(k, len(replicas)), *range(k)]
    # Planned starts (for when the turn before replies late): the lengths before each with
    # slack, but never so late that its own steps would not fit the deadline, nor after the
    # next turn's (from the last back). Each is still after the measured lengths before it.
    starts: list[float] = []
    later = math.inf
    for n, j in reversed(list(enumerate(order))):
        before = sum(lengths[i] for i in order[:n])
        later = min(before * TURN_SLACK, inputs.deadline_s - lengths[j], later)
        starts.append(later)
    starts.reverse()
    turned: dict[int, NodeBudget] = {}
    for turn, (j, start) in enumerate(zip(order, starts, strict=True), 1):
        b = replicas[j]
        reason = (
            f"turn {turn} of {len(replicas)}, at {start:.0f}s at the latest: trains with the "
            f"whole replica while the others serve (forecast serving {serving:.2f} of one "
            f"replica's compute); gain {gain:.2f}"
        )
        turned[b.node_id] = replace(
            b,
            steps=target,
            share=1.0,
            backfill_steps=0,
            start_after_s=start,
            reason=reason,
            turn=turn,
        )
    return [turned.get(b.node_id, b) for b in budgets]


def turn_before(budgets: Iterable[NodeBudget]) -> dict[int, int]:
    """node -> the node whose turn comes just before its own among ``budgets`` (those asked to
    train: a turn left out of the round passes its place on): a turn starts when that one's
    update comes back, or at its ``start_after_s`` if that comes first."""
    turns = sorted((b.turn, b.node_id) for b in budgets if b.turn > 0)
    return {node: prev for (_, prev), (_, node) in itertools.pairwise(turns)}


def _fit_deadline(steps: int, step_seconds: float | None, share: float, deadline_s: float) -> int:
    """Cap ``steps`` so they fit the deadline at this training share (unknown speed: uncapped)."""
    step_seconds = _step_time(step_seconds)
    if step_seconds is None:
        return steps
    fit = deadline_s * share / step_seconds  # (inf for a denormal step time: no int of it)
    if not math.isfinite(fit) or fit >= steps:
        return steps
    return max(0, math.floor(fit))


def measured_step_seconds(metrics: Mapping[str, float]) -> float | None:
    """Seconds per micro-step from a train reply's metrics (None: no step, or no time): a
    replica's steps' own compute where it reports it (``step-cost-seconds``), else (devices)
    the time in steps. A step timed while serving shared the core waited within its layers, a
    wait the training share counts already: taken as the speed, it was counted twice (fewer
    steps planned than fit)."""
    steps = metrics.get("local-steps", 0.0)
    seconds = metrics.get("step-cost-seconds", metrics.get("train-seconds", 0.0))
    return seconds / steps if steps > 0 and seconds > 0 else None


def _step_time(step_seconds: float | None) -> float | None:
    """A measured step time, or None for one not known (None, zero, negative, NaN or inf)."""
    if step_seconds is None or not (step_seconds > 0 and math.isfinite(step_seconds)):
        return None
    return step_seconds


def merge_loads(a: NodeLoad, a_s: float, b: NodeLoad, b_s: float) -> NodeLoad:
    """One report for two consecutive windows (``a`` over ``a_s`` seconds, then ``b``).

    Rates, utilization and attainment are averaged by what they are per (seconds, requests);
    the p95 latencies take the worse window's (a p95 of the union lies between the two, and the
    policy errs toward serving); the queue is the later one's. Unknown lengths weigh alike.
    """
    if not (a_s > 0 and b_s > 0):
        a_s = b_s = 1.0

    def mean(x: float, y: float, wx: float, wy: float) -> float:
        return (x * wx + y * wy) / (wx + wy) if wx + wy > 0 else (x + y) / 2

    a_n, b_n = a.request_rate * a_s, b.request_rate * b_s  # requests in each window
    utilization = (
        a.utilization
        if b.utilization is None
        else b.utilization
        if a.utilization is None
        else mean(a.utilization, b.utilization, a_s, b_s)
    )
    return NodeLoad(
        request_rate=mean(a.request_rate, b.request_rate, a_s, b_s),
        queue_depth=b.queue_depth,
        ttft_p95=max(a.ttft_p95, b.ttft_p95),
        tpot_p95=max(a.tpot_p95, b.tpot_p95),
        slo_attainment=mean(a.slo_attainment, b.slo_attainment, a_n, b_n),
        utilization=utilization,
    )


def load_from_metrics(metrics: Mapping[str, float]) -> NodeLoad | None:
    """A NodeLoad from a train reply's ``load-*`` metrics (None if the node sent none)."""
    try:
        return NodeLoad(
            request_rate=float(metrics["load-request-rate"]),
            queue_depth=float(metrics["load-queue-depth"]),
            ttft_p95=float(metrics["load-ttft-p95"]),
            tpot_p95=float(metrics["load-tpot-p95"]),
            slo_attainment=float(metrics["load-slo-attainment"]),
            utilization=(
                float(metrics["load-serving-utilization"])
                if "load-serving-utilization" in metrics
                else None
            ),
        )
    except KeyError:
        return None


def describe(inputs: AllocationInputs, budgets: Sequence[NodeBudget]) -> dict[str, object]:
    """A JSON-able record of one decision with its inputs (stored as an event); its inputs back:
    :func:`inputs_from_json`."""
    return {"inputs": asdict(inputs), "budgets": [asdict(b) for b in budgets]}


def inputs_from_json(data: Mapping[str, Any]) -> AllocationInputs:
    """The inputs of a decision :func:`describe` recorded, read back from JSON (an
    ``allocation`` event's ``payload["inputs"]``, a goodput report round's
    ``decision["inputs"]``): :func:`allocate` on them decides as it did then (a pure function),
    so a stored run's decisions can be replayed and varied. Fields a record lacks (written by an
    older collm) take today's defaults, so such a replay is today's policy on its measurements;
    fields it has that are no more are left out. ValueError names a required field missing."""

    def make(cls: Any, record: Mapping[str, Any], **given: Any) -> Any:
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in record.items() if k in known}, **given)
        except TypeError as e:  # (a required field missing)
            raise ValueError(f"not a stored {cls.__name__}: {e}") from e

    nodes = tuple(
        make(
            NodeState,
            {k: v for k, v in n.items() if k != "load"},
            load=None if n.get("load") is None else make(NodeLoad, n["load"]),
        )
        for n in data.get("nodes", ())
    )
    history = tuple((float(steps), float(loss)) for steps, loss in data.get("loss_history", ()))
    rest = {k: v for k, v in data.items() if k not in ("nodes", "loss_history")}
    return make(AllocationInputs, rest, nodes=nodes, loss_history=history)  # type: ignore[no-any-return]
