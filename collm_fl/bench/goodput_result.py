"""What the goodput benchmark found: per system and rate, per rate, and the whole run; and how
a run comes back from its ``goodput.json`` (``collm bench goodput --from-json``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from collm_fl.bench.aggregation import MachineInfo
from collm_fl.bench.goodput_rounds import RoundRecord, RunSettings, core_sharing
from collm_fl.loadgen.goodput import LoadSummary, SLOSpec


def is_collm_system(name: str) -> bool:
    """CoLLM-FL and its variants (``collm-fl``, ``collm-fl-quality``); the rest are baselines."""
    return name == "collm-fl" or name.startswith("collm-fl-")


@dataclass(frozen=True)
class Calibration:
    """One replica alone: what the SLOs, rates and training budget are derived from."""

    ttft_unloaded_s: float  # median over sequential requests
    tpot_unloaded_s: float
    capacity_rps: float  # completed requests/s with a burst of requests sent at once
    train_step_s: float  # seconds per micro-step, idle replica (on its one core)
    unloaded_requests: int
    burst_requests: int
    startup_s: float  # from spawning the replica process until /health answers
    seconds: float


@dataclass(frozen=True)
class RunOutcome:
    """One system at one rate."""

    system: str
    rate: float
    summary: LoadSummary
    train_steps: int
    train_tokens: int
    train_tokens_per_s: float  # over the schedule
    rounds: list[RoundRecord]
    loss_by_version: dict[int, float]
    switches: list[tuple[float, int, int]]  # (seconds since load start, replica, version)
    quality: list[tuple[float, float]]  # (seconds since load start, served loss)
    final_loss: float
    time_to_quality_s: float | None
    serving: list[int]
    training: list[int]
    startup_s: float
    wall_s: float
    # the mean loss of the versions that answered its ok requests (None: a report from before)
    request_loss: float | None = None


FIRST_VERSION = "first-version"  # the target of reports before HALF_WAY: a CoLLM-FL first version
HALF_WAY = "half-way"  # half-way from version 0's loss to the best served at the end of the load


@dataclass(frozen=True)
class RateOutcome:
    rate: float
    target_loss: float | None  # time-to-quality target (see goodput.quality_target)
    target_source: str | None  # the system whose loss set it
    best_baseline: str | None
    # every CoLLM-FL system's goodput / the best baseline's (none: no baseline had goodput)
    ratios: dict[str, float] = field(default_factory=dict)
    target_rule: str = FIRST_VERSION  # how target_loss was set (reports before: first version)


@dataclass(frozen=True)
class MachineRecord:
    info: MachineInfo
    load_avg_start: list[float]
    load_avg_end: list[float]


@dataclass(frozen=True)
class SystemInfo:
    name: str
    title: str
    swap_mode: str
    training: str  # "dedicated replicas" | "exclusive" | "co-executed"
    summary: str


@dataclass(frozen=True)
class GoodputResult:
    command: str
    model: str
    replicas: int
    rounds: int
    round_s: float
    quick: bool
    arrivals: str
    slo_factor: float
    seed: int
    eval_samples: int  # central held-out samples (speeches) each version is evaluated on
    eval_rows: int  # the 128-token rows they make
    rate_fractions: list[float] | None  # rates as × R × saturated throughput (None: given)
    calibration: Calibration
    slo: SLOSpec
    settings: RunSettings
    rates: list[float]
    systems: list[SystemInfo]
    runs: list[RunOutcome]
    by_rate: list[RateOutcome]
    machine: MachineRecord
    seconds: float
    stopped: str | None = None  # why the run stopped before its last rate (None: it finished)
    # this run's own id, also in its request records' folder (None: a report from before)
    run_id: str | None = None
    # the order the systems ran in at each rate (empty: a report from before this was recorded)
    run_orders: list[list[str]] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        data["settings"]["schedule_s"] = self.settings.schedule_s
        return data

    def runs_at(self, rate: float) -> list[RunOutcome]:
        return [r for r in self.runs if r.rate == rate]

    def title(self, system: str) -> str:
        return next(s.title for s in self.systems if s.name == system)


def result_from_json(data: dict[str, Any]) -> GoodputResult:
    """A :class:`GoodputResult` back from its ``goodput.json`` (to re-render the report)."""

    def make(cls: Any, d: dict[str, Any], **nested: Any) -> Any:
        names = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in d.items() if k in names}, **nested})

    def round_record(d: dict[str, Any]) -> RoundRecord:
        budgets = {int(k): (int(v[0]), float(v[1])) for k, v in d["budgets"].items()}
        return make(RoundRecord, d, budgets=budgets)

    def run(d: dict[str, Any]) -> RunOutcome:
        return make(
            RunOutcome,
            d,
            summary=make(LoadSummary, d["summary"]),
            rounds=[round_record(r) for r in d["rounds"]],
            loss_by_version={int(k): float(v) for k, v in d["loss_by_version"].items()},
            switches=[(float(t), int(i), int(v)) for t, i, v in d["switches"]],
            quality=[(float(t), float(q)) for t, q in d["quality"]],
        )

    def ratios(d: dict[str, Any]) -> dict[str, float]:
        # Reports written before CoLLM-FL had variants stored only the default system's ratio.
        if d.get("ratios"):
            return {str(k): float(v) for k, v in d["ratios"].items()}
        old = d.get("goodput_ratio")
        return {} if old is None else {"collm-fl": float(old)}

    settings = dict(data["settings"])
    if "core_sharing" not in settings:  # (a report from before it was stored: as it was sized)
        cpus = data.get("machine", {}).get("info", {}).get("cpu_count") or 0
        settings["core_sharing"] = core_sharing(int(settings.get("replicas", 1)), int(cpus))
    return make(
        GoodputResult,
        data,
        calibration=make(Calibration, data["calibration"]),
        slo=make(SLOSpec, data["slo"]),
        settings=make(RunSettings, settings, slo=make(SLOSpec, settings["slo"])),
        systems=[make(SystemInfo, s) for s in data["systems"]],
        runs=[run(r) for r in data["runs"]],
        by_rate=[make(RateOutcome, r, ratios=ratios(r)) for r in data["by_rate"]],
        machine=make(MachineRecord, data["machine"]),
    )
