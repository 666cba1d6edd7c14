"""The main job: its per-round figures (a round without arrivals is reported as such) and its
replicas' flags."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from collm_fl.live import (
    LiveConfig,
    RoundRow,
    _load_text,
    _report,
    keep_earlier_run,
    live_replica_args,
    recount_rounds,
    round_shares,
)
from collm_fl.loadgen.client import RequestResult, build_requests
from collm_fl.loadgen.goodput import SLOSpec


def _ok(i: int, sent_at: float, ttft: float) -> RequestResult:
    return RequestResult(i, sent_at, ttft, 0.05, ttft + 1.2, "ok", 200, 1, 48, 24, None)


def test_a_round_without_requests_says_so_instead_of_zero_attainment() -> None:
    assert _load_text(0, 0.0, 0.0) == "no requests arrived since the previous round"
    over = "no requests: the load schedule ended before this round"
    assert _load_text(0, 0.0, 0.0, schedule_over=True) == over
    assert _load_text(4, 0.25, 0.75) == "4 requests, goodput 0.25 req/s, SLO attainment 75%"


def test_a_round_whose_requests_are_all_still_in_flight_is_not_one_without_arrivals() -> None:
    assert _load_text(0, 0.0, 0.0, sent=3) == "3 sent, none finished yet"
    assert _load_text(0, 0.0, 0.0, schedule_over=True, sent=3) == "3 sent, none finished yet"


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
    assert "| 1 | 60 | v1 | 4.8000 | 2/0/0 | 2 | 0.033 | 100% | replica0 0.50 |" in table
    assert "| 2 | 120 | v2 | 4.7000 | 2/0/0 | 0 | - | - | replica0 0.50 |" in table
    assert any("had no arrivals" in line for line in table)
    assert "Whole run: 2 requests, goodput 0.008 req/s, SLO attainment 50%, errors {}." in table
    data = json.loads((tmp_path / "report.json").read_text())
    assert [r["requests"] for r in data["rounds"]] == [2, 0]
    # No requests: no attainment (null), not 0 % (every request missing its SLO)
    assert [r["slo_attainment"] for r in data["rounds"]] == [1.0, None]
    assert data["summary"]["slo_attainment"] == 0.5
    assert (tmp_path / "live.png").exists()
    md = _report(cfg, tmp_path, rows, timeline, [], SLOSpec(5.0, 0.5), 120.0)
    assert "Whole run: 0 requests, goodput 0.000 req/s, SLO attainment -, errors {}." in (
        md.read_text().splitlines()
    )
    assert json.loads((tmp_path / "report.json").read_text())["summary"]["slo_attainment"] is None
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


def _fake_stack(stops: list[bool], signal_while_stopping: bool) -> tuple[type, type]:
    """A LocalFederation that starts nothing (and, if asked, gets a signal while it stops) and
    a load that has sent one request (recording each stop's ``wait``)."""

    class Fed:
        api_key = None

        def __init__(self, *args, **kwargs) -> None:
            self.replicas: list[object] = []

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            if signal_while_stopping:
                raise KeyboardInterrupt

        def start_gateway(self, **kwargs):
            return "http://127.0.0.1:9", None

    class Load:
        ends_at_s = 1e9

        def __init__(self, *args) -> None:
            pass

        def start(self) -> None:
            pass

        def stop(self, wait: bool = True):
            stops.append(wait)
            return [_ok(0, 1.0, 0.3)]

    return Fed, Load


@pytest.mark.parametrize("again_while_stopping", [False, True])
def test_an_interrupted_live_run_reports_what_ran_marks_the_run_and_stops(
    tmp_path: Path, monkeypatch, again_while_stopping: bool
) -> None:
    """Ctrl-C / SIGTERM mid-run: the report of the rounds so far (marked), the run marked failed
    in the store, the interrupt passed on (exit 130) — without waiting for requests in flight.
    A second one while the stack stops (tens of seconds) still leaves the report."""
    import collm_fl.live as live

    repo = Path(__file__).resolve().parents[2]
    marked: list[str] = []
    stops: list[bool] = []

    Fed, Load = _fake_stack(stops, signal_while_stopping=again_while_stopping)

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
    assert "**Interrupted: the report covers the rounds so far." in md
    assert ("A signal came while the stack stopped" in md) is again_while_stopping
    assert "| 1 | 60 | v1 |" in md


@pytest.mark.parametrize("failure", [None, "superlink exited (code 1) mid-run"])
def test_a_signal_while_a_finished_or_failed_run_stops_keeps_what_ended_it(
    tmp_path: Path, monkeypatch, failure: str | None
) -> None:
    """The rounds were over (all done, or stopped by a process that died): a Ctrl-C while the
    stack stops is noted, and neither hides the cause (exit 1, the process named) nor calls a
    finished run's report an interrupted one."""
    import collm_fl.live as live
    from collm_fl.errors import WorkFailed

    repo = Path(__file__).resolve().parents[2]

    Fed, Load = _fake_stack([], signal_while_stopping=True)

    def rounds(*args, **kwargs):
        args[7].append(RoundRow(1, 60.0, 1, 4.8, 2, 0, 1, 0.016, 1.0, {}))
        if failure is not None:
            args[9].failure = failure  # (as the monitor's watch.died sets it)
            return 1
        return 0

    monkeypatch.setattr(live, "LocalFederation", Fed)
    monkeypatch.setattr(live, "_Load", Load)
    monkeypatch.setattr(live, "_monitor", lambda *a: None)
    monkeypatch.setattr(live, "_drive_flwr", rounds)
    cfg = LiveConfig(model="tiny", out=tmp_path / "out", rounds=1)
    expected = KeyboardInterrupt if failure is None else WorkFailed
    with pytest.raises(expected):
        live.run_live(cfg, repo)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "A signal came while the stack stopped" in md
    assert "Interrupted:" not in md
    assert (f"Stopped: {failure}." in md) is (failure is not None)


def test_a_rounds_training_share_is_each_replicas_mean_over_the_round() -> None:
    timeline = [
        (0.5, "replica0", 0, 0.0),
        (1.5, "replica0", 0, 0.4),
        (2.5, "replica0", 0, 0.6),
        (2.7, "replica1", 0, 0.2),
        (4.0, "replica0", 1, 0.9),  # the next round's share: not this round's
    ]
    assert round_shares(timeline, 1.0, 4.0) == pytest.approx({"replica0": 0.5, "replica1": 0.2})
    # A replica with no sample in the round (its /health too slow) is left out, not misnamed.
    assert round_shares(timeline, 3.0, 5.0) == {"replica0": 0.9}


def _flwr_printing(lines: list[str]) -> list[str]:
    script = "import sys\n" + "".join(f"print({line!r}, flush=True)\n" for line in lines)
    return [sys.executable, "-c", script]


def test_a_round_whose_aggregate_was_not_promoted_shows_the_served_versions_loss(
    tmp_path: Path, capsys
) -> None:
    from types import SimpleNamespace

    from collm_fl.live import _drive_flwr

    lines = [
        "round 1 | clients ok 2 rejected 0 failed 0 | train loss 4.9 | central eval loss 4.7000 "
        "ppl 110.0 | version v1 | 3.0s",
        "round 2 | clients ok 2 rejected 0 failed 0 | train loss 4.8 | central eval loss 4.9000 "
        "ppl 134.3 | version v1 (quality gate: kept previous) | 3.0s",
    ]
    fed = SimpleNamespace(flwr_run_command=lambda *a: _flwr_printing(lines), env=lambda: None)
    load = SimpleNamespace(snapshot=lambda: (), ends_at_s=1e9, due_between=lambda *a: 0)
    rows: list[RoundRow] = []
    code = _drive_flwr(fed, None, "", tmp_path, 0.0, load, SLOSpec(5.0, 0.5), rows, [])
    assert code == 0
    assert [(r.version, r.eval_loss, r.candidate_loss) for r in rows] == [
        (1, 4.7, None),
        (1, 4.7, 4.9),  # v1's loss, not the rejected aggregate's
    ]
    out = capsys.readouterr().out
    assert "round 2 | served v1 (central loss kept; the round's aggregate: 4.900)" in out
    cfg = LiveConfig(model="tiny", out=tmp_path)
    md = _report(cfg, tmp_path, rows, [], [], SLOSpec(5.0, 0.5), 10.0).read_text()
    assert "| 2 | " in md and "4.7000 (round's aggregate 4.9000, not promoted)" in md


def test_the_progress_says_which_versions_every_replica_took_and_counts_rejected_clients(
    tmp_path: Path, capsys
) -> None:
    from collm_fl.live import _drive_flwr

    def round_line(rnd: int, rejected: int, version: int) -> str:
        return (
            f"round {rnd} | clients ok 1 rejected {rejected} failed 0 | train loss 4.9 | "
            f"central eval loss 4.{9 - rnd}000 ppl 110.0 | version v{version} | 3.0s"
        )

    lines = [
        "published v1 to 2/2 nodes in 0.4s",
        round_line(1, 1, 1),
        "publish v2: node 7 failed: timed out",
        "published v2 to 1/2 nodes in 60.0s",
        round_line(2, 0, 2),
        round_line(3, 0, 3),  # (publish-versions=false: no publish line)
    ]
    fed = SimpleNamespace(flwr_run_command=lambda *a: _flwr_printing(lines), env=lambda: None)
    load = SimpleNamespace(snapshot=lambda: (), ends_at_s=1e9, due_between=lambda *a: 0)
    rows: list[RoundRow] = []
    assert _drive_flwr(fed, None, "", tmp_path, 0.0, load, SLOSpec(5.0, 0.5), rows, []) == 0
    assert [r.clients_rejected for r in rows] == [1, 0, 0]
    out = capsys.readouterr().out
    assert "round 1 | served v1 (central loss 4.800) |" in out
    assert "round 2 | v2 (central loss 4.700, published to 1 of 2 nodes) |" in out
    assert "round 3 | v3 (central loss 4.600, not published" in out
    cfg = LiveConfig(model="tiny", out=tmp_path)
    md = _report(cfg, tmp_path, rows, [], [], SLOSpec(5.0, 0.5), 10.0).read_text()
    assert "| v1 | 4.8000 | 1/1/0 |" in md
    assert "| v2 (published to 1 of 2 nodes) |" in md


def test_rates_are_per_second_of_the_loads_schedule_when_the_federation_outlives_it() -> None:
    rows = [
        RoundRow(1, 60.0, 1, 4.8, 2, 0, 0, 0.0, 0.0),
        RoundRow(2, 120.0, 2, 4.7, 2, 0, 0, 0.0, 0.0),
    ]
    results = [_ok(i, 80.0 + i, 0.3) for i in range(10)]  # sent 80-89 s; the schedule ends at 90
    again = recount_rounds(rows, results, SLOSpec(5.0, 0.5), load_end_s=90.0)
    assert again[1].requests == 10 and again[1].goodput_rps == pytest.approx(10 / 30)


def _proc(name: str, code: int | None) -> SimpleNamespace:
    """A process of the stack: running (``code`` None) or exited with ``code``."""
    return SimpleNamespace(
        name=name,
        alive=lambda: code is None,
        popen=SimpleNamespace(returncode=code),
        log_path=Path(f"site/{name}.log"),
    )


def test_a_process_the_run_cannot_finish_without_stops_flwr_run(tmp_path: Path) -> None:
    """SuperNodes below min-train-nodes (Flower would wait for them for ever), the SuperLink, the
    gateway (its errors would read as the system's serving): flwr run is stopped."""
    import subprocess
    import threading

    from collm_fl.launch import LocalFederation
    from collm_fl.live import _monitor, _Watch

    processes = [_proc("gateway", None), _proc("supernode0", None), _proc("supernode1", -9)]
    fed = LocalFederation(tmp_path, processes=processes)  # type: ignore[arg-type]
    watch = _Watch(min_nodes=2)
    flwr = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        watch.driving(flwr)
        _monitor(fed, 0.0, [], threading.Event(), watch)  # returns once it has seen the death
        assert flwr.wait(timeout=30) == -9  # killed: its output ends, the job goes on to report
        assert watch.failure == (
            "supernode1 exited (code -9) mid-run; its log: site/supernode1.log; 1 SuperNode(s) "
            "left, fewer than the run's min-train-nodes=2"
        )
    finally:
        if flwr.poll() is None:
            flwr.kill()
            flwr.wait()
    # A death seen before flwr run started: it is killed as soon as it is.
    late = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    watch.driving(late)
    assert late.wait(timeout=30) == -9
    for name in ("superlink", "gateway"):
        gone = LocalFederation(tmp_path, processes=[_proc(name, 1)])  # type: ignore[list-item]
        assert gone.broken(1) == f"{name} exited (code 1) mid-run; its log: site/{name}.log"


def test_a_replica_that_exits_is_noted_and_the_run_goes_on(tmp_path: Path, capsys) -> None:
    """Its node fails its rounds and the gateway routes around it, as the federation is built
    to: nothing is stopped."""
    import threading

    from collm_fl.launch import LocalFederation
    from collm_fl.live import _monitor, _Watch

    processes = [_proc("supernode0", None), _proc("supernode1", None), _proc("replica1", -9)]
    fed = LocalFederation(tmp_path, processes=processes)  # type: ignore[arg-type]
    assert fed.broken(2) is None
    watch, stop = _Watch(min_nodes=2), threading.Event()
    monitor = threading.Thread(target=_monitor, args=(fed, 0.0, [], stop, watch))
    monitor.start()
    deadline = time.monotonic() + 30
    while not watch.lost and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    monitor.join(timeout=30)
    assert watch.failure is None
    assert watch.lost == ["replica1 exited (code -9) mid-run; its log: site/replica1.log"]
    assert "; the run goes on without it" in capsys.readouterr().out


def test_a_second_live_run_on_the_same_out_is_refused(tmp_path: Path) -> None:
    from collm_fl.errors import ConfigError
    from collm_fl.live import _exclusive

    refused = pytest.raises(ConfigError, match="another collm live is running there")
    with _exclusive(tmp_path), refused, _exclusive(tmp_path):
        pass
    with _exclusive(tmp_path):  # free again once the first has ended
        pass


def test_a_diurnal_main_job_runs_whole_cycles_and_says_how_long(tmp_path: Path) -> None:
    from collm_fl.live import DIURNAL_PERIOD_S, _load_name, live_schedule

    cfg = LiveConfig(model="tiny", arrivals="diurnal", rate=2.0, out=tmp_path)
    assert _load_name(cfg) == "diurnal at 2.0 req/s on average (a 600-s cycle)"
    # Over each 10-minute cycle the mean is the rate (not the rise of a 4-hour cycle).
    offsets = [r.offset_s for r in live_schedule(cfg)]
    for k in range(3):
        cycle = [t for t in offsets if k * DIURNAL_PERIOD_S <= t < (k + 1) * DIURNAL_PERIOD_S]
        assert len(cycle) / DIURNAL_PERIOD_S == pytest.approx(2.0, rel=0.15)


def test_the_main_jobs_schedule_is_bounded_in_requests(tmp_path: Path, monkeypatch) -> None:
    import collm_fl.live as live

    monkeypatch.setattr(live, "MAX_LIVE_REQUESTS", 500)
    cfg = LiveConfig(model="tiny", arrivals="bursty", rate=50.0, out=tmp_path)
    schedule = live.live_schedule(cfg)
    assert len(schedule) <= 500
    assert schedule[-1].offset_s < 500 / 50.0  # 10 s of load, not 4 hours


def test_progress_to_a_reader_that_is_gone_is_dropped_not_a_traceback(monkeypatch) -> None:
    # `collm live | tee log` and a Ctrl-C: tee ends too, and the next progress line raised
    # BrokenPipeError out of the interrupt's report-writing path (no report, run not marked).
    import collm_fl.live as live

    class GonePipe:
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

    silenced: list[bool] = []
    monkeypatch.setattr(live, "silence_lost_terminal", lambda: silenced.append(True))
    monkeypatch.setattr(sys, "stdout", GonePipe())
    live._say("round 1 | served v1")
    assert silenced == [True]


def test_a_device_this_machine_lacks_is_refused_before_anything_starts(
    tmp_path: Path, monkeypatch
) -> None:
    import collm_fl.live as live
    from collm_fl.errors import CollmError

    def started(*args, **kwargs):
        raise AssertionError("the stack was started")

    monkeypatch.setattr(live, "LocalFederation", started)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "out"
    (out / "federation").mkdir(parents=True)  # an earlier run's: left where it is
    cfg = LiveConfig(model="tiny", out=out, run_config="device='cuda'")
    with pytest.raises(CollmError, match="CUDA") as info:
        live.run_live(cfg, repo)
    assert info.value.exit_code == 2
    assert sorted(p.name for p in out.iterdir()) == ["federation"]


def test_a_rate_that_schedules_no_request_is_refused_before_anything_starts(
    tmp_path: Path, monkeypatch
) -> None:
    # It ran the whole federation, then failed computing the report of a load that never came
    # (no report, exit 2 at the end).
    import collm_fl.live as live
    from collm_fl.errors import ConfigError

    def started(*args, **kwargs):
        raise AssertionError("the stack was started")

    monkeypatch.setattr(live, "LocalFederation", started)
    repo = Path(__file__).resolve().parents[2]
    cfg = LiveConfig(model="tiny", out=tmp_path / "out", rate=1e-6)
    with pytest.raises(ConfigError, match=r"--rate 1e-06 req/s sends no request in the load's 4-h"):
        live.run_live(cfg, repo)
    assert not (tmp_path / "out").exists()


def test_a_load_whose_only_request_is_due_at_once_is_still_reported(
    tmp_path: Path, monkeypatch
) -> None:
    # (its schedule "ends" at 0 s: the summary's rates were per second of a 0-s schedule)
    import collm_fl.live as live

    Fed, Load = _fake_stack([], signal_while_stopping=False)
    Load.ends_at_s = 0.0
    monkeypatch.setattr(live, "LocalFederation", Fed)
    monkeypatch.setattr(live, "_Load", Load)
    monkeypatch.setattr(live, "_monitor", lambda *a: None)
    monkeypatch.setattr(live, "_drive_flwr", lambda *a: 0)
    monkeypatch.setattr(live, "run_outcome", lambda *a, **k: 0)
    cfg = LiveConfig(model="tiny", out=tmp_path / "out", rounds=1)
    assert live.run_live(cfg, Path(__file__).resolve().parents[2]) == 0
    assert "Whole run: 1 requests" in (tmp_path / "out" / "report.md").read_text()


def test_the_progress_and_the_report_tell_requests_in_flight_from_no_arrivals(
    tmp_path: Path, capsys
) -> None:
    """Requests sent in a round and not finished by its line (or by the run's stop): "sent, none
    finished", not "no requests arrived"; the report's note about rounds without arrivals is
    kept for rounds that had none."""
    from collm_fl.live import _drive_flwr

    lines = [
        "round 1 | clients ok 2 rejected 0 failed 0 | central eval loss 4.8 | version v1 | 3.0s",
    ]
    fed = SimpleNamespace(flwr_run_command=lambda *a: _flwr_printing(lines), env=lambda: None)
    load = _live_load(build_requests([0.0, 0.001], 16, 8), finished=())
    rows: list[RoundRow] = []
    assert _drive_flwr(fed, None, "", tmp_path, 0.0, load, SLOSpec(5.0, 0.5), rows, []) == 0
    assert rows[0].sent == 2
    assert "| 2 sent, none finished yet |" in capsys.readouterr().out
    # Interrupted (nothing finished is reported): the round had arrivals all the same.
    (row,) = recount_rounds(rows, [], SLOSpec(5.0, 0.5))
    assert (row.requests, row.sent) == (0, 2)
    cfg = LiveConfig(model="tiny", out=tmp_path)
    md = _report(cfg, tmp_path, [row], [], [], SLOSpec(5.0, 0.5), row.at_s).read_text()
    assert "| 0 (2 sent, none finished) | - | - |" in md
    assert "had no arrivals" not in md and "none finished: the run was stopped" in md


def _live_load(requests, finished) -> object:
    """A ``_Load`` of ``requests`` that has finished ``finished`` (its thread never started)."""
    from collm_fl.live import _Load

    load = _Load("http://127.0.0.1:9", LiveConfig(model="tiny"), requests)
    load._completed = tuple(finished)
    return load


def test_output_of_flwr_run_that_is_not_utf8_does_not_end_the_job(tmp_path: Path) -> None:
    from collm_fl.live import _drive_flwr

    line = b"round 1 | clients ok 2 rejected 0 failed 0 | version v1 | 3.0s\n"
    script = f"import sys; sys.stdout.buffer.write(b'\\xff\\xfe a stray byte\\n' + {line!r})"
    fed = SimpleNamespace(
        flwr_run_command=lambda *a: [sys.executable, "-c", script], env=lambda: None
    )
    load = _live_load(build_requests([0.0], 16, 8), finished=())
    rows: list[RoundRow] = []
    assert _drive_flwr(fed, None, "", tmp_path, 0.0, load, SLOSpec(5.0, 0.5), rows, []) == 0
    assert [r.round for r in rows] == [1]
    assert "\ufffd\ufffd a stray byte" in (tmp_path / "flwr-run.log").read_text()


def test_a_failure_driving_flwr_run_fails_the_run_with_a_report(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """An error of the job itself (its flwr-run.log not writable, ...) skipped marking the run
    and writing the report: the run showed as running, and nothing said what had run."""
    import collm_fl.live as live
    from collm_fl.cli import main
    from collm_fl.store import VersionStore

    Fed, Load = _fake_stack([], signal_while_stopping=False)

    def crash(*args, **kwargs):
        rows, out = args[7], args[3]
        rows.append(RoundRow(1, 60.0, 1, 4.8, 2, 0, 1, 0.016, 1.0, {}))
        with VersionStore(out / "federation") as store:  # (as the ServerApp left it)
            store.open_run("live", {}, "tiny")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(live, "LocalFederation", Fed)
    monkeypatch.setattr(live, "_Load", Load)
    monkeypatch.setattr(live, "_monitor", lambda *a: None)
    monkeypatch.setattr(live, "_drive_flwr", crash)
    out = tmp_path / "out"
    repo = str(Path(__file__).resolve().parents[2])
    code = main(["live", "--model", "tiny", "--rounds", "3", "--out", str(out), "--app", repo])
    err = capsys.readouterr().err
    assert code == 1
    assert "collm: error: driving flwr run failed: OSError: [Errno 28] No space left" in err
    md = (out / "report.md").read_text()
    assert "**Stopped: driving flwr run failed: OSError" in md and "| 1 | 60 | v1 |" in md
    with VersionStore(out / "federation") as store:
        assert store.find_run("live").status == "failed"
