"""The replica benchmarks run end to end at smoke size and write their report (no timings)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from collm_fl.bench.replica import MEASUREMENTS, run_replica_benchmarks, write_replica_report
from collm_fl.bench.replica_decode import StepGate, latency_stats
from collm_fl.bench.replica_swap import SWAP_METHODS
from collm_fl.errors import ConfigError


@pytest.mark.slow
def test_quick_run_on_tiny_has_every_measurement_and_writes_the_report(tmp_path: Path) -> None:
    lines: list[str] = []
    result = run_replica_benchmarks("tiny", quick=True, progress=lines.append)
    assert lines, "progress must be reported"
    assert result["measurements"] == list(MEASUREMENTS)
    assert set(result["seconds"]) == set(MEASUREMENTS)
    assert result["params"] > 0 and result["param_bytes"] >= 4 * result["params"]

    swap = result["swap"]
    assert [m["method"] for m in swap["methods"]] == list(SWAP_METHODS)
    for m in swap["methods"]:  # how many swaps fit before the short requests end is timing
        assert len(m["timeline"]["windows"]) == m["swaps"] == m["swap_ms"]["count"]
        assert m["in_swap"]["count"] + m["outside"]["count"] > 0

    memory = result["memory"]
    assert (
        memory["separate_rss_bytes"] == memory["serving_rss_bytes"] + memory["training_rss_bytes"]
    )
    assert min(memory["coexec_rss_bytes"], memory["serving_rss_bytes"]) > 0
    assert memory["training_rss_bytes"] > 0 and memory["train_steps"] == 2

    assert [row["batch"] for row in result["unmerged"]["rows"]] == [1, 8]
    for row in result["unmerged"]["rows"]:
        assert min(row["no_adapter_tok_s"], row["unmerged_tok_s"], row["merged_tok_s"]) > 0

    rows = result["interference"]["rows"]
    assert [(r["share"], r["lend_share"]) for r in rows] == [
        (0.0, 0.0),
        (0.9, 0.0),
        (0.25, 0.25),
        (0.5, 0.5),
        (0.9, 0.9),
    ]
    assert rows[0]["train_steps"] == 0
    assert all(r["tokens_per_s"] > 0 for r in rows)

    json_path, md_path = write_replica_report(result, tmp_path / "out", "collm bench replica")
    data = json.loads(json_path.read_text())
    assert data["command"] == "collm bench replica"
    assert set(MEASUREMENTS) <= set(data) and "machine" in data
    markdown = md_path.read_text()
    for heading in ("## Swap stall", "## Memory", "## Unmerged cost", "## Interference"):
        assert heading in markdown
    for name in ("replica_swap.png", "replica_memory.png", "replica_interference.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0


def test_unknown_measurement_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown measurements"):
        run_replica_benchmarks("tiny", which=["swap", "speed"])


def test_latency_stats_are_in_milliseconds_and_empty_safe() -> None:
    stats = latency_stats([0.001, 0.002, 0.003])
    assert stats["count"] == 3 and stats["p50_ms"] == pytest.approx(2.0)
    assert stats["max_ms"] == pytest.approx(3.0)
    assert latency_stats([])["count"] == 0


def test_step_gate_hold_keeps_steps_out_until_released() -> None:
    import threading

    gate = StepGate()
    entered = threading.Event()

    def stepper() -> None:
        with gate.step():
            entered.set()

    with gate.hold():
        thread = threading.Thread(target=stepper)
        thread.start()
        assert not entered.wait(0.05)  # bounded wait: the step must not start while held
    thread.join()
    assert entered.is_set()
