"""`collm bench goodput`: the quick run's structure and files (never its timings), and the pure
pieces that turn runs into the report (served quality, time-to-quality target, roles)."""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest
from goodput_fakes import fake_result, fake_run

import collm_fl.bench.goodput_report as report
from collm_fl.bench.goodput import (
    check_trace_span,
    quality_target,
    run_goodput_benchmark,
    run_order,
    served_quality_curve,
    summarize_runs,
)
from collm_fl.bench.goodput_report import (
    has_request_records,
    render_markdown,
    write_goodput_report,
    write_request_records,
)
from collm_fl.bench.goodput_result import (
    HALF_WAY,
    result_from_json,
)
from collm_fl.bench.goodput_systems import SYSTEMS, split_roles
from collm_fl.cli import main
from collm_fl.errors import ConfigError, WorkFailed
from collm_fl.loadgen.client import RequestResult, read_results_jsonl
from collm_fl.loadgen.goodput import SLOSpec
from collm_fl.loadgen.trace import TraceRow
from collm_fl.policies.allocation import STEP_HISTORY
from collm_fl.replica.control_client import ReplicaUnavailable

TITLES = (
    "separate (static split)",
    "co-located, uncoordinated",
    "merged",
    "rolling drain-and-train",
    "CoLLM-FL",
    "CoLLM-FL, first come first served",
    "CoLLM-FL, quality first",
)

EXAMPLE_TRACE = Path(__file__).parents[3] / "examples" / "custom_trace" / "trace.csv"


# Three systems of the default seven, end to end (each one costs CI half a minute): the static
# split, the rolling balancer, CoLLM-FL's gateway and allocation. The merged swap and a variant's
# settings (fresh) run in test_a_run_of_chosen_systems_compares_just_those; the co-located
# baseline is rolling's exclusive reload without the rotation, the FCFS ablation CoLLM-FL with
# another `--schedule`; reports with several CoLLM-FL variants are rendered from fake runs below.
QUICK_SYSTEMS = ["separate", "rolling", "collm-fl"]


