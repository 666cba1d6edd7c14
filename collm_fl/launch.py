"""A whole CoLLM-FL site on one machine, on Flower's deployment engine: start, run, stop.

Starts, on loopback ports: a ``flower-superlink``; one ``collm replica`` per replica node, each
beside a ``flower-supernode`` whose ``node_config`` points at it (``replica-address``); optional
device supernodes that train in-process. ``flwr run`` then drives the federation through a
connection written into a private ``FLWR_HOME``. Every process this starts, it stops by pid.

Across machines the same pieces run on different hosts: see docs/deployment.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

import httpx
import psutil

from collm_fl.errors import ConfigError, WorkFailed
from collm_fl.flower_app import check_stage_dest, stage_app

if TYPE_CHECKING:
    from collm_fl.config import RunConfig

log = logging.getLogger(__name__)

CONNECTION = "collm-local"


def dies_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel SIGTERM the child when this process dies, however it
    dies (SIGKILL, the OOM killer): its ``with`` blocks stop everything only when it can run them.
    Linux only; and only from the main thread (the signal follows the thread that forked, and a
    worker thread that ends would take the process down with it)."""
    if (
        not sys.platform.startswith("linux")
        or threading.current_thread() is not threading.main_thread()
    ):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # loaded here: the child only calls it
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    parent = os.getpid()

    def set_death_signal() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the launcher died between the fork and the prctl
            os.kill(os.getpid(), signal.SIGTERM)

    return set_death_signal


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def descendants(pid: int) -> list[psutil.Process]:
    """Every process ``pid`` started, and theirs (none when it is gone)."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def process_group(pgid: int) -> list[psutil.Process]:
    """The processes in group ``pgid`` (none when no process leads one of that id)."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if proc.pid != os.getpid() and os.getpgid(proc.pid) == pgid:
                found.append(proc)
    return found


def _union(*groups: list[psutil.Process]) -> list[psutil.Process]:
    return list({p.pid: p for group in groups for p in group}.values())


def terminate_all(procs: list[psutil.Process], timeout: float = 5.0) -> None:
    """SIGTERM every one of ``procs`` still running, SIGKILL what is left after ``timeout``.

    A process's children do not always end with it: a SuperNode's ClientApp blocked pushing its
    reply to the SuperNode that is gone retries forever (Flower's parent monitor raises SIGINT,
    which its retry loop does not end), a SuperLink's simulation and Ray workers outlive it.
    """
    alive = [p for p in procs if p.is_running()]
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, left = psutil.wait_procs(alive, timeout=timeout)
    for proc in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(left, timeout=5.0)


class LaunchError(WorkFailed):
    """A process of the local federation failed to start (its log is named)."""


# Ports handed out by free_port: a port is found free by binding and closing a socket, and the
# process it is for binds it only later, so the kernel could hand it out again meanwhile.
_HANDED_OUT: deque[int] = deque(maxlen=4096)
_HANDED_OUT_LOCK = threading.Lock()


def check_ports_free(*listeners: tuple[str, str, int]) -> None:
    """Each ``(flag, host, port)`` can be listened on now, and no two overlap (the same port on the
    same host, or on a wildcard host such as ``0.0.0.0`` and another of its family): a server
    checks this before it loads anything (ConfigError naming the flag, exit 2)."""
    seen: dict[int, list[tuple[str, str]]] = {}
    with contextlib.ExitStack() as held:  # all listening at once, as the server's will be
        for flag, host, port in listeners:
            if not 0 <= port <= 65535:  # (socket's own error is an OverflowError traceback)
                raise ConfigError(f"{flag}: port must be in 0..65535, got {port}")
            for other_flag, other_host in seen.get(port, []):
                if host == other_host:
                    raise ConfigError(f"{flag} and {other_flag} are both {host}:{port}")
                wildcard = _covering(host, other_host) or _covering(other_host, host)
                if wildcard is not None:
                    raise ConfigError(
                        f"{flag} ({host}:{port}) and {other_flag} ({other_host}:{port}) overlap: "
                        f"'{wildcard}' listens on every address"
                    )
            seen.setdefault(port, []).append((flag, host))
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            try:
                s = held.enter_context(socket.socket(family, socket.SOCK_STREAM))
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
                s.bind((host, port))
                s.listen(1)
            except OSError as e:
                raise ConfigError(
                    f"{flag}: cannot listen on {host}:{port}: {e.strerror or e}"
                ) from e


