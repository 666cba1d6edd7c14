"""The main job: its per-round figures (a round without arrivals is reported as such) and its
replicas' flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from collm_fl.live import (
    LiveConfig,
    RoundRow,
    _load_text,
    _report,
    keep_earlier_run,
    live_replica_args,
    recount_rounds,
)
from collm_fl.loadgen.client import RequestResult
from collm_fl.loadgen.goodput import SLOSpec


def _ok(i: int, sent_at: float, ttft: float) -> RequestResult:
    return RequestResult(i, sent_at, ttft, 0.05, ttft + 1.2, "ok", 200, 1, 48, 24, None)


def test_a_round_without_requests_says_so_instead_of_zero_attainment() -> None:
    assert _load_text(0, 0.0, 0.0) == "no requests arrived since the previous round"
    assert _load_text(4, 0.25, 0.75) == "4 requests, goodput 0.25 req/s, SLO attainment 75%"


def test_report_marks_rounds_without_requests(tmp_path: Path) -> None:
    cfg = LiveConfig(rounds=2, out=tmp_path)
    rows = [
        RoundRow(1, 60.0, 1, 4.8, 2, 0, 2, 0.033, 1.0, {"replica0": 0.5}),
        RoundRow(2, 120.0, 2, 4.7, 2, 0, 0, 0.0, 0.0, {"replica0": 0.5}),
    ]
    results = [_ok(0, 10.0, 0.3), _ok(1, 20.0, 6.0)]  # the second misses the 5 s TTFT SLO
    timeline: list[tuple[float, str, int | None, float]] = [
        (60.0, "replica0", 1, 0.5),
        (120.0, "replica0", 2, 0.5),
    ]
    md = _report(cfg, tmp_path, rows, timeline, results, SLOSpec(5.0, 0.5), 120.0)
    table = md.read_text().splitlines()
    assert "| 1 | 60 | v1 | 4.8000 | 2/0 | 2 | 0.033 | 100% | replica0 0.50 |" in table
    assert "| 2 | 120 | v2 | 4.7000 | 2/0 | 0 | - | - | replica0 0.50 |" in table
    assert any("had no arrivals" in line for line in table)
    assert "Whole run: 2 requests, goodput 0.008 req/s, SLO attainment 50%, errors {}." in table
    data = json.loads((tmp_path / "report.json").read_text())
    assert [r["requests"] for r in data["rounds"]] == [2, 0]
    assert (tmp_path / "live.png").exists()
    # An interrupted run's report says so.
    note = "Interrupted: the report covers the rounds so far."
    md = _report(cfg, tmp_path, rows[:1], timeline, results, SLOSpec(5.0, 0.5), 60.0, note)
    assert f"**{note}**" in md.read_text().splitlines()
    assert json.loads((tmp_path / "report.json").read_text())["note"] == note


def test_the_main_jobs_replicas_start_with_its_slos_and_lend_share() -> None:
    from collm_fl.cli.parser import build_parser

    cfg = LiveConfig(ttft_slo_s=4.0, tpot_slo_s=0.3, max_lend_share=0.5)
    args = build_parser().parse_args(["replica", *live_replica_args(cfg)])
    assert (args.ttft_slo, args.tpot_slo, args.max_lend_share) == (4.0, 0.3, 0.5)
    assert not args.lend_early
    early = LiveConfig(max_lend_share=0.9, lend_early=True)
    assert build_parser().parse_args(["replica", *live_replica_args(early)]).lend_early


def test_a_request_in_flight_at_a_round_line_counts_in_the_round_it_was_sent_in() -> None:
    # Round 1 ended at 60 s while the slow request sent at 50 s was still running: the progress
    # line saw only the fast one; the report counts both, the slow one as the SLO miss it was.
    rows = [
        RoundRow(1, 60.0, 1, 4.8, 2, 0, 1, 1 / 60, 1.0),
        RoundRow(2, 120.0, 2, 4.7, 2, 0, 0, 0.0, 0.0),
    ]
    results = [_ok(0, 10.0, 0.3), _ok(1, 50.0, 12.0), _ok(2, 70.0, 0.3)]
    first, second = recount_rounds(rows, results, SLOSpec(5.0, 0.5))
    assert (first.requests, first.slo_attainment) == (2, 0.5)
    assert first.goodput_rps == 1 / 60
    assert (second.requests, second.slo_attainment) == (1, 1.0)
    assert (first.version, second.eval_loss) == (1, 4.7)  # the rest is kept


def test_an_earlier_runs_stores_are_kept_aside_not_resumed(tmp_path: Path) -> None:
    assert keep_earlier_run(tmp_path) is None
    (tmp_path / "federation").mkdir()
    (tmp_path / "federation" / "store.db").write_text("earlier")
    (tmp_path / "site" / "replica0-store").mkdir(parents=True)  # the replicas' versions
    kept = keep_earlier_run(tmp_path)
    assert kept is not None and (kept / "federation" / "store.db").read_text() == "earlier"
    assert (kept / "site" / "replica0-store").is_dir()
    assert not (tmp_path / "federation").exists() and not (tmp_path / "site").exists()
    (tmp_path / "site").mkdir()  # a second earlier run is kept beside the first
    assert keep_earlier_run(tmp_path) != kept


def test_an_earlier_runs_report_goes_aside_with_its_stores(tmp_path: Path) -> None:
    # Left in place, it would read as the report of a new run interrupted before writing its own.
    (tmp_path / "federation").mkdir()
    for name in ("report.md", "report.json", "live.png", "flwr-run.log", "quality.md"):
        (tmp_path / name).write_text("earlier")
    kept = keep_earlier_run(tmp_path)
    assert kept is not None and (kept / "report.md").read_text() == "earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["previous"]


def test_an_interrupted_live_run_reports_what_ran_marks_the_run_and_stops(
    tmp_path: Path, monkeypatch
) -> None:
    """Ctrl-C / SIGTERM mid-run: the report of the rounds so far (marked), the run marked failed
    in the store, the interrupt passed on (exit 130) — without waiting for requests in flight."""
    import collm_fl.live as live

    repo = Path(__file__).resolve().parents[2]
    marked: list[str] = []
    stops: list[bool] = []

    class Fed:
        api_key = None

        def __init__(self, *args, **kwargs) -> None:
            self.replicas: list[object] = []

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            pass

        def start_gateway(self, **kwargs):
            return "http://127.0.0.1:9", None

    class Load:
        def __init__(self, *args) -> None:
            pass

        def start(self) -> None:
            pass

        def stop(self, wait: bool = True):
            stops.append(wait)
            return [_ok(0, 1.0, 0.3)]

    def interrupted(*args, **kwargs):
        rows = args[7]
        rows.append(RoundRow(1, 60.0, 1, 4.8, 2, 0, 1, 0.016, 1.0, {}))
        raise KeyboardInterrupt

    monkeypatch.setattr(live, "LocalFederation", Fed)
    monkeypatch.setattr(live, "_Load", Load)
    monkeypatch.setattr(live, "_monitor", lambda *a: None)
    monkeypatch.setattr(live, "_drive_flwr", interrupted)
    monkeypatch.setattr(live, "mark_interrupted", lambda cfg: marked.append(cfg.run_name))
    cfg = LiveConfig(model="tiny", out=tmp_path / "out", rounds=3)
    with pytest.raises(KeyboardInterrupt):
        live.run_live(cfg, repo)
    assert stops == [False] and marked == ["live"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "**Interrupted: the report covers the rounds so far.**" in md
    assert "| 1 | 60 | v1 |" in md
