"""Run the Flower app on a local simulation SuperLink, and stop that SuperLink afterwards.

``flwr run .`` starts a detached local SuperLink on first use and leaves it running. This wrapper
sets the environment the project needs (no per-run dependency install: it would pull a CUDA
torch), runs ``flwr run --stream``, and stops the SuperLink by its process id if this call started
it. Plain ``flwr run`` keeps working; this is the managed one-machine path.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import click
import httpx
import psutil
from sqlalchemy.exc import SQLAlchemyError

from collm_fl.config import RunConfig, Scalar, format_overrides, parse_overrides
from collm_fl.errors import CollmError, ConfigError, WorkFailed
from collm_fl.flower_app import stage_app
from collm_fl.launch import descendants, terminate_all

log = logging.getLogger(__name__)

NO_RUNTIME_INSTALL = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
DEFAULT_HTTP_PORT = "39091"
# How long the local SuperLink may take to come up. `flwr run` allows it 15 s, which a loaded
# two-core machine can exceed ("Failed to start local SuperLink within 15s"); started here first,
# `flwr run` finds it running.
SUPERLINK_START_TIMEOUT_S = 120.0
# Flower's own starter (flwr==1.42, pinned), with the allowance above: same command, database and
# log file as `flwr run` would use, so `flwr run` and `flwr stop` treat it as theirs.
_START_SUPERLINK = """
import sys, click, flwr.cli.local_superlink as s
s.LOCAL_SUPERLINK_STARTUP_TIMEOUT = float(sys.argv[1])
try:
    s._start_local_superlink(in_memory=sys.argv[2] == "in-memory")
except click.ClickException as e:
    sys.exit(e.format_message())
