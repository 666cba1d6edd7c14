"""The aggregation benchmark runs end to end on a tiny shape and writes its report."""

from __future__ import annotations

import json
from pathlib import Path

from collm_fl.bench import aggregation
from collm_fl.bench.aggregation import run_aggregation_benchmark, write_benchmark_report


def test_benchmark_runs_on_tiny_shape_and_writes_both_files(tmp_path: Path) -> None:
    lines: list[str] = []
    result = run_aggregation_benchmark(
        client_counts=(3,), layers=2, d=64, rank=4, error_modules=2, progress=lines.append
    )
    assert lines, "progress must be reported"
    assert [row["mode"] for row in result["rows"]] == ["fedavg", "exact-float32", "exact-float64"]
    for row in result["rows"]:
        assert row["clients"] == 3 and row["seconds"] >= 0
        assert row["rel_error_mean"] >= row["optimal_rel_error_mean"] - 1e-6
    for exact in result["rows"][1:]:
        assert abs(exact["excess_over_optimal_mean"]) < 1e-6

    json_path, md_path = write_benchmark_report(result, tmp_path / "out", "collm bench agg")
    data = json.loads(json_path.read_text())
    assert json_path.name == "aggregation.json" and md_path.name == "aggregation.md"
    assert data["command"] == "collm bench agg"
    assert {"rows", "machine", "error_note", "error_modules", "modules"} <= set(data)
    assert {"platform", "cpu_count", "torch_version", "torch_threads"} <= set(data["machine"])
    markdown = md_path.read_text()
    assert "| clients | mode | seconds |" in markdown and "collm bench agg" in markdown


def test_the_recorded_commit_says_when_any_part_of_the_package_was_changed(tmp_path):
    # A benchmark's report names the code it ran; a change outside bench/ (the gateway it runs)
    # must show as well.
    import importlib.util
    import shutil
    import subprocess

    pkg = tmp_path / "collm_fl"
    (pkg / "bench").mkdir(parents=True)
    (pkg / "gateway").mkdir()
    shutil.copy(Path(aggregation.__file__), pkg / "bench" / "aggregation.py")
    (pkg / "gateway" / "pool.py").write_text("X = 1\n")

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(tmp_path), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    git("init", "-q")
    git("add", ".")
    git(
        "-c",
        "user.name=t",
        "-c",
        "user.email=t@t",
        "-c",
        "commit.gpgsign=false",
        "commit",
        "-qm",
        "c",
    )
    spec = importlib.util.spec_from_file_location(
        "copied_aggregation", pkg / "bench" / "aggregation.py"
    )
    assert spec is not None and spec.loader is not None
    copied = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copied)
    commit = git("rev-parse", "--short=7", "HEAD")
    assert copied.code_version() == commit
    (pkg / "gateway" / "pool.py").write_text("X = 2\n")
    assert copied.code_version() == f"{commit}+changes"