def _covering(wildcard: str, host: str) -> str | None:
    """``wildcard`` if it is a wildcard address that also listens on ``host``, else None ('::'
    is dual-stack, as Linux binds it by default; '0.0.0.0' covers IPv4 addresses only)."""
    if wildcard in ("", "::") or (wildcard == "0.0.0.0" and ":" not in host):
        return wildcard
    return None


PORT_RANGE_ENV = "COLLM_PORT_RANGE"  # LOW-HIGH: free_port() hands out ports from there only


def port_range() -> tuple[int, int] | None:
    """``$COLLM_PORT_RANGE`` as (low, high), None when unset (the system's ephemeral ports).
    Processes given disjoint ranges never take each other's ports, not even one just freed."""
    raw = os.environ.get(PORT_RANGE_ENV, "").strip()
    if not raw:
        return None
    try:
        low, high = (int(x) for x in raw.split("-"))
    except ValueError:
        low = high = -1
    if not 1024 <= low <= high <= 65535:
        raise ConfigError(f"${PORT_RANGE_ENV} must be LOW-HIGH within 1024-65535, got {raw!r}")
    return low, high


def free_port() -> int:
    """A free loopback TCP port (from ``$COLLM_PORT_RANGE`` when set), one this process has not
    handed out recently; when every free one it found has been, the one handed out longest ago
    (a narrow range runs out of fresh ports, not of free ones)."""
    span = port_range()
    if span is None:
        tries: list[int] = [0] * 1000  # (the kernel's pick)
    elif span[1] - span[0] < 1000:
        tries = list(range(span[0], span[1] + 1))  # every one, in a random order
        secrets.SystemRandom().shuffle(tries)
    else:
        tries = [secrets.choice(range(span[0], span[1] + 1)) for _ in range(1000)]
    with _HANDED_OUT_LOCK:
        handed_out_free: set[int] = set()
        for wanted in tries:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", wanted))
                except OSError:  # taken
                    continue
                port = int(s.getsockname()[1])
            if port not in _HANDED_OUT:
                _HANDED_OUT.append(port)
                return port
            handed_out_free.add(port)
        if handed_out_free:
            port = next(p for p in _HANDED_OUT if p in handed_out_free)  # (oldest first)
            _HANDED_OUT.remove(port)
            _HANDED_OUT.append(port)
            return port
    raise LaunchError("no free loopback port found")


def executable(name: str) -> str:
    beside = Path(sys.executable).with_name(name)  # the venv's own entry points first
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise ConfigError(f"{name} not found: is the project installed (pip install -e .)?")
    return found


