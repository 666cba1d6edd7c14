"""A day of federated rounds under diurnal load: what the allocation policy gives each replica.

The policy (``collm_fl.policies.allocation``, the same code the ServerApp runs each round) is a
pure function of measured inputs, so it can be driven by made-up measurements. Here one round is
one hour; three replicas see the same diurnal shape of requests at different volumes. Each round
every replica reports, as a live one does for the round before, its request rate, the share of
time its engine computed (utilization) and its p95 latencies; the server keeps a trend forecast
of each rate and the curve of the central held-out loss, and ``allocate`` decides each replica's
training share, planned steps and backfill steps for the next round (as
``server_app/coordination.py`` does live). The defaults stand for ``local-steps=20``,
``round-deadline-s=40`` and 2-second training steps, so the deadline binds at small shares.

Only the measurements are simulated (the policy is not):

* request rate: ``peak × (0.1 + 0.9 × (1 − cos(2π(hour − 4)/24)) / 2)``, lowest at 04:00 and
  highest at 16:00;
* utilization: ``rate × --request-seconds`` (engine seconds per request), at most 1;
* p95 TTFT / TPOT: an unloaded 0.3 s / 0.05 s divided by ``1 − utilization`` (queueing);
* trained steps: all planned steps, plus the share of the backfill its idle time
  (``1 − utilization``) allows;
* central held-out loss: ``2 + 1.5 × exp(−steps so far / --loss-scale)``.

    python examples/allocation_simulator.py             # a table, one line per round
    python examples/allocation_simulator.py --json      # one JSON object per round
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass

from collm_fl.policies.allocation import (
    AllocationInputs,
    NodeBudget,
    NodeLoad,
    NodeState,
    RateForecast,
    allocate,
    forecast_rate,
    quality_gain_factor,
)

REPLICAS = {"downtown": 2.2, "suburb": 1.2, "campus": 0.4}  # name -> peak requests/s
UNLOADED_TTFT_S, UNLOADED_TPOT_S = 0.3, 0.05


@dataclass(frozen=True)
class Settings:
    rounds: int  # one per hour
    local_steps: int  # run-config local-steps: the most a node trains per round
    deadline_s: float  # run-config round-deadline-s
    step_seconds: float  # a training step's measured duration, known after the first round
    request_seconds: float  # engine seconds one request costs
    min_share: float  # run-config min-training-share
    ttft_slo_s: float
    tpot_slo_s: float
    loss_scale: float  # steps over which the simulated loss falls by e


def diurnal(hour: float) -> float:
    """The day's shape of load, 0.1 (04:00) to 1.0 (16:00)."""
    return 0.1 + 0.9 * (1 - math.cos(2 * math.pi * (hour - 4) / 24)) / 2


def measure(rate: float, s: Settings) -> NodeLoad:
    """What a replica serving ``rate`` requests/s would report (see the module docstring)."""
    utilization = min(1.0, rate * s.request_seconds)
    slowdown = 1 / max(0.05, 1 - utilization)
    ttft, tpot = UNLOADED_TTFT_S * slowdown, UNLOADED_TPOT_S * slowdown
    pressure = max(ttft / s.ttft_slo_s, tpot / s.tpot_slo_s)
    return NodeLoad(
        request_rate=rate,
        queue_depth=utilization / max(0.05, 1 - utilization),
        ttft_p95=ttft,
        tpot_p95=tpot,
        slo_attainment=min(1.0, 1 / pressure),
        utilization=utilization,
    )


@dataclass(frozen=True)
class ReplicaRound:
    """One replica in one round: the load it reported and the budget the policy gave it."""

    name: str
    request_rate: float  # requests/s it reported
    utilization: float  # share of its time serving computed
    forecast_rate: float  # the server's forecast of its next rate (Holt's linear trend)
    share: float  # training share of its compute while it serves
    steps: int  # planned steps
    backfill_steps: int  # more steps, only on idle (or late-only) cycles
    reason: str  # the policy's own words


@dataclass(frozen=True)
class RoundRecord:
    round: int
    hour: int  # the hour whose load the replicas reported
    gain: float  # quality gain factor: how much the next steps still buy, in [0.2, 1]
    target: int  # the round's steps per node: local-steps scaled by the gain
    steps_trained: int  # all replicas together (simulated)
    loss: float  # central held-out loss after the round (simulated)
    replicas: tuple[ReplicaRound, ...]


