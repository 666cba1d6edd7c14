"""The systems of ``collm bench goodput`` and one run of a system at one request rate.

A run starts R fresh ``collm replica`` processes (and, for CoLLM-FL, a ``collm gateway``) on
loopback ports, pushes version 0 (the fresh LoRA init, equal to the base model) to every replica
with the system's swap mode, then runs two things at once from one start time ``t0``:

- **the load**: one open-loop schedule. Baselines route it client-side round-robin over their
  serving replicas (request i of the schedule goes to serving replica i mod n: the interleaved
  sub-schedules are replayed concurrently, each keeping its offsets, so no proxy hop is added);
  CoLLM-FL sends it all to its gateway, which routes each request by predicted latency.
- **the federation**, emulated by :class:`~collm_fl.bench.goodput_rounds.Orchestrator` (a thread
  of the benchmark process, not Flower): rounds of train → aggregate → evaluate → push.

Also here: :func:`calibrate`, one replica alone, which the SLOs, rates and budget come from.
Every process started here is stopped by pid at the end of its run, even on failure.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

from collm_fl.adapters import AdapterState
from collm_fl.bench.goodput_result import Calibration
from collm_fl.bench.goodput_rounds import (
    DRAIN_TIMEOUT_S,
    FederationLog,
    Orchestrator,
    RollingRouter,
    RunSettings,
    StartVersion,
)
from collm_fl.central_eval import CentralEvaluator
from collm_fl.config import RunConfig
from collm_fl.errors import ConfigError
from collm_fl.launch import (
    LocalFederation,
    ManagedProcess,
    free_port,
    replica_command,
    wait_http,
)
from collm_fl.loadgen.client import (
    ReplayProgress,
    RequestResult,
    RequestSpec,
    build_requests,
    replay,
)
from collm_fl.loadgen.goodput import SLOSpec, meets_slo
from collm_fl.replica.affinity import available_cpus
from collm_fl.replica.control_client import ReplicaClient
from collm_fl.replica.engine import LEND_SHARE_LIMIT

log = logging.getLogger(__name__)
T = TypeVar("T")

SEPARATE, COLOCATED, MERGED, COLLM = "separate", "colocated", "merged", "collm-fl"
ROLLING = "rolling"  # one replica at a time out of rotation, training exclusively
COLLM_QUALITY = "collm-fl-quality"  # CoLLM-FL set to train the whole budget (see SYSTEM_SPECS)
COLLM_FRESH = "collm-fl-fresh"  # ... and to publish each version as soon as it can
COLLM_FCFS = "collm-fl-fcfs"  # CoLLM-FL with the baselines' admission order (an ablation)
COLLM_TURNS = "collm-fl-turns"  # CoLLM-FL with replicas taking turns under light load (ablation)
# What a run compares by default. The FCFS ablation separates what the replicas' SLO-aware
# admission order brings (a per-replica setting any server could use) from co-execution.
SYSTEMS = (SEPARATE, COLOCATED, MERGED, ROLLING, COLLM, COLLM_FCFS, COLLM_QUALITY)
# The allocation's floor for that system: the round budget (goodput.TRAIN_FRACTION, 0.3 of a
# round's compute) fits the deadline (DEADLINE_FRACTION, 0.7 of the round) at a share of 0.43.
QUALITY_FIRST_MIN_SHARE = 0.45
QUALITY_FIRST_LEND_SHARE = 0.5  # `collm replica --max-lend-share` of that system
# Fresh versions: serving lends the most it can from the round's start.
FRESH_SHARE = LEND_SHARE_LIMIT
STARTUP_TIMEOUT_S = 600.0  # a replica loads its model and tokenizes its data before /health
MAX_IN_FLIGHT = 256  # open requests the load driver allows (beyond: recorded as dropped)


@dataclass(frozen=True)
class SystemSpec:
    """How one system trains, swaps and routes."""

    name: str
    title: str
    swap_mode: str  # how its serving replicas take a new version (Replica.push_version)
    exclusive: bool  # training pauses the replica's serving for the whole job
    gateway: bool  # requests go through `collm gateway` (else client-side round-robin)
    schedule: str  # the replicas' admission order (`collm replica --schedule`)
    budget: str  # "split": dedicated trainers share it; "each": per replica; "allocate": policy
    summary: str  # one line for the report
    min_share: float = 0.1  # "allocate": the allocation's floor (AllocationInputs.min_share)
    lend_share: float = 0.0  # the replicas' `--max-lend-share` (0: training never borrows)
    lend_early: bool = False  # the replicas' `--lend-early`
    rolling: bool = False  # train one replica at a time, out of the load balancer's rotation
    turns: bool = False  # "allocate": under light load the replicas train in turns (train-in-turns)


SYSTEM_SPECS = {
    SEPARATE: SystemSpec(
        SEPARATE,
        "separate (static split)",
        "reload",
        False,
        False,
        "fcfs",
        "split",
        "⌈R/2⌉ replicas only train (no requests, training share 1), the others only serve and "
        "take each version by a stop-the-world reload (so only the trainers' data partitions "
        "are trained on); round-robin routing, first-come-first-served admission",
    ),
    COLOCATED: SystemSpec(
        COLOCATED,
        "co-located, uncoordinated",
        "reload",
        True,
        False,
        "fcfs",
        "each",
        "every replica trains its full round budget exclusively (its requests wait), versions "
        "by stop-the-world reload; round-robin routing, first-come-first-served admission",
    ),
    MERGED: SystemSpec(
        MERGED,
        "merged",
        "merge",
        True,
        False,
        "fcfs",
        "each",
        "adapter merged into the base for serving; a new version unmerges the old and merges "
        "the new with serving paused (requests in flight go on with the new weights); training "
        "exclusive (unmerge before, merge after); round-robin routing, first-come-first-served "
        "admission",
    ),
    ROLLING: SystemSpec(
        ROLLING,
        "rolling drain-and-train",
        "reload",
        True,
        False,
        "fcfs",
        "each",
        "replicas train their round budget one at a time, exclusively: each leaves the load "
        "balancer's rotation, finishes its requests (at most "
        f"{DRAIN_TIMEOUT_S:g} s), trains, and comes back while the others serve every request "
        "(a different replica first each round; one that no step would fit in what is left of "
        "the deadline stays in rotation); versions by stop-the-world reload, one replica at a "
        "time out of rotation (no drain: a reload takes tens to hundreds of ms, its requests in "
        "flight wait it out); round-robin routing over the replicas in rotation, "
        "first-come-first-served admission",
        rolling=True,
    ),
    COLLM: SystemSpec(
        COLLM,
        "CoLLM-FL",
        "shadow",
        False,
        True,
        "slo",
        "allocate",
        "shadow swaps, unmerged co-execution under the SLO guard, per-round budgets from "
        "collm_fl.policies.allocation.allocate fed with /control/load, SLO-aware gateway, "
        "SLO-aware admission in the replicas (requests that can still meet the TTFT SLO first)",
    ),
    COLLM_FCFS: SystemSpec(
        COLLM_FCFS,
        "CoLLM-FL, first come first served",
        "shadow",
        False,
        True,
        "fcfs",
        "allocate",
        "CoLLM-FL as it ships but with the baselines' admission order in the replicas (`collm "
        "replica --schedule fcfs`): what co-execution, shadow swaps, the allocation and the "
        "gateway bring without the SLO-aware admission",
    ),
    COLLM_QUALITY: SystemSpec(
        COLLM_QUALITY,
        "CoLLM-FL, quality first",
        "shadow",
        False,
        True,
        "slo",
        "allocate",
        "CoLLM-FL set to train the whole budget: the allocation's floor raised to a "
        f"{QUALITY_FIRST_MIN_SHARE:g} training share (run-config `min-training-share`), so busy "
        "replicas plan every step, and serving lends a plan that falls behind up to that share "
        f"(`collm replica --max-lend-share {QUALITY_FIRST_LEND_SHARE:g}`)",
        min_share=QUALITY_FIRST_MIN_SHARE,
        lend_share=QUALITY_FIRST_LEND_SHARE,
    ),
    COLLM_FRESH: SystemSpec(
        COLLM_FRESH,
        "CoLLM-FL, fresh versions",
        "shadow",
        False,
        True,
        "slo",
        "allocate",
        "CoLLM-FL set to publish each version as soon as it can while it serves: the allocation's "
        f"floor at a {FRESH_SHARE:g} training share and serving lending that share from the "
        f"round's start until the plan is done (`collm replica --max-lend-share {FRESH_SHARE:g} "
        "--lend-early`)",
        min_share=FRESH_SHARE,
        lend_share=FRESH_SHARE,
        lend_early=True,
    ),
    COLLM_TURNS: SystemSpec(
        COLLM_TURNS,
        "CoLLM-FL, in turns",
        "shadow",
        False,
        True,
        "slo",
        "allocate",
        "CoLLM-FL with the replicas taking turns under light load (run-config "
        "`train-in-turns=true`): one after another, each with the whole replica while the others "
        "serve, instead of every replica training its budget at once while it serves",
        turns=True,
    ),
}


def replica_cpu(i: int) -> int:
    """The core replica ``i`` is pinned to: one core each, round-robin over the available ones.

    Pinned, the replicas of one machine behave like replicas on their own hardware (the edge
    deployment this emulates) rather than all contending for every core.
    """
    cpus = available_cpus()
    return cpus[i % len(cpus)]


def split_roles(system: str, replicas: int) -> tuple[list[int], list[int]]:
    """(training replicas, serving replicas) of ``system`` on ``replicas`` replicas."""
    if system == SEPARATE:
        if replicas < 2:
            raise ConfigError("the separate system needs at least 2 replicas (train + serve)")
        k = math.ceil(replicas / 2)
        return list(range(k)), list(range(k, replicas))
    return list(range(replicas)), list(range(replicas))


@dataclass
class SystemRun:
    """What one run of one system at one rate produced."""

    system: str
    rate: float
    results: list[RequestResult]
    federation: FederationLog
    serving: list[int]
    training: list[int]
    startup_s: float  # starting the processes and pushing version 0
    wall_s: float  # from t0 until both the load and the rounds were over


class LoadProgress:
    """Requests finished so far across the concurrent replays (for progress lines)."""

    def __init__(self, parts: int, slo: SLOSpec) -> None:
        self.slo = slo
        self._parts: list[tuple[RequestResult, ...]] = [() for _ in range(parts)]

    def updater(self, part: int) -> Callable[[ReplayProgress], None]:
        def update(p: ReplayProgress) -> None:
            self._parts[part] = p.completed

        return update

    def line(self) -> str:
        done = [r for part in self._parts for r in part]
        met = sum(meets_slo(r, self.slo) for r in done)
        share = f"{100 * met / len(done):.0f}%" if done else "-"
        return f"{len(done)} requests done, {share} within SLO"


async def replay_round_robin(
    targets: Sequence[str],
    model: str,
    specs: Sequence[RequestSpec],
    timeout_s: float,
    progress: LoadProgress,
) -> list[RequestResult]:
    """Replay ``specs`` open loop, request i to ``targets[i % n]``; results in schedule order."""
    n = len(targets)
    parts = [list(specs[k::n]) for k in range(n)]
    outs = await asyncio.gather(
        *(
            replay(
                target,
                model,
                part,
                timeout_s=timeout_s,
                max_in_flight=max(1, MAX_IN_FLIGHT // n),
                progress=progress.updater(k),
                progress_every_s=1.0,
            )
            for k, (target, part) in enumerate(zip(targets, parts, strict=True))
        )
    )
    merged: list[RequestResult] = []
    for k, out in enumerate(outs):
        merged += [replace(r, index=k + n * r.index) for r in out]
    return sorted(merged, key=lambda r: r.index)


def run_system(
    system: str,
    rate: float,
    specs: Sequence[RequestSpec],
    settings: RunSettings,
    evaluator: CentralEvaluator,
    start: StartVersion,
    workdir: Path,
    say: Callable[[str], None],
) -> SystemRun:
    """Start ``system``'s processes, serve ``specs`` while the rounds run, stop everything."""
    spec = SYSTEM_SPECS[system]
    training, serving = split_roles(system, settings.replicas)
    fed = LocalFederation(workdir, num_replicas=settings.replicas, model=settings.model)
    workdir.mkdir(parents=True, exist_ok=True)
    clients: list[ReplicaClient] = []
    orchestrator: Orchestrator | None = None
    started = time.monotonic()
    try:
        urls, controls = _start_replicas(fed, settings, spec)
        clients = [ReplicaClient(c, fed.control_token) for c in controls]
        targets = [urls[i] for i in serving]
        if spec.gateway:
            targets = [
                fed.start_gateway(
                    list(urls),
                    settings.slo.ttft_s,
                    settings.slo.tpot_s,
                    shed_factor=settings.shed_factor,
                )[0]
            ]
        router = RollingRouter(targets) if spec.rolling else None
        orchestrator = Orchestrator(
            spec, settings, clients, training, serving, evaluator, start, say, router
        )
        orchestrator.publish_initial()
        for c in clients:  # the first load report covers the run only
            c.load_report(reset=True)
        startup_s = time.monotonic() - started
        say(f"  {system}: {settings.replicas} replicas up in {startup_s:.0f}s; load starts")
        progress = LoadProgress(1 if router else len(targets), settings.slo)
        orchestrator.progress_line = progress.line
        results, federation, wall_s = asyncio.run(
            _load_and_rounds(targets, settings, specs, orchestrator, progress, router)
        )
    finally:
        if orchestrator is not None:  # (no round starts while the replicas are stopped)
            orchestrator.stop()
        for c in clients:
            c.close()
        fed.stop()
    return SystemRun(system, rate, results, federation, serving, training, startup_s, wall_s)