"""


def flower_env(flwr_home: Path | None = None) -> dict[str, str]:
    """The environment ``flwr`` commands need for this project."""
    env = dict(os.environ)
    env.update(NO_RUNTIME_INSTALL)
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def flwr_home_of(env: Mapping[str, str]) -> Path:
    """The Flower home ``flwr`` uses in ``env`` (FLWR_HOME, else ~/.flwr)."""
    return Path(env.get("FLWR_HOME", Path.home() / ".flwr"))


def local_superlink_running(env: dict[str, str]) -> bool:
    port = env.get("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", DEFAULT_HTTP_PORT)
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5).is_success
    except httpx.HTTPError:
        return False


def start_local_superlink(
    env: Mapping[str, str], timeout_s: float = SUPERLINK_START_TIMEOUT_S, in_memory: bool = False
) -> bool:
    """Start the local SuperLink ``flwr run`` uses for a simulation (at ``env``'s FLWR_HOME and
    ports; with no database when ``in_memory``, as for a ``:local-in-memory:`` connection) unless
    one answers, and wait up to ``timeout_s`` for it. Returns whether it started one; WorkFailed
    (exit 1, with Flower's message) when it did not come up."""
    if local_superlink_running(dict(env)):
        return False
    store = "in-memory" if in_memory else "database"
    cmd = [sys.executable, "-c", _START_SUPERLINK, str(timeout_s), store]
    earlier = set(find_local_superlinks(flwr_home_of(env)))
    try:
        done = subprocess.run(
            cmd, env=dict(env), capture_output=True, text=True, timeout=timeout_s + 30
        )
    except subprocess.TimeoutExpired as e:  # (its SuperLink runs in a session of its own)
        stop_processes(started_since(flwr_home_of(env), earlier))
        raise WorkFailed(f"the local SuperLink did not start within {timeout_s:g}s") from e
    if done.returncode != 0:
        why = " ".join((done.stderr or done.stdout).split())[-600:]  # (the last of a traceback)
        raise WorkFailed(f"could not start the local SuperLink: {why}")
    log.info("local SuperLink started (FLWR_HOME %s)", env.get("FLWR_HOME", "~/.flwr"))
    return True


@dataclass(frozen=True)
class LocalConnection:
    """A SuperLink connection of the Flower configuration that names the local simulation
    SuperLink (address ``:local:``, or ``:local-in-memory:`` for one without a database)."""

    name: str
    in_memory: bool


def local_connection(name: str | None = None) -> LocalConnection:
    """The connection ``collm federate`` submits to: ``name``, else the default one of this
    process's Flower configuration (``$FLWR_HOME/config.toml``, which Flower creates with a local
    default on first use). ConfigError when it does not exist or is not the local SuperLink: this
    command runs a simulation on this machine, and a remote SuperLink is ``flwr run``'s to use."""
    from flwr.cli.constant import (
        LOCAL_SUPERLINK_ADDRESS_MAGIC_VALUE,
        LOCAL_SUPERLINK_ADDRESS_MAGIC_VALUE_IN_MEMORY,
    )
    from flwr.cli.flower_config import read_superlink_connection

    try:
        conn = read_superlink_connection(name)
    except click.ClickException as e:
        raise ConfigError(" ".join(e.format_message().split())) from e
    except click.exceptions.Exit as e:  # (an outdated address, after Flower's own message)
        raise ConfigError("the Flower configuration needs the update Flower printed") from e
    except (OSError, ValueError) as e:  # not UTF-8, a folder, FLWR_HOME not writable
        raise ConfigError(f"cannot read the Flower configuration: {e}") from e
    local = (LOCAL_SUPERLINK_ADDRESS_MAGIC_VALUE, LOCAL_SUPERLINK_ADDRESS_MAGIC_VALUE_IN_MEMORY)
    if conn.address not in local:
        which = f"'{conn.name}'" if name is not None else f"'{conn.name}' (the default)"
        raise ConfigError(
            f"SuperLink connection {which} is {conn.address}, not the local simulation "
            f"SuperLink ({' or '.join(local)}): collm federate runs the federation on this "
            f"machine; submit to that SuperLink with `flwr run <app> {conn.name} --stream`, or "
            "name a local connection with --connection"
        )
    return LocalConnection(conn.name, conn.address == LOCAL_SUPERLINK_ADDRESS_MAGIC_VALUE_IN_MEMORY)


def find_local_superlinks(flwr_home: Path) -> list[psutil.Process]:
    """SuperLink processes whose files (database, log) live under ``flwr_home`` (the ones
    ``flwr`` starts; an in-memory one has only its log there)."""
    marker = str(flwr_home / "local-superlink")
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if any("flower-superlink" in part for part in cmd[:2]) and any(marker in c for c in cmd):
            found.append(proc)
    return found


def started_since(flwr_home: Path, earlier: set[psutil.Process]) -> list[psutil.Process]:
    """The SuperLinks under ``flwr_home`` that are not among ``earlier`` (a process is its pid
    and its start time: a pid used again is another process)."""
    return [p for p in find_local_superlinks(flwr_home) if p not in earlier]


def stop_processes(procs: list[psutil.Process], timeout: float = 10.0) -> None:
    """Stop ``procs`` and every process they started (a SuperLink's simulation and its Ray
    workers outlive it otherwise): terminate, then kill what is left after ``timeout``."""
    everything: list[psutil.Process] = []
    for proc in procs:
        try:
            log.info("stopping %s (pid %d)", " ".join(proc.cmdline()[:2]), proc.pid)
        except psutil.NoSuchProcess:
            continue
        everything += [proc, *descendants(proc.pid)]
    terminate_all(everything, timeout)


def check_node_counts(cfg: RunConfig, nodes: int, what: str) -> None:
    """Exit 2 up front for a federation that could never aggregate: Flower would wait forever for
    ``min-train-nodes``, and a round can never get ``min-good-replies`` from fewer nodes."""
    for key, value in (
        ("min-train-nodes", cfg.min_train_nodes),
        ("min-good-replies", cfg.min_good_replies),
    ):
        if value > nodes:
            raise ConfigError(f"{key}={value} but {what} {nodes}: no round could ever aggregate")


def run_outcome(
    cfg: RunConfig,
    returncode: int,
    launched_at: datetime,
    log_hint: str = "see the ServerApp's log above",
) -> int:
    """The exit code of a local federation launched at ``launched_at``: 0 only if ``flwr run``
    exited 0 and the store holds a ``run-finished`` event of this run from after the launch
    (``flwr run --stream`` exits 0 even when the ServerApp failed; an earlier attempt's event
    does not count); else 1, the run marked failed if it still shows as running. ``log_hint``
    says where the ServerApp's log is."""
    if returncode != 0:
        how = f"killed by signal {-returncode}" if returncode < 0 else f"exited {returncode}"
        log.error("flwr run %s: the federation did not finish (%s)", how, log_hint)
        mark_failed(cfg, f"flwr run {how}")
        return 1
    from collm_fl.store import RUN_FINISHED, VersionStore

    try:
        with VersionStore(cfg.output_path, cfg.store_url or None) as store:
            run = store.find_run(cfg.run_name)
            finished = [e for e in store.events(run.id, RUN_FINISHED) if e.at >= launched_at]
    except (CollmError, SQLAlchemyError) as e:
        log.error("the federation did not record its run: %s", e)
        return 1
    if not finished:
        log.error("run %r did not finish (%s): %s", run.name, run.status, log_hint)
        mark_failed(cfg, "flwr run ended before the run finished")
        return 1
    return 0


@contextmanager
def failed_if_interrupted(cfg: RunConfig) -> Iterator[None]:
    """Wrap a launcher's federation, outside the processes it starts: a Ctrl-C or SIGTERM kills
    the ServerApp before it can record how the run ended, so the run is marked here (status
    ``failed``, a ``run-failed`` event) instead of showing ``running`` for good."""
    try:
        yield
    except KeyboardInterrupt:
        mark_interrupted(cfg)
        raise


def mark_interrupted(cfg: RunConfig) -> None:
    """Record that the run of ``cfg`` was stopped by its launcher, if it shows as running."""
    mark_failed(cfg, "interrupted: its launcher was stopped (Ctrl-C or SIGTERM)")


def mark_failed(cfg: RunConfig, reason: str) -> None:
    """Mark the run of ``cfg`` failed (status, a ``run-failed`` event with ``reason``) if it
    still shows as running: its ServerApp was stopped before it could record how it ended."""
    from collm_fl.store import RUN_FAILED, VersionStore

    if not cfg.store_url and not (cfg.output_path / "store.db").is_file():
        return  # the ServerApp never opened its store: no run to mark
    try:
        with VersionStore(cfg.output_path, cfg.store_url or None) as store:
            run = store.find_run(cfg.run_name)
            if store.end_run(run.id, "failed", RUN_FAILED, {"error": reason}, only_if="running"):
                log.warning("run %r marked failed: %s", run.name, reason)
    except (CollmError, SQLAlchemyError, OSError) as e:  # no run recorded yet, or no store
        log.debug("nothing to mark failed: %s", e)


@contextmanager
def managed_local_superlink(env: dict[str, str]) -> Iterator[None]:
    """Stop, on exit, the local SuperLink(s) started during the block (by it or by ``flwr run``),
    and only those: one running before it is someone else's, even if it was too slow to answer
    the health check that would have found it."""
    flwr_home = flwr_home_of(env)
    earlier = set(find_local_superlinks(flwr_home))
    try:
        yield
    finally:
        stop_processes(started_since(flwr_home, earlier))


def few_nodes_config(nodes: int) -> dict[str, Scalar]:
    """Run-config for a federation of fewer nodes than the default ``min-train-nodes`` (2, the
    run config's; an app setting more is refused by ``check_node_counts``), which would
    otherwise wait for a node that never comes; {} when there are enough. The user's own
    settings go on top of it."""
    return {"min-train-nodes": nodes} if nodes < RunConfig.min_train_nodes else {}


def launch_config(
    app: Path,
    overrides: str,
    defaults: Mapping[str, Scalar] | None = None,
    fixed: Mapping[str, Scalar] | None = None,
) -> tuple[str, RunConfig]:
    """The ``--run-config`` a launcher passes to ``flwr run``, and the config it means, checked
    before anything starts: ``defaults`` (the launcher's), the user's ``overrides`` on top, then
    ``fixed`` (what the launcher relies on; the user may not set it). Relative ``output-dir``,
    ``data``, ``model`` and SQLite ``store-url`` paths are made absolute here, where the user
    typed them: Flower runs the ServerApp and the ClientApps in other directories."""
    user = parse_overrides(overrides)
    clash = sorted(set(user) & set(fixed or {}))
    if clash:
        flags = {
            "num-server-rounds": "--rounds",
            "local-steps": "--local-steps",
            "model": "--model",
            "ttft-slo-s": "--ttft-slo",
            "tpot-slo-s": "--tpot-slo",
            "output-dir": "--out",
        }
        named = [f"{k} (use {flags[k]})" if k in flags else k for k in clash]
        raise ConfigError(f"{', '.join(named)}: set by this command, not by -c")
    values: dict[str, Scalar] = {**(defaults or {}), **user, **(fixed or {})}
    cfg = RunConfig.from_app(app, values)
    if cfg.store_url and _in_memory(cfg.store_url):
        raise ConfigError(
            f"store-url={cfg.store_url!r}: an in-memory database lives in the process that opens "
            "it, so this command would read the ServerApp's run back from an empty one (and "
            "report it failed): use a file (sqlite:///runs.db) or a database server"
        )
    values["output-dir"] = str(cfg.output_path)
    sqlite = "sqlite:///"
    if cfg.store_url.startswith(sqlite):
        # (sqlite:///x.db is relative to the process's directory, the ServerApp's elsewhere;
        # sqlite:////abs/x.db is absolute)
        values["store-url"] = sqlite + _absolute(cfg.store_url[len(sqlite) :])
    from collm_fl.models import BUILTIN_MODELS  # (torch and transformers: only when launching)

    # Existence is checked here (else the ServerApp fails inside Flower, with a traceback); only a
    # relative path is rewritten: an absolute or ~ one stays as typed (a run is resumed only with
    # the same strings).
    if cfg.data != "shakespeare":
        if not Path(cfg.data).expanduser().exists():
            raise ConfigError(f"data: no such file or folder: {cfg.data}")
        values["data"] = _absolute(cfg.data)
    if cfg.model not in BUILTIN_MODELS:  # (a folder named "tiny" here is not the built-in model)
        model = Path(cfg.model).expanduser()
        if model.exists():  # a local model directory, as from_pretrained reads it
            if not (model / "config.json").is_file():
                raise ConfigError(f"model: {cfg.model} has no config.json")
            values["model"] = _absolute(cfg.model)
        elif cfg.model.startswith((".", "/", "~")):
            raise ConfigError(f"model: no such path: {cfg.model}")
    return format_overrides(values), RunConfig.from_app(app, values)


def _in_memory(store_url: str) -> bool:
    """Whether ``store_url`` (a valid SQLAlchemy URL) is an SQLite database in memory."""
    from sqlalchemy.engine import make_url

    url = make_url(store_url)
    database = url.database or ""  # ("" too is a database in memory)
    return url.get_backend_name() == "sqlite" and (
        not database or ":memory:" in database or "mode=memory" in store_url
    )


def _absolute(path: str) -> str:
    """``path`` with a relative one made absolute where the command runs (no other change)."""
    return path if path.startswith("~") or Path(path).is_absolute() else str(Path.cwd() / path)


def run_local_federation(
    app: Path, supernodes: int, run_config: str, connection: str | None = None
) -> int:
    """``flwr run <app> <connection> --stream`` on a local simulation with ``supernodes``
    clients; ``connection``: a local SuperLink connection of the Flower configuration (default:
    its default connection)."""
    if supernodes < 1:
        raise ConfigError(f"--supernodes must be >= 1, got {supernodes}")
    if not (app / "pyproject.toml").is_file():
        raise ConfigError(f"{app} is not a Flower app (no pyproject.toml)")
    flwr = shutil.which("flwr")
    if flwr is None:
        raise ConfigError(
            "the flwr command is not on PATH: install with pip install 'flwr[simulation]'"
        )
    env = flower_env()
    # A bad setting is exit 2 before Flower starts. The connection is checked first: it is read
    # in a moment, where checking the run config loads torch (seconds).
    conn = local_connection(connection)
    run_config, cfg = launch_config(app, run_config, defaults=few_nodes_config(supernodes))
    check_node_counts(cfg, supernodes, "--supernodes")
    with tempfile.TemporaryDirectory(prefix="collm-app-") as tmp:
        staged = stage_app(app, Path(tmp) / "app")  # the same FAB, without walking a venv
        cmd = [flwr, "run", str(staged), conn.name, "--stream"]
        cmd += ["--federation-config", f"num-supernodes={supernodes}", "--run-config", run_config]
        log.info("running: %s", shlex.join(cmd))
        with failed_if_interrupted(cfg), managed_local_superlink(env):
            start_local_superlink(env, in_memory=conn.in_memory)
            launched = datetime.now(UTC)
            return run_outcome(cfg, subprocess.call(cmd, env=env), launched)