@dataclass
class ManagedProcess:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    _log: IO[bytes]

    def alive(self) -> bool:
        return self.popen.poll() is None

    _left: list[psutil.Process] = field(default_factory=list)  # its children when signalled

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, SIGKILL after ``timeout``; then the processes it started that outlived it
        (also when it had died already: see :meth:`_orphans`)."""
        self.signal_stop()
        self.finish_stop(time.monotonic() + timeout)

    def signal_stop(self) -> None:
        """The first half of :meth:`stop`: SIGTERM (several processes stop at once when each is
        signalled before any is waited for)."""
        if self.alive():
            self._left = descendants(self.popen.pid)
            self.popen.terminate()

    def finish_stop(self, deadline: float) -> None:
        """The second half of :meth:`stop`: wait until ``deadline`` (time.monotonic), then
        SIGKILL; then stop what it started that outlived it."""
        if self.alive():
            try:
                self.popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored SIGTERM; killing it", self.name, self.popen.pid)
                self.popen.kill()
                self.popen.wait()
        terminate_all(_union(self._left, self._orphans()))
        self._log.close()

    def kill(self) -> None:
        """SIGKILL, no grace period (when there is no time to wait for a clean stop)."""
        left = self._left
        if self.alive():
            left = _union(left, descendants(self.popen.pid))
            self.popen.kill()
            self.popen.wait()
        terminate_all(_union(left, self._orphans()), timeout=0.0)
        self._log.close()

    def _orphans(self) -> list[psutil.Process]:
        """What is left of the process group it led (started in a session of its own): once it
        has died, its children are another process's and out of :func:`descendants`' reach (a
        SuperNode killed mid-round leaves its SuperExec and ClientApp running)."""
        if self.popen.poll() is not None and psutil.pid_exists(self.popen.pid):
            return []  # (its id is another process's now, and so is a group of that id)
        return process_group(self.popen.pid)

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@dataclass
class ReplicaNode:
    index: int
    api_url: str  # the replica's OpenAI-compatible base URL
    control_address: str
    process: ManagedProcess
    supernode: ManagedProcess | None = None


@dataclass
class LocalFederation:
    """:meth:`start`, drive with :meth:`flwr_run`, always :meth:`stop` (or use ``with``)."""

    workdir: Path
    num_replicas: int = 2
    num_devices: int = 0
    model: str = "tiny"
    replica_args: tuple[str, ...] = ()  # extra ``collm replica`` flags (SLOs, shares, ...)
    api_key: str | None = None
    control_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    processes: list[ManagedProcess] = field(default_factory=list)
    replicas: list[ReplicaNode] = field(default_factory=list)
    superlink_port: int = 0
    with_flower: bool = True  # False: replicas only (benchmarks that drive them directly)

    def __enter__(self) -> LocalFederation:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    @property
    def num_nodes(self) -> int:
        return self.num_replicas + self.num_devices

    @property
    def flwr_home(self) -> Path:
        return self.workdir / "flwr-home"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["FLWR_HOME"] = str(self.flwr_home)
        env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
        env["COLLM_CONTROL_TOKEN"] = self.control_token
        # One key for the whole local stack (replicas, and the gateway's calls to them), or none:
        # a stray key in the caller's environment would lock out the stack's own clients.
        for name in ("COLLM_API_KEY", "COLLM_REPLICA_API_KEY"):
            if self.api_key:
                env[name] = self.api_key
            else:
                env.pop(name, None)
        return env

    def start(self, timeout: float = 180.0) -> None:
        if self.num_nodes < 1:
            raise ConfigError("a federation needs at least one replica or device node")
        if self.with_flower:  # (refused only at `flwr run`, it cost every process's start-up)
            check_stage_dest(self.workdir / "flower-app")
        self.workdir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        try:
            # Everything starts at once, and is waited for after: the replicas load their model
            # and data while the SuperLink starts and the SuperNodes join it (a SuperNode calls
            # its replica only when a run sends it a message, after this start).
            if self.with_flower:
                superlink = self._start_superlink()
            for i in range(self.num_replicas):
                self._start_replica(i)
            if self.with_flower:
                wait_http(f"http://127.0.0.1:{self.superlink_port}/health", superlink, timeout)
                started_nodes = [self._start_supernode(i) for i in range(self.num_nodes)]
            if self.replicas:  # (loading a model takes a while: say what is being waited for)
                log.info(
                    "waiting for %d replica(s) of %s to load (logs in %s)",
                    len(self.replicas),
                    self.model,
                    self.workdir,
                )
            for node in self.replicas:
                wait_http(f"{node.api_url}/health", node.process, timeout)
                log.info(
                    "replica%d ready at %s (%.0f s)",
                    node.index,
                    node.api_url,
                    time.monotonic() - started,
                )
            if self.with_flower:
                # One that failed to start fails the start, not the run ("exited mid-run").
                deadline = time.monotonic() + timeout
                for i, proc in enumerate(started_nodes):
                    node_id = self._joined(i, proc, deadline)
                    log.info("supernode%d joined the SuperLink as node %s", i, node_id)
                self._write_flwr_config()
        except BaseException:
            self.stop()
            raise
        where = f"SuperLink 127.0.0.1:{self.superlink_port}" if self.with_flower else "no Flower"
        log.info(
            "local site up: %s, %d replica node(s), %d device node(s)",
            where,
            self.num_replicas,
            self.num_devices,
        )

    def stop(self, timeout: float = 20.0) -> None:
        """Stop every process: all but the SuperLink at once (each SuperNode says goodbye to
        it as it leaves), then the SuperLink; each SIGKILLed ``timeout`` after its SIGTERM.
        Interrupted meanwhile (a second Ctrl-C), kill the rest at once rather than leave them
        running."""
        pending = list(reversed(self.processes))
        self.processes.clear()
        if pending:
            log.info("stopping %s", ", ".join(f"{p.name} (pid {p.popen.pid})" for p in pending))
        waves = [
            [p for p in pending if p.name != "superlink"],
            [p for p in pending if p.name == "superlink"],
        ]
        try:
            for wave in waves:
                for proc in wave:
                    proc.signal_stop()
                deadline = time.monotonic() + timeout
                for proc in wave:
                    proc.finish_stop(deadline)
                    pending.remove(proc)
        except BaseException:
            for proc in pending:
                proc.kill()
            raise

    def flwr_run_command(self, run_config: str, app: Path) -> list[str]:
        """``flwr run`` of the app at ``app``, copied first to ``<workdir>/flower-app`` (see
        :mod:`collm_fl.flower_app`: the same FAB, without walking a virtual environment)."""
        staged = stage_app(app, self.workdir / "flower-app")
        cmd = [executable("flwr"), "run", str(staged), CONNECTION, "--stream"]
        if run_config:
            cmd += ["--run-config", run_config]
        return cmd

    def flwr_run(
        self, run_config: str, app: Path, timeout: float | None = None, min_nodes: int = 1
    ) -> int:
        """Run the Flower app on this federation, streaming its logs; returns flwr's exit code.

        A process whose end the run cannot finish without (:meth:`broken`: the SuperLink, or
        SuperNodes down to fewer than ``min_nodes``, the run's ``min-train-nodes``) stops it,
        WorkFailed naming the process: Flower would wait for the nodes for ever. A replica that
        exits is logged; its node fails its rounds and the others go on. Past ``timeout``,
        subprocess.TimeoutExpired.
        """
        cmd = self.flwr_run_command(run_config, app)
        log.info("running: %s", shlex.join(cmd))
        proc = subprocess.Popen(cmd, env=self.env(), preexec_fn=dies_with_parent())
        deadline = None if timeout is None else time.monotonic() + timeout
        lost: list[str] = []
        try:
            while True:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    return proc.wait(timeout=1.0)
                before = len(lost)
                fatal = self.check(min_nodes, lost)
                if fatal is not None:
                    raise WorkFailed(fatal)
                for gone in lost[before:]:
                    log.warning("%s; the federation goes on without it", gone)
                if deadline is not None and time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired(cmd, timeout or 0.0)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def check(self, min_nodes: int, lost: list[str]) -> str | None:
        """:meth:`broken`'s answer; when the federation can go on, each process that exited and
        is not yet in ``lost`` is appended to it (the caller says so once)."""
        fatal = self.broken(min_nodes)
        if fatal is None:
            lost.extend(g for g in self.exited() if g not in lost)
        return fatal

    def exited(self) -> list[str]:
        """Each process of the federation that has exited: "replica1 exited (code -9) mid-run;
        its log: ..."."""
        return [self._ended(p) for p in self.processes if not p.alive()]

    def broken(self, min_nodes: int) -> str | None:
        """Why the federation cannot finish, if it cannot: the SuperLink or the gateway has exited
        (every node's, every request's way), or fewer than ``min_nodes`` SuperNodes run (Flower
        waits for ``min-train-nodes`` for ever). A replica alone does not break it: its node
        fails its rounds, the gateway routes around it."""
        gone = {p.name: p for p in self.processes if not p.alive()}
        for name in ("superlink", "gateway"):
            if name in gone:
                return self._ended(gone[name])
        supernodes = [p for p in self.processes if p.name.startswith("supernode")]
        running = [p for p in supernodes if p.alive()]
        if supernodes and len(running) < min_nodes:
            first = next(p for p in supernodes if not p.alive())
            return (
                f"{self._ended(first)}; {len(running)} SuperNode(s) left, fewer than the run's "
                f"min-train-nodes={min_nodes}"
            )
        return None

    @staticmethod
    def _ended(proc: ManagedProcess) -> str:
        code = proc.popen.returncode
        return f"{proc.name} exited (code {code}) mid-run; its log: {proc.log_path}"

    def start_gateway(
        self,
        urls: list[str] | None = None,
        ttft_slo_s: float | None = None,
        tpot_slo_s: float | None = None,
        timeout: float = 60.0,
        shed_factor: float = 0.0,
    ) -> tuple[str, ManagedProcess]:
        """Start ``collm gateway`` in front of ``urls`` (default: every replica); (URL, process).

        ``shed_factor`` > 0 turns on the gateway's admission control (``--shed-factor``).
        """
        port = free_port()
        cmd = [executable("collm"), "gateway", "--port", str(port)]
        for url in urls if urls is not None else [n.api_url for n in self.replicas]:
            cmd += ["--replica", url]
        if ttft_slo_s is not None:
            cmd += ["--ttft-slo", repr(ttft_slo_s)]
        if tpot_slo_s is not None:
            cmd += ["--tpot-slo", repr(tpot_slo_s)]
        if shed_factor:
            cmd += ["--shed-factor", repr(shed_factor)]
        proc = self.spawn("gateway", cmd)
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/health", proc, timeout)
        return base, proc

    # ---- pieces ----

    def spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> ManagedProcess:
        """Start ``cmd`` as ``name`` (its log: ``<workdir>/<name>.log``), with :meth:`env` and
        ``env``."""
        log_path = self.workdir / f"{name}.log"
        handle = open(log_path, "wb")  # noqa: SIM115 - owned by the ManagedProcess
        popen = subprocess.Popen(
            cmd,
            env={**self.env(), **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            preexec_fn=dies_with_parent(),
            # Its own session: a Ctrl-C at the terminal reaches the launcher alone, which stops
            # each process with what it started (a process that ended on the signal by itself
            # would leave its children, e.g. a SuperNode's ClientApp, behind).
            start_new_session=True,
        )
        proc = ManagedProcess(name, popen, log_path, handle)
        self.processes.append(proc)
        log.debug("started %s (pid %d): %s", name, popen.pid, shlex.join(cmd))
        return proc

    def _start_superlink(self) -> ManagedProcess:
        self.superlink_port = free_port()
        return self.spawn(
            "superlink",
            [
                executable("flower-superlink"),
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.superlink_port),
                "--database",
                str(self.workdir / "superlink.db"),
            ],
        )

    def _start_replica(self, i: int) -> None:
        port, control_port = free_port(), free_port()
        cmd = replica_command(
            self.model,
            port,
            control_port,
            self.workdir / f"replica{i}-store",
            i,
            self.num_nodes,
            self.replica_args,
        )
        proc = self.spawn(f"replica{i}", cmd)
        url = f"http://127.0.0.1:{port}"
        self.replicas.append(ReplicaNode(i, url, f"127.0.0.1:{control_port}", proc))

    def _joined(self, i: int, proc: ManagedProcess, deadline: float) -> str:
        """SuperNode ``i``'s node id once it has joined; started again once on another port if
        it lost its Runtime API port (found free, taken by another process before it bound)."""
        try:
            return wait_joined(proc, max(0.0, deadline - time.monotonic()))
        except LaunchError:
            if proc.alive() or "address already in use" not in proc.tail():
                raise
        log.warning("supernode%d lost its port to another process; starting it again", i)
        self.processes.remove(proc)
        proc.stop()
        return wait_joined(self._start_supernode(i), max(0.0, deadline - time.monotonic()))

    def _start_supernode(self, i: int) -> ManagedProcess:
        node_config = f"partition-id={i} num-partitions={self.num_nodes}"
        if i < self.num_replicas:
            node_config += f" replica-address='{self.replicas[i].control_address}'"
        proc = self.spawn(
            f"supernode{i}",
            [
                executable("flower-supernode"),
                "--insecure",
                "--superlink",
                f"127.0.0.1:{self.superlink_port}",
                "--port",
                str(free_port()),
                "--node-config",
                node_config,
            ],
            env=supernode_log_level(),
        )
        if i < self.num_replicas:
            self.replicas[i].supernode = proc
        return proc

    def _write_flwr_config(self) -> None:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{self.superlink_port}"\n'
            "insecure = true\n"
        )