async def _load_and_rounds(
    targets: Sequence[str],
    settings: RunSettings,
    specs: Sequence[RequestSpec],
    orchestrator: Orchestrator,
    progress: LoadProgress,
    router: RollingRouter | None = None,
) -> tuple[list[RequestResult], FederationLog, float]:
    t0, t0_wall = time.monotonic(), time.time()
    if router is None:
        replaying = replay_round_robin(
            targets, settings.model, specs, settings.request_timeout_s, progress=progress
        )
    else:  # each request to the next replica in rotation when it is due
        replaying = replay(
            targets[0],
            settings.model,
            specs,
            timeout_s=settings.request_timeout_s,
            max_in_flight=MAX_IN_FLIGHT,
            progress=progress.updater(0),
            progress_every_s=1.0,
            route=router.route,
        )
    load = asyncio.create_task(replaying)
    try:
        federation = await _in_daemon_thread(lambda: orchestrator.run(t0, t0_wall))
    except BaseException:
        load.cancel()
        raise
    results = await load
    return results, federation, time.monotonic() - t0


async def _in_daemon_thread(work: Callable[[], T]) -> T:
    """``work()`` on a daemon thread of its own, its outcome handed back through a future of
    the running loop. Not ``asyncio.to_thread``: ``asyncio.run`` joins the default executor's
    threads as it ends, so a Ctrl-C waited for every remaining round before the run's processes
    were stopped (run_system's ``finally`` stops the orchestrator instead)."""
    done: concurrent.futures.Future[T] = concurrent.futures.Future()

    def target() -> None:
        if not done.set_running_or_notify_cancel():  # (cancelled before it started)
            return
        try:
            done.set_result(work())
        except BaseException as e:  # handed to the awaiting task, which raises it
            done.set_exception(e)

    threading.Thread(target=target, name="bench-rounds", daemon=True).start()
    return await asyncio.wrap_future(done)


