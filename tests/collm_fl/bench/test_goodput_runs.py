"""`collm bench goodput-runs`: several goodput runs pooled by the load they offered."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from goodput_fakes import fake_result, fake_run

from collm_fl.bench.goodput_report import write_goodput_report
from collm_fl.bench.goodput_runs import load_results, rate_points, spreads
from collm_fl.cli import main
from collm_fl.errors import ConfigError


def _write(tmp_path: Path, name: str, seed: int, collm_met: int, **kwargs) -> Path:
    """A run at 2.0 req/s whose best baseline (merged) met 1 of 4 requests; CoLLM-FL
    ``collm_met``. With capacity 0.4 req/s a replica, its 0.4 req/s offered are a load of 0.5:
    high."""
    runs = [
        fake_run("separate", 2.0, {0: 4.0, 1: 3.8}, met=0),
        fake_run("merged", 2.0, {0: 4.0, 1: 3.6}, met=1),
        fake_run("collm-fl", 2.0, {0: 4.0, 1: 3.6}, met=collm_met),
    ]
    kwargs.setdefault("capacity_rps", 0.4)
    out = tmp_path / name
    write_goodput_report(fake_result(runs, [2.0], seed=seed, **kwargs), out)
    return out


def test_runs_are_pooled_by_load_with_the_spread_of_the_ratio(tmp_path: Path) -> None:
    paths = [_write(tmp_path, f"s{seed}", seed, met) for seed, met in ((0, 4), (1, 2), (2, 3))]
    results = load_results([str(p) for p in paths])
    points = rate_points(results)
    assert [(p.seed, p.load) for p in points] == [(0, "high"), (1, "high"), (2, "high")]
    assert [p.ratio for p in points] == pytest.approx([4.0, 2.0, 3.0])
    assert points[0].offered_fraction == pytest.approx(0.5)
    (spread,) = spreads(points)
    assert (spread.system, spread.load, spread.points) == ("collm-fl", "high", 3)
    assert [spread.ratio_median, spread.ratio_min, spread.ratio_max] == pytest.approx([3, 2, 4])
    # 3 (2.9999999999999996 as computed) and 4 reach the 3x goal
    assert (spread.at_goal, spread.not_below) == (2, 3)


def test_the_command_writes_its_table_json_and_plot(tmp_path: Path, capsys) -> None:
    paths = [str(_write(tmp_path, f"s{seed}", seed, 4 - seed)) for seed in (0, 1)]
    out = tmp_path / "out"
    assert main(["bench", "goodput-runs", *paths, "--out", str(out)]) == 0
    md = (out / "goodput-runs.md").read_text()
    assert "| CoLLM-FL | high | 2 | 3.50× (3.00× – 4.00×) | 2/2 | 2/2 |" in md
    assert "Seeds repeat" not in md
    # What differed between the runs besides their arrivals (each calibrated itself): pooled
    # under one row, their SLOs and budgets were nowhere in the report.
    runs = md.split("## Runs")[1].split("## Machines")[0]
    assert runs.count("| not recorded |") == 2 and "steps per replica and round" in runs
    data = json.loads((out / "goodput-runs.json").read_text())
    assert [p["ratio"] for p in data["points"]] == pytest.approx([4.0, 3.0])
    assert (out / "goodput_runs.png").stat().st_size > 0


def test_runs_that_share_an_arrival_seed_are_flagged(tmp_path: Path) -> None:
    paths = [str(_write(tmp_path, f"r{k}", 0, 4)) for k in range(2)]
    out = tmp_path / "out"
    assert main(["bench", "goodput-runs", *paths, "--out", str(out)]) == 0
    assert "**Arrival seeds repeat**" in (out / "goodput-runs.md").read_text()
    # Rate k of a run draws its arrivals with seed + k: --seed 0 at its second rate replays the
    # pattern of --seed 1 at its first.
    two_rates = [
        fake_run(system, rate, {0: 4.0, 1: 3.8}, met=met)
        for rate in (1.0, 2.0)
        for system, met in (("merged", 1), ("collm-fl", 3))
    ]
    first = tmp_path / "two-rates"
    write_goodput_report(fake_result(two_rates, [1.0, 2.0], seed=0, capacity_rps=0.4), first)
    second = _write(tmp_path, "seed1", 1, 4)
    assert main(["bench", "goodput-runs", str(first), str(second), "--out", str(out)]) == 0
    assert "**Arrival seeds repeat**" in (out / "goodput-runs.md").read_text()
    third = _write(tmp_path, "seed2", 2, 4)
    assert main(["bench", "goodput-runs", str(first), str(third), "--out", str(out)]) == 0
    assert "seeds repeat" not in (out / "goodput-runs.md").read_text()


def test_a_rate_no_baseline_served_counts_for_whoever_served_it(tmp_path: Path) -> None:
    # Every baseline at zero goodput: no ratio, but CoLLM-FL's goodput meets any goal; a rate
    # where neither side had any says nothing and is left out of the counts.
    runs = [
        fake_run("merged", 2.0, {0: 4.0, 1: 3.6}, met=0),
        fake_run("collm-fl", 2.0, {0: 4.0, 1: 3.6}, met=2),
    ]
    served = tmp_path / "served"
    write_goodput_report(fake_result(runs, [2.0], seed=0, capacity_rps=0.4), served)
    runs = [
        fake_run("merged", 2.0, {0: 4.0, 1: 3.6}, met=0),
        fake_run("collm-fl", 2.0, {0: 4.0, 1: 3.6}, met=0),
    ]
    nobody = tmp_path / "nobody"
    write_goodput_report(fake_result(runs, [2.0], seed=5, capacity_rps=0.4), nobody)
    (spread,) = spreads(rate_points(load_results([str(served), str(nobody)])))
    assert (spread.points, spread.compared, spread.at_goal, spread.not_below) == (2, 1, 1, 1)
    assert spread.ratio_median is None


def test_runs_with_other_settings_are_not_pooled(tmp_path: Path, capsys) -> None:
    a = _write(tmp_path, "a", 0, 4)
    b = _write(tmp_path, "b", 1, 4, replicas=3)
    with pytest.raises(ConfigError, match=r"replicas=3 but .* has 2"):
        load_results([str(a), str(b)])
    code = main(["bench", "goodput-runs", str(a), str(b), "--out", str(tmp_path / "out")])
    assert code == 2 and "are not pooled" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written


def test_one_run_given_twice_is_refused(tmp_path: Path) -> None:
    a = _write(tmp_path, "a", 0, 4)
    with pytest.raises(ConfigError, match="one run counted twice"):
        load_results([str(a), str(a / "goodput.json")])


def test_a_missing_or_foreign_file_exits_2(tmp_path: Path, capsys) -> None:
    foreign = tmp_path / "x.json"
    foreign.write_text('{"model": "tiny"}')
    for given, says in ((foreign, "not a goodput report"), (tmp_path / "nope", "no such")):
        code = main(["bench", "goodput-runs", str(given), "--out", str(tmp_path / "out")])
        assert code == 2 and says in capsys.readouterr().err


def test_runs_with_other_baselines_or_server_lr_are_not_pooled(tmp_path: Path) -> None:
    """The best baseline is the best of those that ran: a run without one is another question."""
    from dataclasses import replace

    a = _write(tmp_path, "a", 0, 4)
    runs = [
        fake_run("merged", 2.0, {0: 4.0, 1: 3.6}, met=1),
        fake_run("collm-fl", 2.0, {0: 4.0, 1: 3.6}, met=4),
    ]
    result = fake_result(runs, [2.0], seed=1, capacity_rps=0.4)
    fewer = replace(result, systems=[s for s in result.systems if s.name != "rolling"])
    write_goodput_report(fewer, tmp_path / "b")
    with pytest.raises(ConfigError, match=r"baselines=.* but .* has"):
        load_results([str(a), str(tmp_path / "b")])
    other_lr = replace(result, settings=replace(result.settings, server_lr=3.0))
    write_goodput_report(other_lr, tmp_path / "c")
    with pytest.raises(ConfigError, match=r"server_lr=3\.0 but .* has 1\.0"):
        load_results([str(a), str(tmp_path / "c")])