def replica_flags(cfg: RunConfig) -> tuple[str, ...]:
    """The ``collm replica`` flags that make a local replica train as the run config says: its
    data and split (the same partitions and central held-out part as the server and devices),
    sequence length, batch size, LoRA shape, device and quantization; and serve to its SLOs
    (those the allocation judges the replicas' latencies by)."""
    return (
        *("--ttft-slo", str(cfg.ttft_slo_s), "--tpot-slo", str(cfg.tpot_slo_s)),
        *("--data", cfg.data, "--partitioning", cfg.partitioning),
        *("--dirichlet-alpha", str(cfg.dirichlet_alpha)),
        *("--central-heldout", str(cfg.central_heldout)),
        *("--max-samples-per-client", str(cfg.max_samples_per_client), "--seed", str(cfg.seed)),
        *("--seq-len", str(cfg.seq_len), "--train-batch-size", str(cfg.batch_size)),
        *("--lora-rank", str(cfg.lora.rank), "--lora-alpha", str(cfg.lora.alpha)),
        *("--lora-targets", ",".join(cfg.lora.target_modules)),
        *("--lora-dropout", str(cfg.lora.dropout)),
        *("--device", cfg.device, "--quantization", cfg.quantization),
    )


def replica_command(
    model: str,
    port: int,
    control_port: int,
    store_dir: Path,
    partition_id: int,
    num_partitions: int,
    extra: Sequence[str] = (),
) -> list[str]:
    """The ``collm replica`` command line of a local replica (``extra``: more flags)."""
    return [
        executable("collm"),
        "replica",
        "--model",
        model,
        "--port",
        str(port),
        "--control-port",
        str(control_port),
        "--store-dir",
        str(store_dir),
        "--partition-id",
        str(partition_id),
        "--num-partitions",
        str(num_partitions),
        *extra,
    ]


