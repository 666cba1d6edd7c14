"""The goodput report's pure pieces: served quality over time against the goals; a bad
`collm bench goodput --from-json` file (the round trip itself runs with the quick benchmark)."""

import json
from pathlib import Path

import pytest
from goodput_fakes import fake_result, fake_run

from collm_fl.bench.goodput_report import (
    served_loss_at,
    share_at_least_as_good,
    write_goodput_report,
)
from collm_fl.cli import main


def test_the_served_loss_is_a_step_function_of_time():
    curve = [(0.0, 5.0), (10.0, 4.5), (20.0, 4.0)]
    assert served_loss_at(curve, 0.0) == 5.0
    assert served_loss_at(curve, 9.9) == 5.0
    assert served_loss_at(curve, 10.0) == 4.5
    assert served_loss_at(curve, 99.0) == 4.0


def test_share_of_time_no_worse_than_every_other_system():
    mine = [(0.0, 5.0), (10.0, 4.6), (30.0, 4.4)]
    early = [(0.0, 5.0), (5.0, 4.8), (20.0, 4.5)]  # better during [5, 10) and [20, 30)
    late = [(0.0, 5.0), (35.0, 4.0)]  # better from 35 on
    assert share_at_least_as_good(mine, [early], 40.0) == pytest.approx(0.625)
    assert share_at_least_as_good(mine, [late], 40.0) == pytest.approx(0.875)
    assert share_at_least_as_good(mine, [early, late], 40.0) == pytest.approx(0.5)
    assert share_at_least_as_good(mine, [mine], 40.0) == 1.0


def test_the_share_is_exact_between_steps_at_any_time():
    mine = [(0.0, 5.0), (10.37, 4.5)]
    other = [(0.0, 5.0), (10.11, 4.5)]  # better only during [10.11, 10.37)
    assert share_at_least_as_good(mine, [other], 20.0) == pytest.approx(1 - 0.26 / 20.0)
    assert share_at_least_as_good(mine, [other], 10.2) == pytest.approx(10.11 / 10.2)


def test_a_file_that_is_not_a_goodput_report_exits_2(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text('{"model": "tiny"}')
    try:
        code = main(["bench", "goodput", "--from-json", str(bad), "--out", str(tmp_path)])
    except SystemExit as e:
        code = int(e.code or 0)
    assert code == 2 and "--from-json" in capsys.readouterr().err


def test_a_report_that_cannot_be_rendered_exits_2_and_leaves_the_last_report_whole(
    tmp_path, capsys
):
    # A malformed goodput.json crashed `--from-json` (a traceback, exit 1) after it had written
    # the new JSON beside the last run's markdown.
    runs = [fake_run("merged", 2.0, {0: 4.0}, met=2), fake_run("collm-fl", 2.0, {0: 4.0}, met=4)]
    out = tmp_path / "out"
    write_goodput_report(fake_result(runs, [2.0]), out)
    before = {name: (out / name).read_text() for name in ("goodput.json", "goodput.md")}
    for machine in ({"info": {}, "load_avg_start": [], "load_avg_end": []}, None):
        data = json.loads(before["goodput.json"])
        data["machine"] = machine  # no machine description (KeyError), or none (AttributeError)
        data["command"] = "a report that cannot be rendered"
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(data))
        code = main(["bench", "goodput", "--from-json", str(bad), "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and "--from-json: " in err and str(bad) in err, machine
        assert {name: (out / name).read_text() for name in before} == before, machine


def test_the_table_counts_the_requests_not_answered(tmp_path):
    # The committed load-shedding run: CoLLM-FL's gateway refused 106 requests (503), rolling's
    # replicas 16 (their queues were full). Latency percentiles are over answered requests only.
    committed = Path(__file__).parents[3] / "docs" / "bench" / "goodput-shed" / "goodput.json"
    assert main(["bench", "goodput", "--from-json", str(committed), "--out", str(tmp_path)]) == 0
    md = (tmp_path / "goodput.md").read_text()
    assert "| SLO attainment | not answered (503 / other) |" in md
    assert "| CoLLM-FL | 1.026 | 51% | 106 / 0 |" in md
    assert "| rolling drain-and-train | 0.458 | 23% | 16 / 0 |" in md
    assert "left out of the latency percentiles" in md


def test_the_goals_table_compares_quality_with_every_baseline_and_with_the_best_by_goodput(
    tmp_path,
):
    # The committed high-rate shedding run: merged and co-located trained every step and served
    # a lower loss than CoLLM-FL most of the time; rolling, the best by goodput, did not.
    committed = Path(__file__).parents[3] / "docs/bench/goodput-shed-all-high/goodput.json"
    assert main(["bench", "goodput", "--from-json", str(committed), "--out", str(tmp_path)]) == 0
    md = (tmp_path / "goodput.md").read_text()
    assert "| … than the best baseline by goodput |" in md
    assert "| CoLLM-FL | 2.32× | 22% | 99% (rolling drain-and-train) | 4.6755 vs 4.6294" in md
