"""The Flower app end to end: `flwr run` on a local simulation SuperLink with the tiny model."""

import subprocess
import sys
from pathlib import Path

import pytest

from collm_fl.config import format_overrides
from collm_fl.federate import (
    few_nodes_config,
    find_local_superlinks,
    flower_env,
    start_local_superlink,
    stop_processes,
)
from collm_fl.flower_app import stage_app
from collm_fl.launch import free_port
from collm_fl.privacy import epsilon_spent
from collm_fl.store import VersionStore

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def flower(tmp_path_factory):
    """An isolated FLWR_HOME and ports; stops the local SuperLink `flwr run` starts in it."""
    home = tmp_path_factory.mktemp("flwr-home")
    env = flower_env(home)
    env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(free_port())
    env["FLWR_LOCAL_CONTROL_API_PORT"] = str(free_port())
    start_local_superlink(env)  # (`flwr run` gives it 15 s, too few on a loaded CI machine)
    env["APP"] = str(
        stage_app(ROOT, tmp_path_factory.mktemp("app") / "app")
    )  # (as `collm federate` runs it)
    yield env
    stop_processes(find_local_superlinks(home))


def flwr_run(
    env, out: Path, rounds: int, extra: str = "", supernodes: int = 2
) -> subprocess.CompletedProcess:
    flwr = str(Path(sys.executable).with_name("flwr"))
    config = (
        f"num-server-rounds={rounds} model='tiny' output-dir='{out}' local-steps=3 "
        f"central-eval-samples=8 max-samples-per-client=40 {extra}"
    )
    cmd = [
        flwr,
        "run",
        env["APP"],
        "--stream",
        "--federation-config",
        f"num-supernodes={supernodes}",
    ]
    return subprocess.run(
        [*cmd, "--run-config", config], env=env, capture_output=True, text=True, timeout=600
    )


def test_two_rounds_then_resume_for_a_third(flower, tmp_path):
    out = tmp_path / "out"
    first = flwr_run(flower, out, rounds=2)
    log = first.stdout + first.stderr
    assert first.returncode == 0, log[-4000:]
    assert "round 1 | clients ok 2 rejected 0 failed 0" in log
    assert "round 2 | clients ok 2 rejected 0 failed 0" in log

    store = VersionStore(out)
    run = store.find_run("default")
    assert [v.number for v in store.list_versions(run.id)] == [0, 1, 2]
    rounds = store.list_rounds(run.id)
    assert [(r.number, r.status) for r in rounds] == [(1, "aggregated"), (2, "aggregated")]
    assert all(r.eval_loss is not None and r.train_loss is not None for r in rounds)
    assert len(store.participations(run.id)) == 4
    for v in store.list_versions(run.id):
        vdir = store.version_dir(v)
        assert (vdir / "adapter_config.json").is_file()
        assert (vdir / "adapter_model.safetensors").is_file()
    store.close()

    # Same run name, more rounds: resumes from v2 and runs round 3 only.
    second = flwr_run(flower, out, rounds=3)
    log2 = second.stdout + second.stderr
    assert second.returncode == 0, log2[-4000:]
    assert "resuming run 'default' from version v2" in log2
    assert "round 1 |" not in log2 and "round 3 |" in log2
    store = VersionStore(out)
    run = store.find_run("default")
    assert [v.number for v in store.list_versions(run.id)] == [0, 1, 2, 3]
    assert [r.number for r in store.list_rounds(run.id)] == [1, 2, 3]
    store.close()


def test_flower_client_side_dp_runs_end_to_end_with_the_lora_strategy(flower, tmp_path):
    out = tmp_path / "dp"
    extra = (
        "run-name='dp' dp-noise-multiplier=0.1 dp-clipping-norm=0.5 quality-gate-margin=-1 "
        "aggregation='fedavg'"
    )
    result = flwr_run(flower, out, rounds=1, extra=extra)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "central DP noise" in log  # Flower's wrapper added noise to the aggregate
    assert "round 1 | clients ok 2 rejected 0 failed 0" in log
    store = VersionStore(out)
    run_id = store.find_run("dp").id
    assert [v.number for v in store.list_versions(run_id)] == [0, 1]
    # Every reply weighed 1 (the plain mean the noise is calibrated for), not its num-examples.
    assert [p.metrics["weight-used"] for p in store.participations(run_id)] == [1.0, 1.0]
    one = epsilon_spent([0.1], 1e-5)
    assert f"round 1 | privacy spent: epsilon {one:.4g} at delta 1e-05 after 1 noised" in log
    assert store.list_rounds(run_id)[0].metrics["dp-epsilon"] == pytest.approx(one)
    store.close()

    # Resumed for a second round: the account goes on from the stored round, not from zero.
    again = flwr_run(flower, out, rounds=2, extra=extra)
    log = again.stdout + again.stderr
    assert again.returncode == 0, log[-4000:]
    two = epsilon_spent([0.1, 0.1], 1e-5)
    assert f"round 2 | privacy spent: epsilon {two:.4g} at delta 1e-05 after 2 noised" in log
    assert f"privacy spent by the run: epsilon {two:.4g}" in log


def test_a_federation_of_one_node_runs_with_the_config_collm_gives_it(flower, tmp_path):
    # The app's min-train-nodes is 2: without the setting `collm federate --supernodes 1` and
    # `collm site` with one node add, the round would wait for a second node forever.
    assert few_nodes_config(1) == {"min-train-nodes": 1} and few_nodes_config(2) == {}
    out = tmp_path / "one"
    extra = format_overrides(few_nodes_config(1))
    done = flwr_run(flower, out, rounds=1, extra=extra, supernodes=1)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "round 1 | clients ok 1 rejected 0 failed 0" in done.stdout + done.stderr
