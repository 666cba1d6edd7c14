"""Quality-aware allocation as a strategy component (the policy itself is pure and lives in
:mod:`collm_fl.policies.allocation`, so the benchmarks and the simulator run the same code)."""

from collm_fl.policies.allocation import (
    SLO_RESERVE,
    STEP_HISTORY,
    TURN_SLACK,
    TURN_UTILIZATION,
    AllocationInputs,
    NodeBudget,
    NodeLoad,
    NodeState,
    RateForecast,
    allocate,
    describe,
    forecast_rate,
    headroom,
    in_turns,
    load_from_metrics,
    merge_loads,
    quality_gain_factor,
    turn_before,
)

__all__ = [
    "SLO_RESERVE",
    "STEP_HISTORY",
    "TURN_SLACK",
    "TURN_UTILIZATION",
    "AllocationInputs",
    "NodeBudget",
    "NodeLoad",
    "NodeState",
    "RateForecast",
    "allocate",
    "describe",
    "forecast_rate",
    "headroom",
    "in_turns",
    "load_from_metrics",
    "merge_loads",
    "quality_gain_factor",
    "turn_before",
]
