"""Memory: one co-executing replica process vs a training process plus a serving process.

- co-execution: ``collm replica --model M`` (with training data) serves a stream of requests
  while a training job runs through its control API (``ReplicaClient.train``);
- separate: ``collm replica --model M --data none`` serves the same stream while a training
  process (this module run as ``python -m collm_fl.bench.replica_memory train``: base model +
  PEFT LoRA + ``train_lora``, same data, batch and sequence length) trains the same number of steps.

RSS (psutil, whole process trees) is sampled every ``SAMPLE_S`` while both serving and training
are active; the peak is reported. Latency is not measured here: the co-executing replica runs with
loose SLOs, training share 1 and serving lending it half the core from the job's start
(``--max-lend-share 0.5 --lend-early``), so the stream cannot starve training on a busy machine. An
idle process that only imports the libraries gives the runtime's own share. Every process runs on
loopback ports and is stopped by its pid.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import secrets
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

import httpx
import psutil

from collm_fl.adapters import LoraSpec
from collm_fl.bench.replica_decode import (
    PROMPTS,
    adapter_shapes,
    checkpoint_parameters,
    random_adapter_state,
)
from collm_fl.launch import LaunchError, ManagedProcess, executable, free_port, wait_http
from collm_fl.replica.control_client import ReplicaClient

log = logging.getLogger(__name__)

SAMPLE_S = 0.2  # RSS sampling period
READY_TIMEOUT_S = 300.0
LEARNING_RATE = 1e-4
LOOSE_SLO_S = 600.0
MEMORY_LEND_SHARE = 0.5  # what serving lends the co-executed job (``--max-lend-share``)
TRAIN_DEADLINE_S = 1800.0  # a safety net: the job ends after its steps long before this


class MemoryBenchmark(TypedDict):
    params: int
    param_bytes: int  # the base model's checkpoint size: one copy of the weights
    runtime_rss_bytes: int  # a process that imported torch/transformers/peft/fastapi, no model
    coexec_rss_bytes: int  # peak RSS of the co-executing replica while serving and training
    coexec_loaded_rss_bytes: int  # its RSS after start-up, before serving or training
    serving_rss_bytes: int  # peak RSS of the serving-only replica (separate setup)
    training_rss_bytes: int  # peak RSS of the training-only process (separate setup)
    separate_rss_bytes: int  # serving + training peaks
    separate_over_coexec: float
    saved_bytes: int  # separate - coexec
    saved_over_param_bytes: float  # how many base copies the co-executing replica saves
    train_steps: int
    serving_requests: dict[str, int]  # requests served during each setup's active phase


@dataclass
class _Stack:
    """Every process one setup started, stopped together."""

    workdir: Path
    token: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    procs: list[ManagedProcess] = field(default_factory=list)

    def spawn(self, name: str, cmd: list[str], pipes: bool = False) -> ManagedProcess:
        log_path = self.workdir / f"{name}.log"
        handle = open(log_path, "wb")  # noqa: SIM115 - owned by the ManagedProcess
        env = dict(os.environ, COLLM_CONTROL_TOKEN=self.token)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        popen = subprocess.Popen(
            cmd,
            env=env,
            stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipes else handle,
            stderr=handle,
        )
        proc = ManagedProcess(name, popen, log_path, handle)
        self.procs.append(proc)
        return proc

    def start_replica(self, model: str, train: bool) -> tuple[ManagedProcess, str, ReplicaClient]:
        port, control_port = free_port(), free_port()
        cmd = [executable("collm"), "replica", "--model", model]
        cmd += ["--port", str(port), "--control-port", str(control_port)]
        cmd += ["--store-dir", str(self.workdir / "store"), "--data"]
        cmd += ["shakespeare" if train else "none"]
        # Memory, not latency: loose SLOs, and serving lends training up to half the core — a
        # step gives way to serving at every layer, so under a closed-loop stream that never
        # pauses, a replica lending nothing (the default) would not train at all.
        cmd += ["--ttft-slo", str(LOOSE_SLO_S), "--tpot-slo", str(LOOSE_SLO_S)]
        if train:  # (early: the job's deadline is far off, and late lending would wait for it)
            cmd += ["--max-lend-share", str(MEMORY_LEND_SHARE), "--lend-early"]
        proc = self.spawn("replica", cmd)
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health", proc, READY_TIMEOUT_S)
        return proc, url, ReplicaClient(f"127.0.0.1:{control_port}", self.token, timeout=3600)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


def _read_line(proc: ManagedProcess, expected: str) -> None:
    """Block until the worker writes ``expected`` (its protocol line) on stdout."""
    assert proc.popen.stdout is not None
    for raw in proc.popen.stdout:
        line = raw.decode().strip()
        if line == expected:
            return
        log.debug("%s: %s", proc.name, line)
    raise LaunchError(f"{proc.name} ended before {expected!r}:\n{proc.tail()}")


def rss_bytes(pid: int) -> int:
    """RSS of a process and all its descendants (0 once it is gone)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