def _start_replicas(
    fed: LocalFederation, s: RunSettings, spec: SystemSpec
) -> tuple[list[str], list[str]]:
    """Spawn every replica at once (they load in parallel), then wait for each to be healthy."""
    procs: list[ManagedProcess] = []
    urls: list[str] = []
    controls: list[str] = []
    for i in range(s.replicas):
        port, control_port = free_port(), free_port()
        cmd = replica_command(
            s.model,
            port,
            control_port,
            fed.workdir / f"replica{i}-store",
            i,
            s.replicas,
            [
                "--ttft-slo",
                repr(s.slo.ttft_s),
                "--tpot-slo",
                repr(s.slo.tpot_s),
                "--max-batch-size",
                str(s.max_batch_size),
                "--schedule",
                spec.schedule,
                "--max-lend-share",
                repr(spec.lend_share),
                *(["--lend-early"] if spec.lend_early else []),
                "--training-share",
                repr(s.initial_share),
                "--seed",
                str(s.seed),
                "--cpus",
                str(replica_cpu(i)),
            ],
        )
        procs.append(fed.spawn(f"replica{i}", cmd))
        urls.append(f"http://127.0.0.1:{port}")
        controls.append(f"127.0.0.1:{control_port}")
    for proc, url in zip(procs, urls, strict=True):
        wait_http(url + "/health", proc, STARTUP_TIMEOUT_S)
    return urls, controls


