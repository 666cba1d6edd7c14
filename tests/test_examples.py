"""The examples under examples/, run for real: against a real replica, a real federation, and the
library's own parsers and policy."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from collm_fl.adapters import LoraSpec
from collm_fl.config import RunConfig
from collm_fl.data import ChatRecord, DataSpec, load_client_data, load_records
from collm_fl.federate import find_local_superlinks, flower_env, stop_processes
from collm_fl.launch import free_port
from collm_fl.loadgen.trace import HEADER, load_azure_trace, mean_rate, scale_trace
from collm_fl.replica.control_client import ReplicaClient
from collm_fl.store import VersionStore
from collm_fl.training import attach_lora, get_adapter_state

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TRACE = EXAMPLES / "custom_trace" / "trace.csv"
OWN_DATA = EXAMPLES / "own_data" / "site_data.jsonl"
API_KEY = "sk-examples"
BIN = Path(sys.executable).parent  # the venv's collm, flwr


def run_example(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def replica(start_module_replica):
    return start_module_replica(api_key=API_KEY)


# --- openai_client.py ----------------------------------------------------------------------


def client_args(url: str, key: str = API_KEY) -> list[str]:
    return ["--base-url", url, "--api-key", key, "--model", "tiny", "--max-tokens", "6"]


def test_openai_client_names_the_base_model_then_the_version_pushed_to_the_replica(
    replica, tiny_fresh
):
    before = run_example("openai_client.py", *client_args(replica.url + "/v1"))
    assert before.returncode == 0, before.stderr
    assert before.stdout.count("adapter_version: null (base model)") == 2
    assert before.stdout.count("X-Adapter-Version: base") == 2

    spec = LoraSpec()  # the replica's defaults
    state = get_adapter_state(attach_lora(tiny_fresh.model, spec))
    with ReplicaClient(replica.control_address, replica.token, timeout=120) as control:
        assert control.push_version(state, spec.to_peft_config_dict("tiny"), 7)["version"] == 7

    after = run_example("openai_client.py", *client_args(replica.url))  # without /v1 works too
    assert after.returncode == 0, after.stderr
    out = after.stdout
    # The chat completion and the stream (every chunk) both name the promoted version.
    assert out.count("adapter_version: 7  (X-Adapter-Version: 7)") == 2, out
    assert "streaming chat completion, stream_options.include_usage" in out
    # The usage chunk of the stream arrived, with the same counts as the whole reply.
    usage = [line for line in out.splitlines() if line.startswith("usage: ")]
    assert len(usage) == 2 and usage[0] == usage[1] and "completion tokens" in usage[0], out


def test_openai_client_exits_2_when_nothing_listens():
    done = run_example("openai_client.py", *client_args(f"http://127.0.0.1:{free_port()}/v1"))
    assert done.returncode == 2
    assert "cannot connect" in done.stderr


@pytest.mark.parametrize("url", ["localhost:8100", "http://127.0.0.1:99999/v1", "ftp://host/v1"])
def test_openai_client_exits_2_on_a_malformed_url(url):
    done = run_example("openai_client.py", *client_args(url))
    assert done.returncode == 2
    assert "--base-url must look like http://host:port" in done.stderr


def test_openai_client_exits_2_with_the_servers_reason_on_a_wrong_key(replica):
    done = run_example("openai_client.py", *client_args(replica.url, key="wrong"))
    assert done.returncode == 2
    assert "401" in done.stderr and "API key" in done.stderr


# --- custom_trace/ -------------------------------------------------------------------------


def test_the_example_trace_is_an_azure_trace_the_library_parses():
    assert TRACE.read_text().splitlines()[0] == ",".join(HEADER)
    rows = load_azure_trace(TRACE)
    assert len(rows) == 20
    assert rows[0].offset_s == 0.0
    assert all(b.offset_s >= a.offset_s for a, b in itertools.pairwise(rows))
    assert all(r.context_tokens > 0 and r.generated_tokens > 0 for r in rows)
    # The README replays it at 2 requests/s: about ten seconds of load, bursts kept.
    scaled = scale_trace(rows, 2.0, 60.0, 64, 16)
    assert len(scaled) == 20 and mean_rate(scaled) == pytest.approx(2.0)
    assert all(r.context_tokens <= 64 and r.generated_tokens <= 16 for r in scaled)


def test_collm_load_replays_the_example_trace_against_a_replica(replica, tmp_path):
    out = tmp_path / "load"
    cmd = [str(BIN / "collm"), "load", "--target", replica.url, "--model", "tiny"]
    cmd += ["--api-key", API_KEY, "--trace", str(TRACE), "--rate", "10", "--duration", "60"]
    cmd += ["--prompt-tokens", "64", "--output-tokens", "8", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["requests"] == 20 and summary["ok"] == 20, summary
    assert summary["config"]["schedule"] == "trace"
    assert "SLO attainment" in done.stdout


# --- allocation_simulator.py ---------------------------------------------------------------


@pytest.fixture(scope="module")
def simulated_day() -> list[dict]:
    done = run_example("allocation_simulator.py", "--json")
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_the_simulator_runs_one_round_per_hour_for_three_replicas(simulated_day):
    assert [r["round"] for r in simulated_day] == list(range(1, 25))
    assert [r["hour"] for r in simulated_day] == list(range(24))
    assert all(len(r["replicas"]) == 3 for r in simulated_day)


def test_in_every_round_a_busier_replica_gets_no_more_training_share(simulated_day):
    for r in simulated_day:
        by_load = sorted(r["replicas"], key=lambda n: n["utilization"])
        shares = [n["share"] for n in by_load]
        assert shares == sorted(shares, reverse=True), r


def test_where_no_growth_is_forecast_a_busier_hour_gets_no_more_training_share(simulated_day):
    for i in range(3):
        # A forecast at or below the reported rate adds no growth: the share follows load alone.
        steady = [
            r["replicas"][i]
            for r in simulated_day
            if r["replicas"][i]["forecast_rate"] <= r["replicas"][i]["request_rate"]
        ]
        assert len(steady) >= 8
        shares = [n["share"] for n in sorted(steady, key=lambda n: n["utilization"])]
        assert shares == sorted(shares, reverse=True)


def test_a_rising_rate_is_forecast_above_its_latest_report(simulated_day):
    downtown = [r["replicas"][0] for r in simulated_day]
    rates = [n["request_rate"] for n in downtown]
    rising = [n for prev, n in zip(rates, downtown[1:], strict=False) if n["request_rate"] > prev]
    assert rising and any(n["forecast_rate"] > n["request_rate"] for n in rising)


def test_the_peak_keeps_the_busiest_replica_at_the_minimum_share_and_night_frees_it(
    simulated_day,
):
    downtown = [r["replicas"][0] for r in simulated_day]
    peak = max(downtown, key=lambda n: n["utilization"])
    night = min(downtown, key=lambda n: n["utilization"])
    assert peak["share"] == pytest.approx(0.1)  # min-training-share
    assert night["share"] > 0.8
    assert all(0.1 <= n["share"] <= 1.0 for r in simulated_day for n in r["replicas"])


def test_each_replica_gets_the_rounds_target_as_planned_plus_backfill_steps(simulated_day):
    for r in simulated_day:
        for n in r["replicas"]:
            assert n["steps"] + n["backfill_steps"] == r["target"], r
            if r["round"] > 1:  # step time measured: planned steps fit the 40 s deadline
                assert n["steps"] * 2.0 / n["share"] <= 40.0 + 1e-6, r


def test_the_simulator_prints_a_table_and_refuses_bad_settings():
    table = run_example("allocation_simulator.py", "--rounds", "3")
    assert table.returncode == 0, table.stderr
    assert len(table.stdout.splitlines()) == 2 + 3 and "downtown" in table.stdout
    bad = run_example("allocation_simulator.py", "--min-share", "2")
    assert bad.returncode == 2 and "--min-share must be in [0, 1]" in bad.stderr


# --- own_data/ -----------------------------------------------------------------------------


def test_the_own_data_file_loads_and_splits_with_the_librarys_loader():
    records = load_records(OWN_DATA)
    assert len(records) == 36
    assert all(isinstance(r, ChatRecord) for r in records)  # instruction and chat records
    cfg = RunConfig.from_flower(
        {"model": "tiny", "data": str(OWN_DATA), "partitioning": "iid", "local-steps": 3}
    )
    assert cfg.data_spec == DataSpec(source=str(OWN_DATA), partitioning="iid", heldout_fraction=0)
    parts = [load_client_data(cfg.data_spec, i, 2) for i in range(2)]
    assert all(p.train and not p.heldout for p in parts)  # (no local evaluation: all of it trains)


@pytest.fixture()
def flower_home(tmp_path):
    """A private FLWR_HOME and ports for `collm federate`; stops any SuperLink left in it."""
    home = tmp_path / "flwr-home"
    env = flower_env(home)
    env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(free_port())
    env["FLWR_LOCAL_CONTROL_API_PORT"] = str(free_port())
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    yield env
    stop_processes(find_local_superlinks(home))


@pytest.mark.slow
def test_the_own_data_script_runs_one_federated_round_on_the_sites_file(flower_home, tmp_path):
    out = tmp_path / "out"
    env = dict(flower_home, OUT=str(out), RUN_NAME="own-data")
    done = subprocess.run(
        ["bash", str(EXAMPLES / "own_data" / "run.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "partition 0/2 (site_data.jsonl-iid-0)" in log
    assert "round 1 | clients ok 2 rejected 0 failed 0" in log
    store = VersionStore(out)
    try:
        run = store.find_run("own-data")
        assert [v.number for v in store.list_versions(run.id)] == [0, 1]
    finally:
        store.close()
    assert "v1    round 1" in done.stdout  # `collm versions`, the script's last step