@pytest.mark.slow
def test_a_quick_run_compares_the_systems_asked_for_and_writes_every_file(tmp_path: Path) -> None:
    lines: list[str] = []
    result = run_goodput_benchmark(
        model="smollm2-135m",  # quick runs tiny whatever is asked
        replicas=3,
        rates=None,
        rounds=4,
        duration_per_round_s=60.0,
        out_dir=tmp_path,
        quick=True,
        progress=lines.append,
        command="collm bench goodput --quick",
        systems=QUICK_SYSTEMS,
    )
    names = ("goodput.md", "goodput.json", "goodput_vs_rate.png", "quality_over_time.png")
    for name in names:
        assert (tmp_path / name).stat().st_size > 0, name
    for png in names[2:]:
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "goodput.json").read_text())
    assert data["runs"]  # valid JSON
    # The order the systems ran in is on record (seed 0, one rate: as asked).
    assert data["run_orders"] == [QUICK_SYSTEMS]
    assert (
        "in this order: rate 1: separate, rolling, collm-fl"
        in (tmp_path / "goodput.md").read_text()
    )
    # ... that holds the whole result: `--from-json` writes the same report again without a run.
    assert json.loads(json.dumps(result_from_json(data).to_json())) == data
    again = tmp_path / "again"
    assert (
        main(
            ["bench", "goodput", "--from-json", str(tmp_path / "goodput.json"), "--out", str(again)]
        )
        == 0
    )
    # (the same report, but for the requests' records, which are not beside it there)
    records = "Every request's record (`collm load`'s fields): `requests/<system>-rate<k>.jsonl`"
    assert records in (tmp_path / "goodput.md").read_text()
    assert records not in (again / "goodput.md").read_text()
    md_before = (tmp_path / "goodput.md").read_text()
    assert (
        main(
            [
                "bench",
                "goodput",
                "--from-json",
                str(tmp_path / "goodput.json"),
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert (tmp_path / "goodput.md").read_text() == md_before
    assert "### Against the goals" in (again / "goodput.md").read_text()
    assert (result["model"], result["replicas"], result["rounds"]) == ("tiny", 2, 1)
    rates = result["rates"]
    assert isinstance(rates, list) and len(rates) == 1
    runs = result["runs"]
    assert isinstance(runs, list) and [r["system"] for r in runs] == QUICK_SYSTEMS
    for run in runs:
        assert run["rate"] == rates[0]
        assert run["summary"]["requests"] > 0
        # every request's record, as `collm load` writes them
        logged = read_results_jsonl(tmp_path / "requests" / f"{run['system']}-rate1.jsonl")
        assert len(logged) == run["summary"]["requests"]
        assert sum(r.status == "ok" for r in logged) == run["summary"]["ok"]
        assert len(run["rounds"]) == 1
        assert 0 in run["loss_by_version"]  # version 0 is evaluated before the load
        assert run["quality"][0][0] == 0.0 and run["final_loss"] > 0
        assert run["serving"] == ([1] if run["system"] == "separate" else [0, 1])
    (by_rate,) = result["by_rate"]  # type: ignore[misc]
    assert by_rate["rate"] == rates[0]
    assert set(result["calibration"]) >= {"ttft_unloaded_s", "tpot_unloaded_s", "capacity_rps"}
    assert result["machine"]["info"]["cpu_count"] > 0  # type: ignore[index]
    md = (tmp_path / "goodput.md").read_text()
    assert "Command: `collm bench goodput --quick`" in md and "Machine:" in md
    assert "| system | goodput (req/s) | SLO attainment |" in md
    titles = [TITLES[SYSTEMS.index(s)] for s in QUICK_SYSTEMS]
    assert all(f"| {title} |" in md for title in titles)
    assert "Goodput / best baseline (" in md and "quality_over_time.png" in md
    assert "The load generator's lag" in md
    goals = md.split("### Against the goals")[1].split("###")[0]
    assert "| CoLLM-FL |" in goals
    assert any(line.startswith("calibration:") for line in lines)
    # Each CoLLM-FL decision records what serving gave its steps: lent, and rested for late work.
    decisions = [
        a
        for r in runs
        if r["system"].startswith("collm-fl")
        for rr in r["rounds"]
        for a in rr["allocation"]
    ]
    assert len(decisions) == 2  # 1 system × 2 replicas × 1 round
    assert all(a["lent_s"] >= 0.0 and a["late_rest_s"] >= 0.0 for a in decisions)
    assert "| lent (s) | late rest (s) |" in md
    # And each decision whole, with every input allocate() had: replayed, it decides the same.
    from collm_fl.policies.allocation import NodeBudget, allocate, inputs_from_json

    for r in runs:
        for rr in r["rounds"]:
            if not r["system"].startswith("collm-fl"):
                assert rr["decision"] is None
                continue
            stored = json.loads(json.dumps(rr["decision"]))  # (as goodput.json holds it)
            replayed = allocate(inputs_from_json(stored["inputs"]))
            assert replayed == [NodeBudget(**b) for b in stored["budgets"]]


def test_bad_arguments_are_refused_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="replicas"):
        run_goodput_benchmark("tiny", 1, None, 1, 5.0, tmp_path, False)
    with pytest.raises(ConfigError, match="rates"):
        run_goodput_benchmark("tiny", 2, [0.0], 1, 5.0, tmp_path, False)
    with pytest.raises(ConfigError, match="rounds"):
        run_goodput_benchmark("tiny", 2, None, 0, 5.0, tmp_path, False)
    with pytest.raises(ConfigError, match="arrivals"):
        run_goodput_benchmark("tiny", 2, None, 1, 5.0, tmp_path, False, arrivals="sideways")
    with pytest.raises(ConfigError, match="server_lr"):
        run_goodput_benchmark("tiny", 2, None, 1, 5.0, tmp_path, False, server_lr=0.0)
    with pytest.raises(ConfigError, match="shed-factor"):
        run_goodput_benchmark("tiny", 2, None, 1, 5.0, tmp_path, False, shed_factor=0.5)
    for systems, why in (
        (["merged", "fastest"], "unknown 'fastest'"),
        (["merged", "collm-fl", "merged"], "at most once"),
        (["merged", "colocated"], "one CoLLM-FL"),
        (["collm-fl", "collm-fl-fresh"], "one baseline"),
        ([], "one baseline"),
    ):
        with pytest.raises(ConfigError, match=why):
            run_goodput_benchmark("tiny", 2, None, 1, 5.0, tmp_path, False, systems=systems)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_a_run_of_chosen_systems_compares_just_those(tmp_path: Path) -> None:
    result = run_goodput_benchmark(
        quick=True, out_dir=tmp_path, systems=["merged", "collm-fl-fresh"], progress=print
    )
    runs = result["runs"]
    assert isinstance(runs, list)
    assert [r["system"] for r in runs] == ["merged", "collm-fl-fresh"]
    fresh = runs[1]
    assert fresh["train_steps"] > 0
    # The fresh system plans at the 0.9 floor or above (the replicas lend from the start).
    assert all(a["share"] >= 0.9 for rr in fresh["rounds"] for a in rr["allocation"])
    md = (tmp_path / "goodput.md").read_text()
    assert md.startswith("# Goodput: training and serving on the same replicas — one baseline ")
    assert "CoLLM-FL, fresh versions" in md and "--lend-early" in md
    assert "separate system's one trainer" not in md
    assert "separate" not in [r["system"] for r in runs] and "| separate" not in md
    assert result["by_rate"][0]["best_baseline"] == "merged"  # type: ignore[index]


def test_separate_trains_on_half_the_replicas_rounded_up_and_serves_on_the_rest() -> None:
    assert split_roles("separate", 2) == ([0], [1])
    assert split_roles("separate", 5) == ([0, 1, 2], [3, 4])
    assert split_roles("collm-fl", 3) == ([0, 1, 2], [0, 1, 2])
    with pytest.raises(ConfigError):
        split_roles("separate", 1)


def test_served_quality_is_the_mean_over_serving_replicas_of_their_versions_loss() -> None:
    switches = [(0.0, 0, 0), (0.0, 1, 0), (10.0, 0, 1), (12.0, 1, 1), (20.0, 0, 2)]
    losses = {0: 4.0, 1: 3.0, 2: 2.0}
    curve = served_quality_curve(switches, [0, 1], losses, end_s=30.0)
    assert curve == [(0.0, 4.0), (10.0, 3.5), (12.0, 3.0), (20.0, 2.5), (30.0, 2.5)]
    # A replica that serves nothing (a dedicated trainer) does not count.
    assert served_quality_curve(switches, [1], losses, 30.0)[-1] == (30.0, 3.0)


def test_summaries_give_the_ratio_to_the_best_baseline_and_time_to_quality() -> None:
    slo = SLOSpec(ttft_s=1.0, tpot_s=0.1)
    runs = [
        fake_run("separate", 2.0, {0: 4.0, 1: 3.8}, met=1),
        fake_run("merged", 2.0, {0: 4.0, 1: 3.5}, met=2),
        fake_run("collm-fl", 2.0, {0: 4.0, 1: 3.6}, met=4),
        fake_run("collm-fl-quality", 2.0, {0: 4.0, 1: 3.4}, met=3),  # not a baseline
    ]
    outcomes, (rate,) = summarize_runs(runs, [2.0], slo, schedule_s=10.0)
    assert (rate.best_baseline, rate.ratios["collm-fl"]) == ("merged", 2.0)
    assert rate.ratios == pytest.approx({"collm-fl": 2.0, "collm-fl-quality": 1.5})
    # Half-way from v0's 4.0 to the lowest loss served at the end (3.4): no system's own version.
    assert (rate.target_loss, rate.target_source, rate.target_rule) == (
        3.7,
        "collm-fl-quality",
        HALF_WAY,
    )
    by_system = {o.system: o for o in outcomes}
    assert by_system["collm-fl"].summary.goodput_rps == 0.4
    assert by_system["merged"].time_to_quality_s == 5.0  # its v1 (3.5) beats the target
    assert by_system["separate"].time_to_quality_s is None  # 3.8 never reaches 3.7
    assert by_system["merged"].train_tokens_per_s == 30.0
    # per request: ok requests answered by version None ("base": v0's loss)
    assert by_system["merged"].request_loss == 4.0


def test_a_version_published_after_the_load_ended_is_not_counted_as_served() -> None:
    slo = SLOSpec(ttft_s=1.0, tpot_s=0.1)
    late = fake_run("collm-fl", 1.0, {0: 4.0, 1: 3.0}, met=1)  # v1 switches in at 5 s
    merged = fake_run("merged", 1.0, {0: 4.0}, met=1)
    (outcome, _), _ = summarize_runs([late, merged], [1.0], slo, 4.0)
    assert outcome.final_loss == 4.0 and outcome.quality[-1] == (4.0, 4.0)


def test_time_to_quality_forgives_float_noise_within_the_tolerance() -> None:
    from collm_fl.loadgen.goodput import time_to_quality

    points = [(0.0, 4.0), (5.0, 3.5000001)]
    assert time_to_quality(points, 3.5) is None
    assert time_to_quality(points, 3.5, tolerance=1e-3) == 5.0


def test_without_improvement_there_is_no_target() -> None:
    slo = SLOSpec(ttft_s=1.0, tpot_s=0.1)
    runs = [fake_run("separate", 1.0, {0: 4.0}, met=1), fake_run("collm-fl", 1.0, {0: 4.0}, met=1)]
    outcomes, (rate,) = summarize_runs(runs, [1.0], slo, schedule_s=10.0)
    assert (rate.target_loss, rate.target_source) == (None, None)
    assert all(o.time_to_quality_s is None for o in outcomes)
    assert quality_target([]) == (None, None)


def test_a_gain_within_twice_the_tolerance_sets_no_target_version_0_would_meet() -> None:
    # A target half-way to a 0.0015 gain is met within the 0.001 tolerance by version 0 itself:
    # every system's time to quality read 0.0 s.
    slo = SLOSpec(ttft_s=1.0, tpot_s=0.1)
    runs = [
        fake_run("merged", 1.0, {0: 4.0, 1: 3.9985}, met=1),
        fake_run("collm-fl", 1.0, {0: 4.0}, met=1),
    ]
    outcomes, (rate,) = summarize_runs(runs, [1.0], slo, schedule_s=10.0)
    assert (rate.target_loss, rate.target_source) == (None, None)
    assert all(o.time_to_quality_s is None for o in outcomes)
    # Past twice the tolerance there is a target, and version 0 does not meet it.
    runs[0] = fake_run("merged", 1.0, {0: 4.0, 1: 3.9975}, met=1)
    outcomes, (rate,) = summarize_runs(runs, [1.0], slo, schedule_s=10.0)
    assert rate.target_loss == pytest.approx(3.99875)
    assert [o.time_to_quality_s for o in outcomes] == [5.0, None]


def test_of_two_baselines_with_the_same_goodput_the_best_serves_the_lower_loss() -> None:
    slo = SLOSpec(ttft_s=1.0, tpot_s=0.1)
    worse = fake_run("separate", 1.0, {0: 4.0, 1: 3.8}, met=2)
    better = fake_run("merged", 1.0, {0: 4.0, 1: 3.5}, met=2)
    collm = fake_run("collm-fl", 1.0, {0: 4.0, 1: 3.6}, met=4)
    for runs in ([worse, better, collm], [better, worse, collm]):  # (not --systems' order)
        _, (rate,) = summarize_runs(runs, [1.0], slo, schedule_s=10.0)
        assert (rate.best_baseline, rate.ratios) == ("merged", {"collm-fl": 2.0})


def test_training_tokens_per_second_count_the_time_rounds_ran_past_the_load() -> None:
    slo = SLOSpec(ttft_s=1.0, tpot_s=0.1)
    run = fake_run("merged", 1.0, {0: 4.0, 1: 3.5}, met=1)
    run.federation.rounds[0] = replace(run.federation.rounds[0], started_s=9.0, train_s=6.0)
    (outcome,), _ = summarize_runs([run], [1.0], slo, schedule_s=10.0)
    assert outcome.train_tokens_per_s == 300 / 15.0  # its 300 tokens trained until 15 s, not 10


def test_the_systems_run_in_an_order_rotated_at_each_rate() -> None:
    systems = ["separate", "merged", "collm-fl"]
    assert [run_order(systems, k) for k in range(4)] == [
        ["separate", "merged", "collm-fl"],
        ["merged", "collm-fl", "separate"],
        ["collm-fl", "separate", "merged"],
        ["separate", "merged", "collm-fl"],
    ]
    # The benchmark shifts it by the seed too: runs of one rate on seeds 3, 4, 5 (rotated by the
    # rate's index alone) ran CoLLM-FL last every time, on a machine whose speed drifted.
    five = ["separate", "colocated", "merged", "rolling", "collm-fl"]
    assert [run_order(five, seed + 0).index("collm-fl") for seed in (3, 4, 5)] == [1, 0, 4]


def test_a_trace_too_short_for_the_schedule_is_refused_before_anything_runs(capsys) -> None:
    rows = [TraceRow(float(i), 10, 10) for i in range(20)]
    check_trace_span(rows, [1.0], 20.0)  # 20 requests at 1/s last the 20 s
    with pytest.raises(ConfigError, match=r"its 20 requests last 10 s at 2\.00 req/s, less than"):
        check_trace_span(rows, [1.0, 2.0], 20.0)
    args = ["--rates", "1", "--rounds", "3", "--duration-per-round", "60", "--out", "/nonexist"]
    code = main(["bench", "goodput", "--trace", str(EXAMPLE_TRACE), *args])
    assert code == 2 and "last 20 s at 1.00 req/s, less than the 192 s" in capsys.readouterr().err


def test_rates_the_schedule_cannot_hold_are_refused_before_calibration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Too high a rate failed only after the model was loaded and a replica calibrated (over the
    # schedule's cap), too low a one not at all (no request in the schedule: an empty report).
    from collm_fl.bench import goodput

    def started(*args: object, **kwargs: object) -> None:
        raise AssertionError("the rates were not checked before the run started")

    monkeypatch.setattr(goodput, "CentralEvaluator", started)
    monkeypatch.setattr(goodput, "calibrate", started)
    args = ["--rounds", "3", "--duration-per-round", "60", "--out", str(tmp_path / "out")]
    for rate, why in (("1e9", "more than the 5000000 a schedule holds"), ("1e-4", "no request")):
        assert main(["bench", "goodput", "--rates", f"1,{rate}", *args]) == 2, rate
        err = capsys.readouterr().err
        assert f"--rates: {float(rate):g} req/s" in err and why in err, err
    assert not (tmp_path / "out").exists()


def test_each_collm_fl_system_is_held_against_the_baselines_only() -> None:
    runs = [
        fake_run("separate", 2.0, {0: 4.0, 1: 3.8}, met=1),
        fake_run("colocated", 2.0, {0: 4.0, 1: 3.6}, met=1),
        fake_run("merged", 2.0, {0: 4.0, 1: 3.6}, met=2),
        fake_run("collm-fl", 2.0, {0: 4.0, 1: 3.7}, met=4),  # worse than co-located from 5 s on
        fake_run("collm-fl-quality", 2.0, {0: 4.0, 1: 3.5}, met=3),  # better: not a baseline
    ]
    md = render_markdown(fake_result(runs, [2.0]))
    goals = md.split("### Against the goals")[1].split("\n### ")[0]
    rows = [line for line in goals.splitlines() if line.startswith("| 2.00 req/s")]
    assert len(rows) == 2
    default, quality = rows
    # CoLLM-FL serves 3.7 from 5 s of 10 while co-located and merged (the best by goodput)
    # serve 3.6: no worse half the time, however much better the quality-first variant serves.
    assert (
        "| CoLLM-FL | 2.00× | 50% | 50% (merged) | 3.7000 vs 3.6000 (co-located, uncoordinated) |"
        in default
    )
    assert "| CoLLM-FL, quality first | 1.50× | 100% | 100% (merged) | 3.5000 vs 3.6000" in quality
    assert "Goodput / best baseline (merged): CoLLM-FL **2.00×**; CoLLM-FL, quality first" in md


def test_the_setup_states_trainings_share_of_a_core_replicas_share() -> None:
    # 3 steps of 1.0 s a 10-s round: 30 % of a core of its own; with two replicas a core, each
    # has half a core, and the same 3 steps (each taking 2 s) are 60 % of it (it said 30 %).
    runs = [fake_run("merged", 2.0, {0: 4.0}, met=2), fake_run("collm-fl", 2.0, {0: 4.0}, met=4)]
    result = fake_result(runs, [2.0])
    own = render_markdown(result)
    assert "each pinned to its own core" in own and "about 30 % of the replicas' compute" in own
    shared = render_markdown(replace(result, settings=replace(result.settings, core_sharing=2.0)))
    assert "2 replicas a core on average" in shared
    assert "about 60 % of the replicas' compute" in shared and "2 × that with the core" in shared
    # A report stored before core sharing was: as the run sized it, replicas over its cores.
    data = fake_result(runs, [2.0]).to_json()
    del data["settings"]["core_sharing"]
    data["settings"]["replicas"] = 4
    data["machine"]["info"]["cpu_count"] = 2
    assert result_from_json(data).settings.core_sharing == 2.0
    data["machine"]["info"]["cpu_count"] = 8
    assert result_from_json(data).settings.core_sharing == 1.0


def test_a_report_from_before_the_variant_still_renders_its_ratio() -> None:
    runs = [
        fake_run("merged", 2.0, {0: 4.0, 1: 3.6}, met=2),
        fake_run("collm-fl", 2.0, {0: 4.0, 1: 3.6}, met=4),
    ]
    data = fake_result(runs, [2.0]).to_json()
    for by_rate in data["by_rate"]:  # type: ignore[union-attr]
        by_rate["goodput_ratio"] = by_rate.pop("ratios")["collm-fl"]  # what it held before
    md = render_markdown(result_from_json(data))
    # The load is named by what the schedule offered (4 requests in 10 s), not the nominal rate.
    label = "2.00 req/s nominal, offered 0.40 req/s (4 requests): 0.05 × R × one replica's"
    assert f"| {label} saturated throughput, light | CoLLM-FL " in md
    assert "Goodput / best baseline (merged): CoLLM-FL **2.00×**." in md


def test_a_decision_recorded_before_the_rest_seconds_renders_a_dash() -> None:
    runs = [
        fake_run("merged", 2.0, {0: 4.0, 1: 3.6}, met=2),
        fake_run("collm-fl", 2.0, {0: 4.0, 1: 3.6}, met=4),
    ]
    decision = {"replica": 0, "steps": 3, "backfill": 2, "share": 0.3, "load": "1.0 req/s"}
    runs[1].federation.rounds[0].allocation = [
        {**decision, "trained": 5, "backfilled": 2, "lent_s": 0.0, "late_rest_s": 12.5},
        {**decision, "replica": 1, "trained": 4},  # as goodput.json held it before
        {**decision, "replica": 2, "trained": 3, "start_s": 20.0, "began_s": 14.25},  # a turn
    ]
    md = render_markdown(fake_result(runs, [2.0]))
    row = "| CoLLM-FL | 2.00 | 1 | r0 | 3 | 2 | 5 (2) | 0.0 | 12.5 | 0.30 | – | – | 1.0 req/s |"
    assert row in md
    assert "| CoLLM-FL | 2.00 | 1 | r1 | 3 | 2 | 4 (0) | – | – | 0.30 | – | – | 1.0 req/s |" in md
    assert "| 1 | r2 | 3 | 2 | 3 (0) | – | – | 0.30 | 20.0 | 14.2 | 1.0 req/s |" in md


def test_replicas_set_to_take_turns_are_asked_to_under_light_load(monkeypatch) -> None:
    """The orchestrator passes the allocation's turns on as the federation's server does: the
    first turn (rotating with the round) is asked at once, the next one when the first returns,
    with what is left of the deadline, or at its planned start if the first runs over; under
    heavy load every job starts at once."""
    import collm_fl.bench.goodput_systems as systems

    monkeypatch.setattr(systems, "available_cpus", lambda: [0, 1])  # (a core each, anywhere)
    from collm_fl.bench.goodput_rounds import Orchestrator
    from collm_fl.bench.goodput_systems import SYSTEM_SPECS
    from collm_fl.policies.allocation import TURN_SLACK

    calls: list[tuple[int, float, float]] = []  # (replica, start_after_s, deadline_s)
    lock = threading.Lock()

    class Client:
        def __init__(self, i: int, utilization: float) -> None:
            self.i, self.utilization = i, utilization
            self.hold: threading.Event | None = None  # train returns only once this is set
            self.frees: threading.Event | None = None  # ... which being asked to train sets

        def load_report(self, reset: bool) -> dict[str, float]:
            return {
                "request-rate": 0.2,
                "queue-depth": 0.0,
                "ttft-p95": 0.5,
                "tpot-p95": 0.05,
                "slo-attainment": 1.0,
                "serving-utilization": self.utilization,
            }

        def train(self, rnd, steps, lr, deadline_s, **kw):
            with lock:
                calls.append((self.i, kw["start_after_s"], deadline_s))
            if self.frees is not None:
                self.frees.set()
            if self.hold is not None:
                assert self.hold.wait(30), "the next turn never started"
            metrics = {"local-steps": 2.0, "train-tokens": 10.0, "train-seconds": 2 * step_s}
            return {}, {**metrics, "num-examples": 5.0}

    def orchestrator(utilization: float, system: str = "collm-fl-turns") -> Orchestrator:
        orch = Orchestrator.__new__(Orchestrator)
        orch.spec, orch.training, orch.router = SYSTEM_SPECS[system], [0, 1], None
        orch.clients = [Client(0, utilization), Client(1, utilization)]  # type: ignore[list-item]
        orch.s = SimpleNamespace(  # type: ignore[assignment]
            steps_per_replica=2,
            replicas=2,
            slo=SLOSpec(2.0, 0.2),
            deadline_s=60.0,
            step_seconds=step_s,
            core_sharing=1.0,
            learning_rate=1e-3,
        )
        orch._forecast, orch._step_s, orch._history, orch._allocation = {}, {}, [(0, 5.0)], []
        orch.version = 0
        return orch

    step_s = 5.0
    light = orchestrator(0.1)
    for rnd, first in [(1, 0), (2, 1)]:
        light._allocation, calls[:] = [], []
        light._train(rnd, light._budgets(rnd))
        planned = {a["replica"]: a["start_s"] for a in light._allocation}
        assert planned == {first: 0.0, 1 - first: pytest.approx(2 * 5.0 * TURN_SLACK)}
        # The second turn was asked when the first returned (at once here), from then on.
        assert [(i, start) for i, start, _ in calls] == [(first, 0.0), (1 - first, 0.0)]
        assert calls[0][2] == 60.0 and 50.0 < calls[1][2] <= 60.0
        began = {a["replica"]: a["began_s"] for a in light._allocation}
        assert began[first] == 0.0 and began[1 - first] == pytest.approx(60.0 - calls[1][2])
    # Each replica's speed from its replies: the fastest of its last STEP_HISTORY rounds.
    assert light._step_seconds(0) == 5.0 and light._step_s[0].maxlen == STEP_HISTORY
    # A first turn that runs over its length: the second starts at its planned start anyway.
    step_s = 0.4  # (turn 2 planned 1 s in: long after turn 1 was asked)
    slow = orchestrator(0.1)
    calls[:] = []
    first, second = slow.clients  # type: ignore[misc]
    first.hold = second.frees = threading.Event()  # type: ignore[attr-defined]
    slow._train(1, slow._budgets(1))
    assert {a["replica"]: a["start_s"] for a in slow._allocation}[1] > 0  # (in turns)
    assert [(i, start) for i, start, _ in calls] == [(0, 0.0), (1, 0.0)]
    heavy = orchestrator(0.5)  # together 1.0: more than one replica may carry alone
    calls[:] = []
    heavy._train(1, heavy._budgets(1))
    assert sorted((i, start) for i, start, _ in calls) == [(0, 0.0), (1, 0.0)]
    assert all(deadline == 60.0 for _, _, deadline in calls)
    # CoLLM-FL as it ships (no turns): under the same light load both are planned at once.
    for system, at_once in [("collm-fl-turns", False), ("collm-fl", True)]:
        orch = orchestrator(0.1, system)
        orch._budgets(1)
        plans = orch._plans.values()
        assert all(b.turn == 0 and b.start_after_s == 0.0 for b in plans) is at_once, system


def test_the_rolling_balancer_skips_the_replica_out_of_rotation() -> None:
    from collm_fl.bench.goodput_rounds import RollingRouter

    router = RollingRouter(["a", "b", "c"])
    assert [router.route(i) for i in range(4)] == ["a", "b", "c", "a"]
    router.take_out(1)
    assert {router.route(i) for i in range(6)} == {"a", "c"}
    router.put_back(1)
    assert {router.route(i) for i in range(6)} == {"a", "b", "c"}
    for k in range(3):  # every replica out (one replica alone): it serves anyway
        router.take_out(k)
    assert {router.route(i) for i in range(3)} == {"a", "b", "c"}


def test_rolling_trains_one_replica_at_a_time_out_of_rotation(monkeypatch) -> None:
    """Each replica leaves the rotation before its job and is back before the next one's; a job
    gets what is left of the round's deadline; a different replica goes first each round; one
    that no step fits in what is left stays in rotation and trains nothing."""
    import collm_fl.bench.goodput_systems as systems

    monkeypatch.setattr(systems, "available_cpus", lambda: [0, 1])  # (a core each, anywhere)
    from collm_fl.bench.goodput_rounds import Orchestrator, RollingRouter
    from collm_fl.bench.goodput_systems import SYSTEM_SPECS

    router = RollingRouter(["http://r0", "http://r1"])
    seen: list[tuple[int, set[str], float]] = []
    monkeypatch.setattr(Orchestrator, "_drain", lambda self, i: 0.0)

    def one(i: int, deadline_s: float):
        serving = {router.route(k) for k in range(4)}
        seen.append((i, serving, deadline_s))
        return {}, {"local-steps": 1.0}

    orch = Orchestrator.__new__(Orchestrator)
    orch.router, orch.spec, orch._step_s = router, SYSTEM_SPECS["rolling"], {}
    orch._stop = threading.Event()
    orch.s = SimpleNamespace(  # type: ignore[assignment]
        deadline_s=30.0, step_seconds=2.0, core_sharing=1.0, replicas=2
    )

    def clock_of(*times: float):
        ticks = list(times)
        return lambda: ticks.pop(0) if len(ticks) > 1 else ticks[0]

    # Round 1 starts at 100 s; replica 0 is asked at +10 s (checked, then after its drain),
    # replica 1 at +21 s.
    orch.clock = clock_of(100.0, 110.0, 110.0, 121.0, 121.0)
    assert sorted(orch._train_in_turn(1, [0, 1], one)) == [0, 1]
    assert seen == [(0, {"http://r1"}, 20.0), (1, {"http://r0"}, 9.0)]
    assert {router.route(k) for k in range(4)} == {"http://r0", "http://r1"}  # both back
    # Round 2: replica 1 first; replica 0 would have 1 s left, less than a step (2 s).
    seen.clear()
    orch.clock = clock_of(200.0, 200.0, 200.0, 229.0)
    assert sorted(orch._train_in_turn(2, [0, 1], one)) == [1]
    assert seen == [(1, {"http://r0"}, 30.0)]
    assert {router.route(k) for k in range(4)} == {"http://r0", "http://r1"}


def test_rolling_reloads_one_replica_at_a_time_out_of_rotation() -> None:
    """Each replica is out of rotation while its reload runs and back before the next starts;
    without the rolling balancer every replica reloads at once."""
    from collm_fl.bench.goodput_rounds import Orchestrator, RollingRouter
    from collm_fl.bench.goodput_systems import SYSTEM_SPECS

    router = RollingRouter(["http://r0", "http://r1", "http://r2"])
    seen: list[tuple[int, set[str]]] = []

    class Client:
        def __init__(self, i: int) -> None:
            self.i = i

        def push_version(self, state, peft_config, version, mode):
            seen.append((self.i, {router.route(k) for k in range(6)}))
            return {"promoted_at": 1.0, "load_ms": 300.0}

    orch = Orchestrator.__new__(Orchestrator)
    orch.router, orch.spec, orch.serving = router, SYSTEM_SPECS["rolling"], [0, 1, 2]
    orch.clients = [Client(i) for i in range(3)]  # type: ignore[list-item]
    orch.peft_config, orch._pushed_wall = {}, []
    swap_ms, failures = orch._push(1, {})
    assert swap_ms == [300.0] * 3 and failures == []
    assert seen == [
        (0, {"http://r1", "http://r2"}),
        (1, {"http://r0", "http://r2"}),
        (2, {"http://r0", "http://r1"}),
    ]
    assert {router.route(k) for k in range(6)} == {"http://r0", "http://r1", "http://r2"}


def test_a_run_that_fails_mid_way_still_reports_the_rates_every_system_finished(
    tmp_path: Path, monkeypatch
) -> None:
    # An hour of finished runs was lost to one failure at the last rate: the finished rates
    # are now reported (marked as a run that stopped), and the error still ends the command.
    from collm_fl.bench import goodput
    from collm_fl.bench.goodput_result import Calibration

    monkeypatch.setattr(
        goodput, "calibrate", lambda *a, **k: Calibration(0.1, 0.01, 4.0, 1.0, 10, 16, 1.0, 5.0)
    )

    def run_system(system, rate, *args):
        if rate == 2.0 and system == "collm-fl":
            raise RuntimeError("replica 1 died")
        return fake_run(system, rate, {0: 4.0, 1: 3.8}, met=3 if system == "collm-fl" else 1)

    monkeypatch.setattr(goodput, "run_system", run_system)
    with pytest.raises(RuntimeError, match="replica 1 died"):
        run_goodput_benchmark(
            model="tiny",
            rates=[1.0, 2.0],
            rounds=1,
            duration_per_round_s=10.0,
            out_dir=tmp_path,
            systems=["merged", "collm-fl"],
        )
    data = json.loads((tmp_path / "goodput.json").read_text())
    assert data["rates"] == [1.0] and {r["rate"] for r in data["runs"]} == {1.0}
    assert "2.00 req/s, collm-fl: RuntimeError: replica 1 died" in data["stopped"]
    md = (tmp_path / "goodput.md").read_text()
    assert "**This run did not finish** (stopped at 2.00 req/s, collm-fl" in md
    assert result_from_json(data).stopped == data["stopped"]


class _Federation:
    """`LocalFederation` for run_system, without processes: it records that it was stopped."""

    made: ClassVar[list[_Federation]] = []

    def __init__(self, workdir: Path, num_replicas: int, model: str) -> None:
        self.control_token, self.stopped = "token", False
        _Federation.made.append(self)

    def stop(self) -> None:
        self.stopped = True


class _Client:
    """A replica's control client that takes every version, or refuses them (`refuses`)."""

    def __init__(self, address: str, refuses: bool) -> None:
        self.address, self.refuses, self.closed = address, refuses, False

    def push_version(self, state, peft_config, version, mode):
        if self.refuses:
            raise ReplicaUnavailable(f"replica at {self.address}: 409 refused version {version}")
        return {"promoted_at": 1.0, "load_ms": 2.0}

    def load_report(self, reset: bool) -> dict[str, float]:
        return {}

    def close(self) -> None:
        self.closed = True


def _fake_processes(monkeypatch: pytest.MonkeyPatch, refuse: bool) -> list[_Client]:
    """run_system with replicas that are not processes (replica 1 refusing every version
    when ``refuse``); the clients it made."""
    import collm_fl.bench.goodput_systems as systems

    clients: list[_Client] = []

    def client(address: str, token: str) -> _Client:
        clients.append(_Client(address, refuse and address.endswith(":1")))  # (replica 1's)
        return clients[-1]

    _Federation.made.clear()
    monkeypatch.setattr(systems, "LocalFederation", _Federation)
    monkeypatch.setattr(systems, "ReplicaClient", client)
    monkeypatch.setattr(
        systems,
        "_start_replicas",
        lambda fed, s, spec: (
            [f"http://127.0.0.1:{k}" for k in range(s.replicas)],
            [f"127.0.0.1:{k}" for k in range(s.replicas)],
        ),
    )
    return clients


def _run_system(tmp_path: Path, system: str = "merged"):
    from collm_fl.bench.goodput_rounds import RunSettings, StartVersion
    from collm_fl.bench.goodput_systems import run_system

    slo = SLOSpec(ttft_s=1.0, tpot_s=0.1)
    settings = RunSettings("tiny", 2, 3, 10.0, 2.0, 7.0, 3, 1.0, 5e-4, slo, 8, 4, 30.0, 0)
    evaluator = SimpleNamespace(
        cfg=SimpleNamespace(lora=SimpleNamespace(to_peft_config_dict=lambda model: {}))
    )
    return run_system(
        system,
        1.0,
        [],
        settings,
        evaluator,  # type: ignore[arg-type]
        StartVersion({}, 4.0),
        tmp_path / "run",
        lambda line: None,
    )


def test_a_replica_that_refuses_version_0_fails_the_run_before_its_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The run went on without it, for its whole schedule, and then lost the whole report (exit
    # 2: "0.0 is before the first version switch"): that replica had never served a version.
    import collm_fl.bench.goodput_systems as systems

    clients = _fake_processes(monkeypatch, refuse=True)
    loads: list[object] = []

    def load(*args: object, **kwargs: object) -> None:
        loads.append(args)
        raise AssertionError("the load started")

    monkeypatch.setattr(systems, "_load_and_rounds", load)
    with pytest.raises(WorkFailed, match=r"replica 1: version 0 not taken: .*409 refused") as e:
        _run_system(tmp_path)
    assert "replica 0" not in str(e.value)  # (it took version 0)
    assert loads == []
    assert [f.stopped for f in _Federation.made] == [True]
    assert [c.closed for c in clients] == [True, True]


def test_an_interrupt_does_not_wait_for_the_runs_remaining_rounds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ctrl-C (or SIGTERM, which the CLI raises as one) during a run left the replicas training
    # until every remaining round was over: asyncio.run joined the thread the rounds ran on
    # before run_system's `finally` could stop anything.
    import asyncio

    import collm_fl.bench.goodput_systems as systems
    from collm_fl.bench.goodput_rounds import FederationLog

    _fake_processes(monkeypatch, refuse=False)
    rounds: list[Rounds] = []

    class Rounds:
        def __init__(self, *args: object) -> None:
            self.running, self.told_to_stop = threading.Event(), threading.Event()
            self.ran_every_round = False
            self.progress_line = lambda: ""
            rounds.append(self)

        def publish_initial(self) -> None:
            pass

        def stop(self) -> None:
            self.told_to_stop.set()

        def run(self, t0: float, t0_wall: float) -> FederationLog:
            self.running.set()
            # Its rounds, until it is told to stop (5 s: far longer than the run needs to end)
            self.ran_every_round = not self.told_to_stop.wait(5.0)
            return FederationLog([], [], {0: 4.0})

    async def interrupted_load(*args: object, **kwargs: object) -> None:
        while not rounds[0].running.is_set():  # (once the rounds run)
            await asyncio.sleep(0.01)
        raise KeyboardInterrupt  # as the CLI's SIGTERM handler raises it

    monkeypatch.setattr(systems, "Orchestrator", Rounds)
    monkeypatch.setattr(systems, "replay_round_robin", interrupted_load)
    with pytest.raises(KeyboardInterrupt):
        _run_system(tmp_path)
    (orchestrator,) = rounds
    # Told to stop while its rounds were still running, and the processes stopped.
    assert orchestrator.told_to_stop.is_set() and not orchestrator.ran_every_round
    assert [f.stopped for f in _Federation.made] == [True]


def test_a_stopped_orchestrator_starts_no_more_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its pacing waits on the stop: told to stop an hour before its first round, it ends now."""
    import time

    import torch

    from collm_fl.bench.goodput_rounds import Orchestrator, RunSettings, StartVersion
    from collm_fl.bench.goodput_systems import SYSTEM_SPECS

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # (the test process's)
    slo = SLOSpec(ttft_s=1.0, tpot_s=0.1)
    settings = RunSettings("tiny", 2, 3, 10.0, 3600.0, 7.0, 3, 1.0, 5e-4, slo, 8, 4, 30.0, 0)
    evaluator = SimpleNamespace(
        cfg=SimpleNamespace(lora=SimpleNamespace(to_peft_config_dict=lambda model: {}))
    )
    orch = Orchestrator(
        SYSTEM_SPECS["merged"],
        settings,
        [],
        [],
        [],
        evaluator,  # type: ignore[arg-type]
        StartVersion({}, 4.0),
        lambda line: None,
    )
    logs = []
    t0, t0_wall = time.monotonic(), time.time()
    rounds = threading.Thread(target=lambda: logs.append(orch.run(t0, t0_wall)), daemon=True)
    rounds.start()
    orch.stop()
    rounds.join(timeout=10.0)
    assert not rounds.is_alive(), "the rounds went on after stop()"
    assert logs[0].rounds == []


def _request(index: int, status: str = "ok") -> RequestResult:
    return RequestResult(
        index=index,
        sent_at=0.5 * index,
        ttft_s=0.2 if status == "ok" else None,
        tpot_s=0.05 if status == "ok" else None,
        e2e_s=1.0,
        status=status,
        http_status=200 if status == "ok" else 503,
        adapter_version=1,
        prompt_tokens=48,
        output_tokens=24 if status == "ok" else 0,
        error=None if status == "ok" else "overloaded",
    )


def test_request_records_of_a_new_run_replace_the_old_runs_whole(tmp_path: Path) -> None:
    first = {("colocated", 0): [_request(0), _request(1, "http_503")], ("collm-fl", 1): []}
    folder = write_request_records(tmp_path, first)
    assert sorted(p.name for p in folder.iterdir()) == [
        "collm-fl-rate2.jsonl",
        "colocated-rate1.jsonl",
    ]
    assert read_results_jsonl(folder / "colocated-rate1.jsonl") == first[("colocated", 0)]
    assert read_results_jsonl(folder / "collm-fl-rate2.jsonl") == []
    write_request_records(tmp_path, {("merged", 0): [_request(2)]})
    assert [p.name for p in folder.iterdir()] == ["merged-rate1.jsonl"]  # none of the first run's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["requests"]  # no staging folder left


def test_request_records_are_readable_like_files_and_a_killed_swap_is_mended(
    tmp_path: Path,
) -> None:
    import os
    import stat

    folder = write_request_records(tmp_path, {("merged", 0): [_request(0)]})
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask  # (mkdtemp's 0700: private)
    # A run killed between its two renames: the old folder aside, none in place, staging left.
    aside = tmp_path / ".requests-old-x"
    aside.mkdir()
    folder.rename(aside / "requests")
    (tmp_path / ".requests-y").mkdir()
    write_request_records(tmp_path, {("colocated", 0): [_request(1)]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["requests"]
    assert [p.name for p in (tmp_path / "requests").iterdir()] == ["colocated-rate1.jsonl"]


def test_a_report_names_only_its_own_runs_request_records(tmp_path: Path) -> None:
    runs = [fake_run("separate", 1.0, {0: 4.0}, met=1), fake_run("collm-fl", 1.0, {0: 4.0}, met=1)]
    result = replace(fake_result(runs, [1.0]), run_id="first")
    records = {(s.name, 0): [_request(0)] for s in result.systems}
    write_goodput_report(result, tmp_path, records)
    named = "`requests/<system>-rate<k>.jsonl`"
    assert has_request_records(tmp_path, result) and named in (tmp_path / "goodput.md").read_text()

    # A rerun of the same systems and rate killed after its records, before its report: the
    # files have the same names, but they are not this report's requests.
    def killed(path: Path, text: str) -> None:
        raise KeyboardInterrupt

    old_json = (tmp_path / "goodput.json").read_text()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report, "write_text_atomic", killed)
        with pytest.raises(KeyboardInterrupt):
            write_goodput_report(replace(result, run_id="second"), tmp_path, records)
    assert (tmp_path / "requests" / "run-id").read_text() == "second\n"
    assert (tmp_path / "goodput.json").read_text() == old_json
    assert not (tmp_path / "goodput.md").exists()  # (no report naming the second run's records)
    assert not has_request_records(tmp_path, result)
    assert has_request_records(tmp_path, replace(result, run_id="second"))
    assert has_request_records(tmp_path, replace(result, run_id=None))  # a report from before
    main(
        ["bench", "goodput", "--from-json", str(tmp_path / "goodput.json"), "--out", str(tmp_path)]
    )
    assert named not in (tmp_path / "goodput.md").read_text()


def test_the_benchmarks_loss_history_counts_one_replicas_steps_as_the_servers_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The allocation's gain fit reads (steps, loss) per node (the live server's mean over the
    nodes that trained): the sum over replicas made a round of two replicas look twice as long
    as one of one, so its gain per step half as large."""
    from collections import deque

    import numpy as np

    from collm_fl.bench.goodput_rounds import FederationLog, Orchestrator
    from collm_fl.bench.goodput_systems import SYSTEM_SPECS

    state = {
        "m.lora_A.weight": np.ones((2, 4), np.float32),
        "m.lora_B.weight": np.zeros((4, 2), np.float32),
    }
    orch = Orchestrator.__new__(Orchestrator)
    orch.spec, orch.serving, orch.say = SYSTEM_SPECS["collm-fl"], [], lambda line: None
    orch.progress_line = lambda: ""
    orch.s = SimpleNamespace(server_lr=1.0, step_seconds=9.0, core_sharing=1.0, replicas=1)  # type: ignore[assignment]
    orch.state, orch.version, orch._pushed_wall, orch._allocation = state, 0, [], []
    orch._decision = None
    orch.log = FederationLog([], [], {0: 5.0})
    orch._history, orch._steps_total, orch._step_s = [(0.0, 5.0)], 0.0, {}
    losses = iter([4.0, 3.5])
    orch.evaluator = SimpleNamespace(  # type: ignore[assignment]
        evaluate=lambda s: SimpleNamespace(loss=next(losses))
    )
    orch._push = lambda version, s: ([], [])  # type: ignore[method-assign]
    orch._budgets = lambda rnd: {}  # type: ignore[method-assign]
    rounds = iter([([state, state], [1.0, 1.0], [10, 10], 20), ([state], [1.0], [10], 10)])

    def train(rnd, budgets):
        updates, weights, trained, steps = next(rounds)
        return updates, weights, trained, steps, 0, []

    orch._train = train  # type: ignore[method-assign]
    orch._round(1, 0.0, 0.0)
    orch._round(2, 60.0, 0.0)
    assert orch._history == [(0.0, 5.0), (10.0, 4.0), (20.0, 3.5)]
    # A replica's speed: the fastest of its last rounds and the calibration's idle step.
    assert orch._step_seconds(0) == 9.0
    orch._step_s[0] = deque([4.0, 3.0, 3.5])
    assert orch._step_seconds(0) == 3.0
    # A step timed while serving shared the core (it waited within its layers) is no slower
    # speed: the allocation's share counts that wait already.
    orch._step_s[0] = deque([10.5, 12.0])
    assert orch._step_seconds(0) == 9.0
    # Three replicas on two cores (the calibration's step 1.5 × an idle one, on average): replicas
    # 0 and 2 share a core, where a step's own compute, its measured cost, takes twice that in
    # wall time (it was taken as it was: 2 × the steps planned); replica 1 has its core alone.
    import collm_fl.bench.goodput_systems as systems

    monkeypatch.setattr(systems, "available_cpus", lambda: [0, 1])
    orch.s.core_sharing, orch.s.replicas, orch.s.step_seconds = 1.5, 3, 4.5  # (idle: 3 s)
    for i in (0, 1, 2):
        orch._step_s[i] = deque([2.5, 3.5])
    assert [orch._step_seconds(i) for i in (0, 1, 2)] == [5.0, 2.5, 5.0]
    del orch._step_s[0]
    assert orch._step_seconds(0) == 6.0  # (unmeasured: the idle step, shared)
