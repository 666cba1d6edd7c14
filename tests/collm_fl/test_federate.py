"""The local federation wrapper: what it refuses up front, and the exit code it gives a run."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from collm_fl.config import RunConfig
from collm_fl.errors import ConfigError
from collm_fl.federate import check_node_counts, run_outcome
from collm_fl.store import RunInfo, VersionStore
from server_app.federation import run_key


@pytest.mark.parametrize("key", ["min-train-nodes", "min-good-replies"])
def test_a_federation_that_could_never_aggregate_is_refused(key):
    cfg = RunConfig.from_flower({key: 3})
    with pytest.raises(ConfigError, match=f"{key}=3 but --supernodes 2"):
        check_node_counts(cfg, 2, "--supernodes")
    check_node_counts(cfg, 3, "--supernodes")


def test_a_run_that_did_not_finish_is_a_failed_command(tmp_path):
    cfg = RunConfig(output_dir=str(tmp_path), run_name="r")
    assert run_outcome(cfg, 0) == 1  # nothing recorded: the ServerApp never got to its store
    with VersionStore(tmp_path) as store:
        run = store.open_run("r", {}, "tiny")
    assert run_outcome(cfg, 0) == 1  # still "running": it crashed
    with VersionStore(tmp_path) as store:
        store.set_run_status(run.id, "failed")
    assert run_outcome(cfg, 0) == 1
    with VersionStore(tmp_path) as store:
        store.set_run_status(run.id, "finished")
    assert run_outcome(cfg, 0) == 0
    assert run_outcome(cfg, 3) == 3  # flwr's own failure stands


def test_a_new_run_of_the_same_name_gets_its_own_key_on_the_replicas(tmp_path):
    def run(created: datetime) -> RunInfo:
        return RunInfo(1, "default", "tiny", "running", created, {})

    first = run(datetime(2026, 11, 29, 14, 0, 0, 123456, tzinfo=UTC))
    assert run_key(first) == "default.20261129T140000123456"
    assert run_key(run(datetime(2026, 11, 29, 15, 0, tzinfo=UTC))) != run_key(first)
    with VersionStore(tmp_path) as store:  # a resumed run keeps its key
        opened = store.open_run("default", {}, "tiny")
    with VersionStore(tmp_path) as store:
        assert run_key(store.open_run("default", {}, "tiny")) == run_key(opened)


def test_a_store_url_whose_database_cannot_be_loaded_is_refused():
    with pytest.raises(ConfigError, match="store-url='bogus://x': not a usable SQLAlchemy"):
        RunConfig.from_flower({"store-url": "bogus://x"})