def calibrate(
    model: str,
    replicas: int,
    start_state: AdapterState,
    cfg: RunConfig,
    workdir: Path,
    quick: bool,
    seed: int,
    prompt_tokens: int,
    output_tokens: int,
) -> Calibration:
    """Measure one replica alone (partition 0 of ``replicas``): latency, throughput, step time.

    Unloaded latency: medians over sequential requests (after one warm-up request). Throughput:
    a burst of 2 × the batch size sent at once, completed requests / seconds to the last one.
    Step time: a short training job on the idle replica (on its one core).
    """
    started = time.monotonic()
    fed = LocalFederation(workdir, num_replicas=1, model=model)
    workdir.mkdir(parents=True, exist_ok=True)
    port, control_port = free_port(), free_port()
    cmd = replica_command(
        model,
        port,
        control_port,
        workdir / "store",
        0,
        replicas,
        # First come, first served: the burst measures plain throughput, no system's policy.
        ["--seed", str(seed), "--cpus", str(replica_cpu(0)), "--schedule", "fcfs"],
    )
    url = f"http://127.0.0.1:{port}"
    unloaded, burst = (3, 8) if quick else (10, 16)
    try:
        wait_http(url + "/health", fed.spawn("replica", cmd), 600.0)
        startup_s = time.monotonic() - started
        with ReplicaClient(f"127.0.0.1:{control_port}", fed.control_token) as client:
            client.push_version(start_state, cfg.lora.to_peft_config_dict(model), 0)
            lengths = (prompt_tokens, output_tokens)
            solo, crowd = asyncio.run(_measure_latency(url, model, unloaded, burst, lengths))
            _, metrics = client.train(0, 2 if quick else 4, cfg.learning_rate, 600.0, 0)
    finally:
        fed.stop()
    ttfts = [r.ttft_s for r in solo if r.ttft_s is not None]
    tpots = [r.tpot_s for r in solo if r.tpot_s is not None]
    ends = [(r.sent_at or 0.0) + r.e2e_s for r in crowd if r.status == "ok" and r.e2e_s]
    if not ttfts or not tpots or not ends:
        raise ConfigError(f"calibration failed: no usable answer from one replica of {model}")
    if not (metrics["local-steps"] >= 1 and metrics["train-seconds"] > 0):
        # Every training budget is sized from this step time: none would be no budget at all.
        raise ConfigError(
            f"calibration failed: the training job on one replica of {model} ran "
            f"{metrics['local-steps']:g} steps in {metrics['train-seconds']:g} s (its data or "
            "its deadline left no step)"
        )
    return Calibration(
        ttft_unloaded_s=statistics.median(ttfts),
        tpot_unloaded_s=statistics.median(tpots),
        capacity_rps=len(ends) / max(ends),
        train_step_s=metrics["train-seconds"] / metrics["local-steps"],
        unloaded_requests=unloaded,
        burst_requests=burst,
        startup_s=startup_s,
        seconds=time.monotonic() - started,
    )


async def _measure_latency(
    url: str, model: str, unloaded: int, burst: int, lengths: tuple[int, int]
) -> tuple[list[RequestResult], list[RequestResult]]:
    solo: list[RequestResult] = []
    for spec in build_requests([0.0] * (unloaded + 1), *lengths):  # one at a time
        solo += await replay(url, model, [spec], timeout_s=120.0)
    crowd = await replay(url, model, build_requests([0.0] * burst, *lengths), timeout_s=300.0)
    return solo[1:], crowd  # the first sequential request warmed the replica up