class _PeakSampler:
    """Samples the RSS of some pids every SAMPLE_S in a thread; keeps each one's peak."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.peaks = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)

    def __enter__(self) -> _PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            for name, pid in self.pids.items():
                self.peaks[name] = max(self.peaks[name], rss_bytes(pid))
            if self._stop.wait(SAMPLE_S):  # pacing of the sampler, not synchronization
                return


class _ServingLoad:
    """``clients`` threads posting greedy completions to a replica until stopped."""

    def __init__(self, url: str, model: str, clients: int, max_tokens: int) -> None:
        self.url, self.model, self.max_tokens = url, model, max_tokens
        self.completed = 0
        self.first_done = threading.Event()  # serving is warm: one request came back
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, args=(i,), name=f"bench-http-{i}", daemon=True)
            for i in range(clients)
        ]

    def __enter__(self) -> _ServingLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def _client(self, i: int) -> None:
        body = {"model": self.model, "max_tokens": self.max_tokens, "temperature": 0}
        with httpx.Client(base_url=self.url, timeout=600) as http:
            n = 0
            while not self._stop.is_set():
                prompt = PROMPTS[(i + n) % len(PROMPTS)]
                n += 1
                try:
                    http.post("/v1/completions", json={**body, "prompt": prompt}).raise_for_status()
                except httpx.HTTPError as e:  # the RSS numbers stand; say why the load stopped
                    log.warning("serving load client %d stopped: %s", i, e)
                    self.first_done.set()  # nobody waits for a load that will not come
                    return
                with self._lock:
                    self.completed += 1
                self.first_done.set()


def _worker_cmd(mode: str, model: str, steps: int) -> list[str]:
    cmd = [sys.executable, "-m", "collm_fl.bench.replica_memory", mode, "--model", model]
    return [*cmd, "--steps", str(steps)]


def measure_memory(
    model: str = "smollm2-135m",
    train_steps: int = 4,
    clients: int = 2,
    max_tokens: int = 32,
    progress: Callable[[str], None] | None = None,
) -> MemoryBenchmark:
    """Peak RSS of co-execution (one process) vs separate training and serving processes."""
    say = progress or (lambda line: log.info("%s", line))
    spec = LoraSpec()  # what `collm replica` and the training worker use by default
    params, param_bytes = checkpoint_parameters(model)
    state = random_adapter_state(adapter_shapes(model, spec), seed=0)
    config = spec.to_peft_config_dict(model)
    with tempfile.TemporaryDirectory(prefix="collm-bench-memory-") as tmp:
        root = Path(tmp)
        (root / "runtime").mkdir()
        stack = _Stack(root / "runtime")
        try:
            say("memory: runtime-only process (imports, no model)")
            idle = stack.spawn("idle", _worker_cmd("idle", model, 0), pipes=True)
            _read_line(idle, "ready")
            runtime = rss_bytes(idle.popen.pid)
        finally:
            stack.stop()

        (root / "coexec").mkdir()
        stack = _Stack(root / "coexec")
        try:
            say(f"memory: co-executing replica, {train_steps} training steps while serving")
            replica, url, control = stack.start_replica(model, train=True)
            control.push_version(state, config, 1)
            loaded = rss_bytes(replica.popen.pid)
            with (
                _PeakSampler({"replica": replica.popen.pid}) as sampler,
                _ServingLoad(url, model, clients, max_tokens) as load,
            ):
                load.first_done.wait(READY_TIMEOUT_S)
                _, metrics = control.train(
                    1, train_steps, LEARNING_RATE, TRAIN_DEADLINE_S, 1, share=1.0
                )
            coexec, coexec_served = sampler.peaks["replica"], load.completed
            steps = int(metrics.get("local-steps", 0))
            control.close()
        finally:
            stack.stop()

        (root / "separate").mkdir()
        stack = _Stack(root / "separate")
        try:
            say(f"memory: serving process + training process ({train_steps} steps)")
            trainer = stack.spawn("trainer", _worker_cmd("train", model, train_steps), pipes=True)
            replica, url, control = stack.start_replica(model, train=False)
            control.push_version(state, config, 1)
            control.close()
            _read_line(trainer, "ready")
            pids = {"serving": replica.popen.pid, "training": trainer.popen.pid}
            with (
                _PeakSampler(pids) as sampler,
                _ServingLoad(url, model, clients, max_tokens) as load,
            ):
                assert trainer.popen.stdin is not None
                load.first_done.wait(READY_TIMEOUT_S)
                trainer.popen.stdin.write(b"go\n")
                trainer.popen.stdin.flush()
                _read_line(trainer, "done")
            separate_served = load.completed
            trainer.popen.stdin.close()  # the worker exits on EOF
        finally:
            stack.stop()
    serving, training = sampler.peaks["serving"], sampler.peaks["training"]
    separate = serving + training
    say(
        f"memory: co-execution {coexec / 2**20:.0f} MiB vs separate {separate / 2**20:.0f} MiB "
        f"(serving {serving / 2**20:.0f} + training {training / 2**20:.0f})"
    )
    return MemoryBenchmark(
        params=params,
        param_bytes=param_bytes,
        runtime_rss_bytes=runtime,
        coexec_rss_bytes=coexec,
        coexec_loaded_rss_bytes=loaded,
        serving_rss_bytes=serving,
        training_rss_bytes=training,
        separate_rss_bytes=separate,
        separate_over_coexec=separate / coexec if coexec else 0.0,
        saved_bytes=separate - coexec,
        saved_over_param_bytes=(separate - coexec) / param_bytes if param_bytes else 0.0,
        train_steps=steps,
        serving_requests={"coexec": coexec_served, "separate": separate_served},
    )


# ---- the worker processes (python -m collm_fl.bench.replica_memory {train,idle}) ----


def _say(line: str) -> None:
    """One protocol line to the parent benchmark (stdout is a pipe it reads)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _train_worker(model: str, steps: int, seq_len: int, batch_size: int) -> None:
    import torch

    from collm_fl.data import DataSpec, load_client_data
    from collm_fl.data.tokenize import iterate_batches, tokenize_samples
    from collm_fl.models import load_base_model
    from collm_fl.training import attach_lora, train_lora

    torch.set_num_threads(1)  # what the replica's trainer gets while it serves
    loaded = load_base_model(model)
    peft_model = attach_lora(loaded.model, LoraSpec())
    data = load_client_data(DataSpec(), 0, 1, loaded.tokenizer)
    blocks = tokenize_samples(data.train, loaded.tokenizer, seq_len)
    batches = iterate_batches(blocks, batch_size, seed=0)
    _say("ready")
    if sys.stdin.readline().strip() != "go":
        return
    train_lora(
        peft_model, batches, steps, LEARNING_RATE, on_step=lambda i, _: _say(f"step {i + 1}")
    )
    _say("done")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the worker processes this benchmark starts."""
    parser = argparse.ArgumentParser(prog="python -m collm_fl.bench.replica_memory")
    parser.add_argument("mode", choices=["train", "idle"])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)  # `collm replica` defaults
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    if args.mode == "train":
        _train_worker(args.model, args.steps, args.seq_len, args.batch_size)
    else:
        for module in ("collm_fl.replica.serve", "collm_fl.training"):  # both stacks' imports
            importlib.import_module(module)

        _say("ready")
    sys.stdin.read()  # stay alive (for the parent's RSS reading) until it closes our stdin
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
