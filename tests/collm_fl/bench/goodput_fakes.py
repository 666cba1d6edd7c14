"""Hand-made goodput runs and results: the report's inputs without running anything."""

from __future__ import annotations

from collm_fl.bench.aggregation import machine_info
from collm_fl.bench.goodput import _system_info, summarize_runs
from collm_fl.bench.goodput_result import Calibration, GoodputResult, MachineRecord
from collm_fl.bench.goodput_rounds import FederationLog, RoundRecord, RunSettings
from collm_fl.bench.goodput_systems import SYSTEMS, SystemRun
from collm_fl.loadgen.client import RequestResult
from collm_fl.loadgen.goodput import SLOSpec


def fake_run(system: str, rate: float, losses: dict[int, float], met: int) -> SystemRun:
    ok = RequestResult(0, 0.0, 0.1, 0.01, 0.5, "ok", 200, 0, 8, 4, None)
    late = RequestResult(1, 1.0, 9.0, 0.01, 9.5, "ok", 200, 0, 8, 4, None)
    switches = sorted((5.0 * v, i, v) for v in losses for i in (0, 1))
    rounds = [RoundRecord(1, 1.0, {0: (3, 1.0)}, 3, 300, 2.0, 1, losses.get(1), 0.5, 5.0)]
    return SystemRun(
        system,
        rate,
        [ok] * met + [late] * (4 - met),
        FederationLog(switches, rounds, losses),
        serving=[0, 1],
        training=[0, 1],
        startup_s=1.0,
        wall_s=12.0,
    )


def fake_result(
    runs: list[SystemRun],
    rates: list[float],
    seed: int = 0,
    replicas: int = 2,
    capacity_rps: float = 4.0,
) -> GoodputResult:
    """A result of these runs (each offers 4 requests in 10 s: 0.4 req/s, a load of
    0.4 / (replicas × capacity_rps))."""
    slo = SLOSpec(ttft_s=1.0, tpot_s=0.1)
    settings = RunSettings("tiny", 2, 1, 10.0, 0.0, 7.0, 3, 1.0, 5e-4, slo, 8, 4, 30.0, 0)
    outcomes, by_rate = summarize_runs(runs, rates, slo, settings.schedule_s)
    return GoodputResult(
        command="test",
        model="tiny",
        replicas=replicas,
        rounds=1,
        round_s=10.0,
        quick=True,
        arrivals="bursty",
        slo_factor=5.0,
        seed=seed,
        eval_samples=4,
        eval_rows=4,
        rate_fractions=None,
        calibration=Calibration(0.1, 0.01, capacity_rps, 1.0, 10, 16, 1.0, 5.0),
        slo=slo,
        settings=settings,
        rates=list(rates),
        systems=[_system_info(name) for name in SYSTEMS],
        runs=outcomes,
        by_rate=by_rate,
        machine=MachineRecord(machine_info(100.0, 100.0), [0.0] * 3, [0.0] * 3),
        seconds=1.0,
    )