def simulate(s: Settings) -> list[RoundRecord]:
    """One record per round: the load each replica reported and the budget it was given."""
    forecasts: dict[str, RateForecast | None] = dict.fromkeys(REPLICAS)
    loss_history: list[tuple[float, float]] = []
    steps_so_far, node_steps = 0, 0.0
    rounds: list[RoundRecord] = []
    for rnd in range(1, s.rounds + 1):
        hour = (rnd - 1) % 24
        loads = {name: measure(peak * diurnal(hour), s) for name, peak in REPLICAS.items()}
        now = {name: forecast_rate(forecasts[name], ld.request_rate) for name, ld in loads.items()}
        forecasts.update(now)
        states = tuple(
            NodeState(
                node_id=i,
                load=loads[name],
                forecast_rate=now[name].next,
                step_seconds=None if rnd == 1 else s.step_seconds,  # measured from round 1 on
                forecast_trend=now[name].trend,
            )
            for i, name in enumerate(REPLICAS)
        )
        inputs = AllocationInputs(
            nodes=states,
            ttft_slo_s=s.ttft_slo_s,
            tpot_slo_s=s.tpot_slo_s,
            deadline_s=s.deadline_s,
            max_steps=s.local_steps,
            loss_history=tuple(loss_history),
            min_share=s.min_share,
        )
        budgets = allocate(inputs)  # the policy: everything else here is made-up measurement
        gain = quality_gain_factor(inputs.loss_history, inputs.min_gain_factor, inputs.max_steps)
        pairs = zip(REPLICAS, budgets, strict=True)
        each = [trained_steps(b, loads[name]) for name, b in pairs]
        trained = sum(each)
        steps_so_far += trained
        loss = 2.0 + 1.5 * math.exp(-steps_so_far / s.loss_scale)
        # The policy's history counts one node's share of each round (the server's: the mean
        # over the nodes that trained), so a round of local-steps is one round's span.
        node_steps += trained / max(1, sum(n > 0 for n in each))
        loss_history.append((node_steps, loss))
        replicas = tuple(
            ReplicaRound(
                name=name,
                request_rate=round(loads[name].request_rate, 3),
                utilization=round(loads[name].utilization or 0.0, 3),
                forecast_rate=round(state.forecast_rate, 3),
                share=round(b.share, 3),
                steps=b.steps,
                backfill_steps=b.backfill_steps,
                reason=b.reason,
            )
            for name, state, b in zip(REPLICAS, states, budgets, strict=True)
        )
        target = max(1, math.ceil(s.local_steps * gain))  # as allocate() computes it
        rounds.append(
            RoundRecord(rnd, hour, round(gain, 3), target, trained, round(loss, 4), replicas)
        )
    return rounds


def trained_steps(budget: NodeBudget, load: NodeLoad) -> int:
    """Planned steps, and as much backfill as the replica's idle time allows."""
    idle = 1.0 - (load.utilization or 0.0)
    return budget.steps + math.floor(budget.backfill_steps * idle)


def print_table(rounds: list[RoundRecord]) -> None:
    names = "".join(f" | {name:<26s}" for name in REPLICAS)
    print(f"{'round':>5s} {'hour':5s}{names} | target  loss")
    columns = f"{'req/s':>5s} {'util':>4s} {'share':>5s} {'steps':>5s}+{'bf':<3s}"
    print(f"{'':11s}{f' | {columns}' * len(REPLICAS)} |")
    for r in rounds:
        cells = "".join(
            f" | {n.request_rate:5.2f} {n.utilization:4.2f} {n.share:5.2f} "
            f"{n.steps:5d}+{n.backfill_steps:<3d}"
            for n in r.replicas
        )
        print(f"{r.round:5d} {r.hour:02d}:00{cells} | {r.target:6d} {r.loss:5.3f}")


def parse_args(argv: list[str] | None = None) -> tuple[Settings, bool]:
    """The simulation's settings and whether to print JSON; exits 2 on a bad value."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=24, help="rounds, one per hour")
    p.add_argument("--local-steps", type=int, default=20, help="local-steps")
    p.add_argument("--deadline", type=float, default=40.0, help="round-deadline-s")
    p.add_argument("--step-seconds", type=float, default=2.0, help="seconds per training step")
    p.add_argument("--request-seconds", type=float, default=0.4, help="engine s per request")
    p.add_argument("--min-share", type=float, default=0.1, help="min-training-share")
    p.add_argument("--ttft-slo", type=float, default=2.0, help="ttft-slo-s")
    p.add_argument("--tpot-slo", type=float, default=0.2, help="tpot-slo-s")
    p.add_argument("--loss-scale", type=float, default=1500.0, help="steps per e-fold of loss")
    p.add_argument("--json", action="store_true", help="one JSON object per round")
    args = p.parse_args(argv)
    positive = ("rounds", "local_steps", "deadline", "step_seconds", "request_seconds")
    for name in (*positive, "ttft_slo", "tpot_slo", "loss_scale"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            p.error(f"--{name.replace('_', '-')} must be a number > 0, got {value}")
    if not 0 <= args.min_share <= 1:
        p.error(f"--min-share must be in [0, 1], got {args.min_share}")
    settings = Settings(
        rounds=args.rounds,
        local_steps=args.local_steps,
        deadline_s=args.deadline,
        step_seconds=args.step_seconds,
        request_seconds=args.request_seconds,
        min_share=args.min_share,
        ttft_slo_s=args.ttft_slo,
        tpot_slo_s=args.tpot_slo,
        loss_scale=args.loss_scale,
    )
    return settings, args.json


def main(argv: list[str] | None = None) -> int:
    settings, as_json = parse_args(argv)
    rounds = simulate(settings)
    if as_json:
        for r in rounds:
            print(json.dumps(asdict(r)))
    else:
        print_table(rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