def supernode_log_level() -> dict[str, str]:
    """``FLWR_LOG_LEVEL`` for a SuperNode: at INFO at least (it then logs the node id it joined
    as, which the start waits for); a caller's DEBUG stays."""
    level = os.environ.get("FLWR_LOG_LEVEL", "").strip().upper()
    return {} if level in ("", "DEBUG", "INFO") else {"FLWR_LOG_LEVEL": "INFO"}


# What flower-supernode (flwr 1.42, pinned) logs once the SuperLink has registered it.
SUPERNODE_JOINED = re.compile(r"SuperNode ID: (\d+)")


def wait_joined(proc: ManagedProcess, timeout: float) -> str:
    """Wait for a SuperNode to register with its SuperLink; its node id. Fails early, with its
    log, if it exits first (its Runtime API port taken, the SuperLink refusing it)."""
    deadline = time.monotonic() + timeout
    while True:
        match = SUPERNODE_JOINED.search(proc.tail(chars=1_000_000))
        if match:
            return match.group(1)
        if not proc.alive():
            raise LaunchError(
                f"{proc.name} exited (code {proc.popen.returncode}) before it joined the "
                f"SuperLink; its log, {proc.log_path}:\n{proc.tail()}"
            )
        if time.monotonic() > deadline:
            raise LaunchError(
                f"{proc.name} did not join the SuperLink in {timeout:.0f}s; its log, "
                f"{proc.log_path}:\n{proc.tail()}"
            )
        time.sleep(0.25)  # polling another process's log; nothing to wait on here


def wait_http(url: str, proc: ManagedProcess, timeout: float) -> None:
    """Poll ``url`` until it answers 200; fail early with the log if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise LaunchError(f"{proc.name} exited (code {proc.popen.returncode}):\n{proc.tail()}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)  # polling another process's readiness; nothing to wait on here
    raise LaunchError(f"{proc.name} not ready at {url} after {timeout:.0f}s:\n{proc.tail()}")
