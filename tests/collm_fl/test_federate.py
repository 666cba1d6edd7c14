"""The local federation wrapper: what it refuses up front, the local SuperLink it starts, and the
exit code it gives a run."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from collm_fl.config import RunConfig, parse_overrides
from collm_fl.errors import CollmError, ConfigError
from collm_fl.federate import (
    check_node_counts,
    failed_if_interrupted,
    find_local_superlinks,
    flower_env,
    launch_config,
    local_connection,
    local_superlink_running,
    managed_local_superlink,
    run_outcome,
    start_local_superlink,
    stop_processes,
)
from collm_fl.launch import free_port
from collm_fl.store import RUN_FAILED, RUN_FINISHED, RunInfo, VersionStore
from server_app.federation import run_key


@pytest.mark.parametrize("key", ["min-train-nodes", "min-good-replies"])
def test_a_federation_that_could_never_aggregate_is_refused(key):
    cfg = RunConfig.from_flower({key: 3})
    with pytest.raises(ConfigError, match=f"{key}=3 but --supernodes 2"):
        check_node_counts(cfg, 2, "--supernodes")
    check_node_counts(cfg, 3, "--supernodes")


def test_a_run_that_did_not_finish_is_a_failed_command(tmp_path):
    cfg = RunConfig(output_dir=str(tmp_path), run_name="r")
    launched = datetime.now(UTC)
    assert run_outcome(cfg, 0, launched) == 1  # nothing recorded: the ServerApp never got there
    with VersionStore(tmp_path) as store:
        run = store.open_run("r", {}, "tiny")
        store.record_event(run.id, RUN_FINISHED, {})  # an earlier attempt's end
    later = datetime.now(UTC)
    assert run_outcome(cfg, 0, later) == 1  # this attempt crashed (e.g. its resume was refused)
    with VersionStore(tmp_path) as store:  # ... and is not left showing as running
        assert store.find_run("r").status == "failed"
        store.record_event(run.id, RUN_FINISHED, {})
    assert run_outcome(cfg, 0, later) == 0
    # flwr's own failure (an exit code, a signal: -9 would be exit 247) is a failure of the work
    assert run_outcome(cfg, 3, later) == 1
    assert run_outcome(cfg, -9, later) == 1


def test_a_run_its_launcher_was_stopped_in_is_marked_failed_not_left_running(tmp_path):
    cfg = RunConfig(output_dir=str(tmp_path / "out"), run_name="r")
    with pytest.raises(KeyboardInterrupt), failed_if_interrupted(cfg):
        raise KeyboardInterrupt  # before the ServerApp opened its store
    assert not (tmp_path / "out").exists()  # nothing to mark, nothing created
    with VersionStore(cfg.output_path) as store:
        run = store.open_run("r", {}, "tiny")  # status "running", as the ServerApp leaves it
    with pytest.raises(KeyboardInterrupt), failed_if_interrupted(cfg):
        raise KeyboardInterrupt
    with VersionStore(cfg.output_path) as store:
        assert store.find_run("r").status == "failed"
        (event,) = store.events(run.id, RUN_FAILED)
        assert "interrupted" in event.payload["error"]
        store.set_run_status(run.id, "finished")
    with pytest.raises(KeyboardInterrupt), failed_if_interrupted(cfg):
        raise KeyboardInterrupt  # a run that ended is left as it ended
    with VersionStore(cfg.output_path) as store:
        assert store.find_run("r").status == "finished"


def test_a_new_run_of_the_same_name_gets_its_own_key_on_the_replicas(tmp_path):
    def run(created: datetime) -> RunInfo:
        return RunInfo(1, "default", "tiny", "running", created, {})

    first = run(datetime(2026, 11, 29, 14, 0, 0, 123456, tzinfo=UTC))
    assert run_key(first) == "default.20261129T140000"
    assert run_key(run(datetime(2026, 11, 29, 15, 0, tzinfo=UTC))) != run_key(first)
    with VersionStore(tmp_path) as store:  # a resumed run keeps its key
        opened = store.open_run("default", {}, "tiny")
    with VersionStore(tmp_path) as store:
        assert run_key(store.open_run("default", {}, "tiny")) == run_key(opened)


def test_a_store_url_whose_database_cannot_be_loaded_is_refused():
    app = Path(__file__).parents[2]
    with pytest.raises(ConfigError, match="store-url='bogus://x': not a usable database URL"):
        RunConfig.from_app(app, "store-url='bogus://x'")
    with pytest.raises(ConfigError, match=r"postgresql://u@h/db'.*No module named"):
        RunConfig.from_app(app, "store-url='postgresql://u@h/db'")  # its driver is not installed


def test_a_launcher_puts_the_users_settings_over_its_defaults_and_keeps_what_it_relies_on(
    tmp_path, monkeypatch
):
    app = Path(__file__).parents[2]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.jsonl").write_text('{"text": "x"}\n')
    run_config, cfg = launch_config(
        app,
        "min-train-nodes=1 data='mine.jsonl' output-dir='out'",
        defaults={"min-train-nodes": 3, "local-steps": 4},
        fixed={"run-name": "live"},
    )
    assert (cfg.min_train_nodes, cfg.local_steps, cfg.run_name) == (1, 4, "live")
    # Relative paths resolved where the user typed them, not where Flower runs the apps.
    assert cfg.data == str(tmp_path / "mine.jsonl") and cfg.output_dir == str(tmp_path / "out")
    assert parse_overrides(run_config)["output-dir"] == str(tmp_path / "out")
    # A relative SQLite database too (an absolute one, four slashes, stays as typed).
    _, cfg = launch_config(app, "store-url='sqlite:///runs.db'")
    assert cfg.store_url == f"sqlite:///{tmp_path / 'runs.db'}"
    _, cfg = launch_config(app, f"store-url='sqlite:///{tmp_path}/abs.db'")
    assert cfg.store_url == f"sqlite:///{tmp_path}/abs.db"
    with pytest.raises(ConfigError, match="run-name: set by this command"):
        launch_config(app, "run-name='x'", fixed={"run-name": "live"})
    with pytest.raises(ConfigError, match="local-steps given twice"):
        launch_config(app, "local-steps=2 local-steps=3")


@pytest.mark.parametrize("url", ["sqlite:///:memory:", "sqlite://", "sqlite+pysqlite:///:memory:"])
def test_a_launcher_refuses_an_in_memory_store_it_could_not_read_the_run_back_from(url):
    # The ServerApp's run is in its own process's memory: the launcher read an empty database
    # and reported every run failed.
    app = Path(__file__).parents[2]
    with pytest.raises(ConfigError, match=r"store-url=.*: an in-memory database lives in"):
        launch_config(app, f"store-url='{url}'")


def test_a_launcher_refuses_a_model_or_data_path_that_is_not_there(tmp_path, monkeypatch):
    app = Path(__file__).parents[2]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"data: no such file or folder: /no/such\.jsonl"):
        launch_config(app, "data='/no/such.jsonl'")
    with pytest.raises(ConfigError, match="model: no such path: /no/such/model"):
        launch_config(app, "model='/no/such/model'")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"model: empty has no config\.json"):
        launch_config(app, "model='empty'")
    (tmp_path / "empty" / "config.json").write_text("{}")
    _, cfg = launch_config(app, "model='empty'")
    assert cfg.model == str(tmp_path / "empty")  # absolute: Flower runs the apps elsewhere
    (tmp_path / "tiny").mkdir()  # a folder named like a built-in model is not taken for it
    assert launch_config(app, "model='tiny'")[1].model == "tiny"


def test_a_launcher_leaves_absolute_and_home_paths_as_typed(tmp_path, monkeypatch):
    # A run resumes only with the same strings: ~ is not expanded, nothing is resolved.
    app = Path(__file__).parents[2]
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "corpus.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "corpus.jsonl")
    assert launch_config(app, "data='~/corpus.jsonl'")[1].data == "~/corpus.jsonl"
    linked = str(tmp_path / "link.jsonl")
    assert launch_config(app, f"data='{linked}'")[1].data == linked


def _private_flower(tmp_path: Path) -> dict[str, str]:
    env = flower_env(tmp_path / "flwr-home")
    env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(free_port())
    env["FLWR_LOCAL_CONTROL_API_PORT"] = str(free_port())
    return env


def test_the_local_superlink_is_started_once_with_time_to_come_up(tmp_path):
    env = _private_flower(tmp_path)
    home = Path(env["FLWR_HOME"])
    try:
        assert start_local_superlink(env) is True
        assert local_superlink_running(env)
        (superlink,) = find_local_superlinks(home)  # where `flwr run` and `flwr stop` look
        assert start_local_superlink(env) is False  # running: `flwr run` will use this one
        assert find_local_superlinks(home) == [superlink]
    finally:
        stop_processes(find_local_superlinks(home))
    assert not local_superlink_running(env)


def test_a_local_superlink_that_does_not_come_up_in_time_is_an_error_and_is_not_left(tmp_path):
    env = _private_flower(tmp_path)
    with pytest.raises(CollmError, match=r"could not start the local SuperLink: .*within 0s") as e:
        start_local_superlink(env, timeout_s=0.001)
    assert e.value.exit_code == 1  # the work failed, not its input
    assert find_local_superlinks(Path(env["FLWR_HOME"])) == []


def test_the_wrapper_stops_the_local_superlink_it_started_and_no_other(tmp_path):
    """One running before the block (here: one that does not answer its health check, as a
    SuperLink too busy to answer in time) is someone else's: it was stopped too, by its command
    line under the same FLWR_HOME."""
    env = _private_flower(tmp_path)  # (nothing answers on its HTTP port)
    fake = tmp_path / "bin" / "flower-superlink"  # a SuperLink as find_local_superlinks sees one
    fake.parent.mkdir()
    fake.write_text("import time\nprint('up', flush=True)\ntime.sleep(600)\n")
    database = Path(env["FLWR_HOME"]) / "local-superlink" / "state.db"

    def superlink() -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, str(fake), "--database", str(database)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None and proc.stdout.readline() == "up\n"  # (running now)
        return proc

    someone_elses = superlink()
    procs = [someone_elses]
    try:
        with managed_local_superlink(env):
            procs.append(superlink())  # as start_local_superlink or `flwr run` starts one
        assert procs[1].wait(timeout=30) is not None
        assert someone_elses.poll() is None
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


_CONNECTIONS = """[superlink]
default = "{default}"

