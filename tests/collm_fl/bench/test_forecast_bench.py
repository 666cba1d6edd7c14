"""The forecast benchmark: its error measure, its regret, and the report it writes."""

import json
from pathlib import Path

import numpy as np
import pytest

from collm_fl.bench.forecast import (
    QUANTILE,
    WARMUP_ROUNDS,
    forecast_errors,
    regret,
    round_rates,
    run_forecast_benchmark,
)
from collm_fl.cli import main
from collm_fl.errors import ConfigError

EXAMPLE_TRACE = Path(__file__).parents[3] / "examples" / "custom_trace" / "trace.csv"


def test_a_steady_rate_is_forecast_exactly_by_every_weight():
    for alpha, beta in [(0.1, 0.0), (0.5, 0.5), (1.0, 0.7)]:
        assert forecast_errors([2.0] * 10, alpha, beta) == (0.0, 0.0)


def test_an_under_forecast_weighs_four_times_an_over_forecast():
    # Last-value forecast (alpha 1, beta 0): only the step in the final round is missed, by 1.
    rising = [1.0] * (WARMUP_ROUNDS + 1) + [2.0]
    falling = [2.0] * (WARMUP_ROUNDS + 1) + [1.0]
    loss_up, mae_up = forecast_errors(rising, 1.0, 0.0)
    loss_down, mae_down = forecast_errors(falling, 1.0, 0.0)
    scored = len(rising) - WARMUP_ROUNDS
    assert loss_up == pytest.approx(QUANTILE / scored / np.mean(rising))
    assert loss_down == pytest.approx((1 - QUANTILE) / scored / np.mean(falling))
    assert mae_up == pytest.approx(1 / scored / np.mean(rising))
    assert mae_down == pytest.approx(1 / scored / np.mean(falling))
    assert loss_up * np.mean(rising) == pytest.approx(4 * loss_down * np.mean(falling))


def test_a_trend_catches_a_ramp_that_level_smoothing_trails():
    ramp = [float(i) for i in range(1, 30)]
    with_trend, _ = forecast_errors(ramp, 0.5, 0.5)
    without, _ = forecast_errors(ramp, 0.5, 0.0)
    assert with_trend < without


def test_a_series_too_short_or_without_requests_is_refused():
    with pytest.raises(ConfigError, match="more than 3 rounds"):
        forecast_errors([1.0] * WARMUP_ROUNDS, 0.5, 0.5)
    with pytest.raises(ConfigError, match="mean rate 0"):
        forecast_errors([0.0] * 10, 0.5, 0.5)


def test_regret_is_relative_to_the_best_and_handles_a_perfect_best():
    assert regret({"a": 2.0, "b": 1.0}) == {"a": 2.0, "b": 1.0}
    assert regret({"a": 0.0, "b": 0.5}) == {"a": 1.0, "b": float("inf")}


def test_round_rates_count_each_window_and_drop_what_is_outside():
    rates = round_rates(np.array([0.0, 1.0, 59.9, 60.0, 250.0]), 60.0, 3)
    assert rates.tolist() == [3 / 60, 1 / 60, 0.0]


def test_the_report_ranks_the_grid_and_marks_the_default(tmp_path):
    out = run_forecast_benchmark(
        tmp_path, "cmd", rounds=30, seeds=2, alphas=[0.5, 1.0], betas=[0.0, 0.5]
    )
    assert {p.name for p in tmp_path.iterdir()} == {"forecast.json", "forecast.md", "forecast.png"}
    data = json.loads((tmp_path / "forecast.json").read_text())
    assert data["default"] == "0.5/0.5" and data["seeds"] == [0, 1]
    assert sorted(data["ranked"]) == ["0.5/0", "0.5/0.5", "1/0", "1/0.5"]
    worst = data["worst_regret"]
    assert [worst[k] for k in data["ranked"]] == sorted(worst.values())
    for process, regrets in data["regret"].items():
        assert min(regrets.values()) == pytest.approx(1.0), process
    for k in worst:
        assert worst[k] == max(r[k] for r in data["regret"].values())
    md = (tmp_path / "forecast.md").read_text()
    assert "0.5/0.5 (default)" in md and "`cmd`" in md
    assert out["ranked"] == data["ranked"]


def test_a_trace_is_scored_beside_the_processes(tmp_path):
    data = run_forecast_benchmark(
        tmp_path,
        "cmd",
        rounds=10,
        seeds=1,
        alphas=[0.5],
        betas=[0.5],
        round_s=5.0,
        trace=EXAMPLE_TRACE,
    )
    assert "trace" in data["loss"]  # type: ignore[operator]
    assert "trace.csv: 20 requests" in data["processes"]["trace"]  # type: ignore[index]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--alphas", "0.5,x"], "--alphas must be comma-separated numbers"),
        (["--alphas", "0"], "alphas must be numbers in (0, 1]"),
        (["--betas", "1.5"], "betas must be numbers in [0, 1]"),
        (["--betas", "nan"], "--betas must be finite numbers"),
        (["--rounds", "4"], "need rounds > 4"),
        (["--trace", "/nonexistent.csv"], "--trace: no such file"),
        (["--trace", str(EXAMPLE_TRACE)], "fewer than 5 rounds of 60 s"),
    ],
)
def test_bad_settings_exit_2_and_write_nothing(capsys, tmp_path, args, message):
    code = main(["bench", "forecast", "--out", str(tmp_path / "out"), *args])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