[superlink.local]
address = ":local:"

[superlink.memory]
address = ":local-in-memory:"

[superlink.site]
address = "10.0.0.7:9093"
insecure = true
"""


def _flower_config(tmp_path: Path, monkeypatch, default: str) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    (tmp_path / "flwr-home").mkdir(parents=True)
    (tmp_path / "flwr-home" / "config.toml").write_text(_CONNECTIONS.format(default=default))


def test_the_federation_runs_on_the_default_connection_when_it_is_the_local_superlink(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    conn = local_connection()  # no configuration yet: Flower writes its own, local by default
    assert (conn.name, conn.in_memory) == ("local", False)
    assert (tmp_path / "flwr-home" / "config.toml").is_file()
    _flower_config(tmp_path / "other", monkeypatch, default="memory")
    assert local_connection() == local_connection("memory")
    assert local_connection().in_memory
    assert local_connection("local").in_memory is False


def test_a_remote_or_unknown_connection_is_refused_before_anything_starts(tmp_path, monkeypatch):
    _flower_config(tmp_path, monkeypatch, default="site")
    with pytest.raises(ConfigError, match=r"'site' \(the default\) is 10\.0\.0\.7:9093, not"):
        local_connection()
    with pytest.raises(ConfigError, match=r"flwr run <app> site --stream"):
        local_connection("site")
    assert local_connection("local").name == "local"  # a local one named on the command line
    with pytest.raises(ConfigError, match=r"connection 'lab' not found"):
        local_connection("lab")


def test_a_bad_connection_is_refused_before_the_run_config_is_checked(tmp_path, monkeypatch):
    # Checking the run config loads torch (seconds); a remote connection is refused first.
    import collm_fl.federate as federate

    def no_run_config(*args, **kwargs):
        raise AssertionError("the run config was checked before the connection")

    _flower_config(tmp_path, monkeypatch, default="site")
    monkeypatch.setattr(federate, "launch_config", no_run_config)
    app = tmp_path / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text("")
    with pytest.raises(ConfigError, match=r"'site' \(the default\) is 10\.0\.0\.7:9093"):
        federate.run_local_federation(app, 2, "")


def test_an_unreadable_flower_configuration_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    (tmp_path / "config.toml").write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(ConfigError, match="Flower configuration"):
        local_connection()
    (tmp_path / "config.toml").unlink()
    (tmp_path / "config.toml").mkdir()  # a folder where the file should be
    with pytest.raises(ConfigError, match="cannot read the Flower configuration"):
        local_connection()
