"""The emulated federation of ``collm bench goodput``: rounds driven over the control API.

Not Flower (the Flower path is tested elsewhere): the benchmark process plays the server. Round r
starts at ``warmup + (r-1)·round_s`` seconds after the load started (later if the previous round
ran over). It asks the system's training replicas to train (``/control/train``, in parallel),
aggregates the updates with :func:`aggregate_lora_exact` (weighted by examples; FedNova's
normalized mean when the replicas ran different steps, as the strategy averages them), evaluates
the new version on the central held-out set (:class:`CentralEvaluator`), pushes it to every
replica with the system's swap mode, and records when each serving replica started serving it.

The training budget per round is the same for every system: ``R × steps_per_replica`` micro-steps
with the same deadline. The separate system spreads it over its training replicas; the
co-located and merged systems give each replica its share, trained exclusively; the rolling
system too, one replica at a time, taken out of its load balancer's rotation
(:class:`RollingRouter`) and drained first; CoLLM-FL asks
:func:`collm_fl.policies.allocation.allocate` (``max_steps = steps_per_replica``), which may
train less where serving has no headroom. A failed train call is counted and logged, never raised.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import httpx
import torch

from collm_fl.adapters import MAX_SERVER_LR, AdapterState
from collm_fl.aggregation import aggregate_lora_exact, step_normalized
from collm_fl.central_eval import CentralEvaluator
from collm_fl.errors import WorkFailed
from collm_fl.loadgen.goodput import SLOSpec

# The very policy the ServerApp runs (a pure function), not a copy of it.
from collm_fl.policies.allocation import (
    STEP_HISTORY,
    AllocationInputs,
    NodeBudget,
    NodeLoad,
    NodeState,
    RateForecast,
    allocate,
    describe,
    forecast_rate,
    measured_step_seconds,
    turn_before,
)
from collm_fl.replica.control_client import ReplicaClient, ReplicaUnavailable
from collm_fl.replica.relay import MIN_DEADLINE_S

if TYPE_CHECKING:
    from collm_fl.bench.goodput_systems import SystemSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSettings:
    """Everything the runs of all systems share (one benchmark, one set of settings)."""

    model: str
    replicas: int
    rounds: int
    round_s: float  # wall-clock length of a round
    warmup_s: float  # serving version 0 before round 1 (the first load report's window)
    deadline_s: float  # training deadline within a round
    steps_per_replica: int  # the co-located per-replica budget; R × this per round in total
    step_seconds: float  # estimated seconds per step with all replicas training at once
    learning_rate: float
    slo: SLOSpec
    prompt_tokens: int
    output_tokens: int
    request_timeout_s: float
    seed: int
    max_batch_size: int = 8
    initial_share: float = 0.5  # CoLLM-FL's training share before the first allocation
    # η of the server step where a system averages the updates of 2+ training replicas (the
    # federated systems); one dedicated trainer's update (separate) is taken as it is.
    server_lr: float = 1.0
    shed_factor: float = 0.0  # CoLLM-FL's gateway admission control (`--shed-factor`); 0 = off
    # Replicas per core on average (>= 1), which step_seconds is scaled by (a replica's own: the
    # replicas pinned to its core, Orchestrator._step_seconds)
    core_sharing: float = 1.0

    @property
    def schedule_s(self) -> float:
        """Length of the load schedule: warm-up plus every round."""
        return self.warmup_s + self.rounds * self.round_s


def core_sharing(replicas: int, cores: int) -> float:
    """Replicas per core on average (>= 1), each pinned to one of ``cores`` (0: unknown, 1)."""
    return max(1.0, replicas / cores) if cores > 0 else 1.0


@dataclass(frozen=True)
class StartVersion:
    """Version 0: the fresh LoRA init (B = 0, so it serves the base model) and its held-out loss."""

    state: AdapterState
    loss: float


@dataclass
class RoundRecord:
    round: int
    started_s: float  # seconds since the load started
    budgets: dict[int, tuple[int, float]]  # replica -> (steps asked, training share)
    steps: int  # micro-steps actually trained, all replicas
    tokens: int  # training tokens, all replicas
    train_s: float  # wall time of the training phase
    version: int | None  # None: no update came back, nothing published
    eval_loss: float | None
    eval_s: float | None  # the central evaluation's wall time (it runs before the push)
    published_s: float | None  # when the last serving replica started serving it
    swap_ms: list[float] = field(default_factory=list)  # per replica, as the replica measured
    failures: list[str] = field(default_factory=list)
    # CoLLM-FL: each replica's allocation decision with the load report it was made from
    allocation: list[dict[str, object]] = field(default_factory=list)
    # CoLLM-FL: the decision whole, with every input allocate() had (as the server stores it:
    # `describe`), so that it can be replayed (None: a baseline, or a report from before)
    decision: dict[str, object] | None = None


DRAIN_TIMEOUT_S = 15.0  # rolling: how long a replica out of rotation may finish its requests
DRAIN_POLL_S = 0.2


class RollingRouter:
    """The rolling system's load balancer: round-robin over the replicas in rotation. The
    orchestrator takes a replica out to train it (:meth:`take_out`) and puts it back after."""

    def __init__(self, urls: Sequence[str]) -> None:
        self.urls = list(urls)
        self._out: set[int] = set()
        self._next = 0
        self._lock = threading.Lock()

    def route(self, _request: int) -> str:
        """The next replica in rotation (with every replica out, the next of all of them)."""
        with self._lock:
            rotation = [k for k in range(len(self.urls)) if k not in self._out]
            rotation = rotation or list(range(len(self.urls)))
            url = self.urls[rotation[self._next % len(rotation)]]
            self._next += 1
            return url

    def take_out(self, replica: int) -> None:
        with self._lock:
            self._out.add(replica)

    def put_back(self, replica: int) -> None:
        with self._lock:
            self._out.discard(replica)


@dataclass
class FederationLog:
    switches: list[tuple[float, int, int]]  # (seconds since load start, replica, version)
    rounds: list[RoundRecord]
    loss_by_version: dict[int, float]


class Orchestrator:
    """Drives one system's rounds; :meth:`publish_initial` first, then :meth:`run` in a thread
    (:meth:`stop` ends it early)."""

    def __init__(
        self,
        spec: SystemSpec,
        settings: RunSettings,
        clients: Sequence[ReplicaClient],
        training: Sequence[int],
        serving: Sequence[int],
        evaluator: CentralEvaluator,
        start: StartVersion,
        say: Callable[[str], None],
        router: RollingRouter | None = None,
    ) -> None:
        self.spec, self.s, self.clients = spec, settings, list(clients)
        self.router = router  # rolling: train one replica at a time, out of rotation
        self.clock: Callable[[], float] = time.monotonic  # (rolling's deadline; tests set it)
        self.training, self.serving = list(training), list(serving)
        self.evaluator, self.say = evaluator, say
        self.peft_config = evaluator.cfg.lora.to_peft_config_dict(settings.model)
        self.state, self.version = start.state, 0
        self.log = FederationLog([], [], {0: start.loss})
        self.progress_line: Callable[[], str] = lambda: ""
        self._pushed_wall: list[tuple[float, int, int]] = []  # (replica time.time(), i, version)
        self._forecast: dict[int, RateForecast] = {}
        # Each replica's last step times (its speed: the fastest of them and the calibration's
        # idle step, see _step_seconds)
        self._step_s: dict[int, deque[float]] = {}
        # (steps of one replica's share of the rounds so far, loss): the mean over the replicas
        # that trained, as the live server's history (AllocationInputs.loss_history)
        self._history: list[tuple[float, float]] = [(0.0, start.loss)]
        self._steps_total = 0.0
        self._allocation: list[dict[str, object]] = []
        self._plans: dict[int, NodeBudget] = {}  # this round's allocation (CoLLM-FL systems)
        self._decision: dict[str, object] | None = None  # and it whole, with its inputs
        # Set by stop(): the run ends (a Ctrl-C, a failed load) without its remaining rounds.
        self._stop = threading.Event()

    def stop(self) -> None:
        """Ask :meth:`run` to end: no round starts after this (one under way ends as its calls
        to the replicas do, which stopping the replicas cuts short)."""
        self._stop.set()

    def publish_initial(self) -> None:
        """Push version 0 to every replica before the load starts. A replica that does not take
        it fails the run (WorkFailed) before its load: every run starts from the same version on
        every replica, and a serving replica with no version has no served quality (the run
        would go on for its whole schedule and its report be lost at the end)."""
        _, failures = self._push(0, self.state)
        if failures:
            raise WorkFailed(
                f"{self.spec.name}: {'; '.join(failures)} (every replica serves version 0 "
                "before the load starts)"
            )

    def run(self, t0: float, t0_wall: float) -> FederationLog:
        # The server's evaluation shares the replicas' cores here (it would run elsewhere in a
        # deployment): one thread, so it never takes more than one core from serving.
        torch.set_num_threads(1)
        for rnd in range(1, self.s.rounds + 1):
            due = t0 + self.s.warmup_s + (rnd - 1) * self.s.round_s
            # Pacing the rounds in wall time, or until stopped
            if self._stop.wait(max(0.0, due - time.monotonic())):
                log.info("stopped before round %d of %d", rnd, self.s.rounds)
                break
            self.log.rounds.append(self._round(rnd, time.monotonic() - t0, t0_wall))
        self.log.switches = sorted(
            (max(0.0, wall - t0_wall), i, v)
            for wall, i, v in self._pushed_wall
            if i in self.serving
        )
        return self.log

    # ---- one round ----

    def _round(self, rnd: int, started_s: float, t0_wall: float) -> RoundRecord:
        budgets = self._budgets(rnd)
        t_train = time.monotonic()
        updates, weights, trained, steps, tokens, failures = self._train(rnd, budgets)
        record = RoundRecord(
            rnd,
            started_s,
            budgets,
            steps,
            tokens,
            time.monotonic() - t_train,
            None,
            None,
            None,
            None,
        )
        record.failures = failures
        record.allocation, self._allocation = self._allocation, []
        record.decision, self._decision = self._decision, None
        for a in record.allocation:
            self.say(f"    round {rnd}: replica {a['replica']}: {a['reason']} ({a['load']})")
        done = [t for t in trained if t]
        if done:
            self._steps_total += sum(done) / len(done)
        if not updates:
            self.say(f"    round {rnd}: no update came back; still serving v{self.version}")
            return record
        # η for every system alike wherever 2+ updates are averaged (it offsets the averaging of
        # parallel updates); one update alone (a separate system's trainer, or a round where one
        # replica of the others trained) moves the global adapter by its own step.
        eta = self.s.server_lr if len(updates) > 1 else 1.0
        # As the federated strategy averages them: FedNova's normalized mean when steps differ.
        weights, step_scale = step_normalized(weights, trained)
        eta = min(eta * step_scale, MAX_SERVER_LR)
        self.state = aggregate_lora_exact(updates, weights, server_lr=eta, reference=self.state)
        self.version += 1
        t_eval = time.monotonic()
        loss = self.evaluator.evaluate(self.state).loss
        record.eval_s = time.monotonic() - t_eval
        self.log.loss_by_version[self.version] = loss
        self._history.append((self._steps_total, loss))
        record.version, record.eval_loss = self.version, loss
        record.swap_ms, push_failures = self._push(self.version, self.state)
        record.failures += push_failures
        served = [w for w, i, v in self._pushed_wall if v == self.version and i in self.serving]
        record.published_s = max(served) - t0_wall if served else None
        asked = ", ".join(f"r{i} {st}@{sh:.2f}" for i, (st, sh) in sorted(budgets.items()))
        self.say(
            f"    round {rnd}: budgets {asked or 'none'}; trained {steps} steps in "
            f"{record.train_s:.1f}s; v{self.version} held-out loss {loss:.4f}, served at "
            f"{record.published_s or 0:.1f}s ({self.spec.swap_mode}); {self.progress_line()}"
        )
        return record

    def _step_seconds(self, i: int) -> float:
        """Replica ``i``'s speed: the fastest of its last ``STEP_HISTORY`` rounds' step times,
        never slower than the calibration's idle step. A step measured while serving shared the
        core took longer than the step's compute (it waited on serving within its layers), and
        the allocation's share already counts that wait: taken as the speed, it was counted twice
        (a run on 9fa4e7a planned 2 steps a round where 5 fit, seed 4: 8 / 6 / 4 trained)."""
        from collm_fl.bench.goodput_systems import replica_cpu  # (it imports this module)

        # A step's cost is its own compute: on a core it shares with k - 1 other replicas it
        # takes k times as long; so does the calibration's idle step, which step_seconds holds
        # scaled by the replicas per core on average.
        core = replica_cpu(i)
        k = sum(replica_cpu(j) == core for j in range(self.s.replicas))
        idle_s = self.s.step_seconds / self.s.core_sharing * k
        times = self._step_s.get(i)
        return min(idle_s, *(t * k for t in times)) if times else idle_s

    def _budgets(self, rnd: int) -> dict[int, tuple[int, float]]:
        """replica -> (steps, training share) for this round; replicas with 0 steps sit out."""
        total = self.s.steps_per_replica * self.s.replicas
        self._plans = {}
        if self.spec.budget == "split":
            k = len(self.training)
            return {i: (total // k + (j < total % k), 1.0) for j, i in enumerate(self.training)}
        if self.spec.budget == "allocate":
            return self._allocate(rnd)
        return {i: (self.s.steps_per_replica, 1.0) for i in self.training}

    def _allocate(self, rnd: int) -> dict[int, tuple[int, float]]:
        nodes = []
        for i in self.training:
            try:
                m = self.clients[i].load_report(reset=True)
            except ReplicaUnavailable as e:  # it sits the round out; the run goes on
                log.warning("replica %d: no load report, it sits the round out: %s", i, e)
                self._allocation.append(
                    {
                        "replica": i,
                        "steps": 0,
                        "backfill": 0,
                        "share": 0.0,
                        "reason": "sits out: no load report",
                        "load": f"unavailable: {e}",
                    }
                )
                continue
            load = NodeLoad(
                request_rate=m["request-rate"],
                queue_depth=m["queue-depth"],
                ttft_p95=m["ttft-p95"],
                tpot_p95=m["tpot-p95"],
                slo_attainment=m["slo-attainment"],
                utilization=m["serving-utilization"],
            )
            self._forecast[i] = forecast_rate(self._forecast.get(i), load.request_rate)
            step_s = self._step_seconds(i)
            fc = self._forecast[i]
            nodes.append(NodeState(i, load, fc.next, step_s, forecast_trend=fc.trend))
        inputs = AllocationInputs(
            nodes=tuple(nodes),
            ttft_slo_s=self.s.slo.ttft_s,
            tpot_slo_s=self.s.slo.tpot_s,
            deadline_s=self.s.deadline_s,
            max_steps=self.s.steps_per_replica,
            loss_history=tuple(self._history),
            min_share=self.spec.min_share,
            rotation=rnd - 1,
            turns=self.spec.turns,
        )
        decided = allocate(inputs)
        self._decision = describe(inputs, decided)
        for node, b in zip(nodes, decided, strict=True):
            report = node.load
            assert report is not None  # replicas always report their load
            self._allocation.append(
                {
                    "replica": b.node_id,
                    "steps": b.steps,
                    "backfill": b.backfill_steps,
                    "share": b.share,
                    "start_s": b.start_after_s,
                    "reason": b.reason,
                    "load": (
                        f"{report.request_rate:.2f} req/s, utilization {report.utilization:.2f}, "
                        f"p95 TTFT {report.ttft_p95:.2f}s TPOT {report.tpot_p95:.3f}s, "
                        f"SLO attainment {report.slo_attainment:.2f}"
                    ),
                }
            )
        self._plans = {b.node_id: b for b in decided}
        return {b.node_id: (b.steps, b.share) for b in decided if not b.sits_out}

    def _train(
        self, rnd: int, budgets: dict[int, tuple[int, float]]
    ) -> tuple[list[AdapterState], list[float], list[float | None], int, int, list[str]]:
        plans = self._plans
        jobs = {
            i: b for i, b in budgets.items() if b[0] > 0 or (i in plans and not plans[i].sits_out)
        }
        if not jobs:
            return [], [], [], 0, 0, []

        def one(
            i: int, deadline_s: float, start_after_s: float = 0.0
        ) -> tuple[AdapterState, dict[str, float]]:
            steps, share = jobs[i]
            plan = plans.get(i)
            return self.clients[i].train(
                rnd,
                steps,
                self.s.learning_rate,
                deadline_s,
                base_version=self.version,
                share=None if self.spec.exclusive else share,
                exclusive=self.spec.exclusive,
                backfill_steps=plan.backfill_steps if plan else 0,
                start_after_s=start_after_s,
            )

        # Turns: as the federation's server does, each turn's train call waits for the one
        # before it to return (at most until its planned start), then starts at once.
        before = turn_before(plans[i] for i in jobs if i in plans)
        returned = {i: threading.Event() for i in jobs}
        t_round = time.monotonic()

        began: dict[int, float] = {}  # seconds into the round each turn was asked to train

        def in_order(i: int) -> tuple[AdapterState, dict[str, float]]:
            try:
                if i not in before:  # the first turn (planned at 0), or no turns
                    plan = plans.get(i)
                    if plan and plan.turn > 0:
                        began[i] = plan.start_after_s
                    return one(i, self.s.deadline_s, plan.start_after_s if plan else 0.0)
                due = plans[i].start_after_s - (time.monotonic() - t_round)
                returned[before[i]].wait(max(0.0, due))
                began[i] = time.monotonic() - t_round
                return one(i, max(self.s.deadline_s - began[i], MIN_DEADLINE_S), 0.0)
            finally:
                returned[i].set()

        outcomes: dict[int, tuple[AdapterState, dict[str, float]] | ReplicaUnavailable] = {}
        if self.router is None:
            with ThreadPoolExecutor(len(jobs), thread_name_prefix="bench-train") as pool:
                futures = {i: pool.submit(in_order, i) for i in jobs}
                for i, fut in futures.items():
                    try:
                        outcomes[i] = fut.result()
                    except ReplicaUnavailable as e:
                        outcomes[i] = e
        else:
            outcomes = self._train_in_turn(rnd, list(jobs), one)
        updates, weights, failures = [], [], []
        trained: list[float | None] = []
        steps = tokens = 0
        for i, outcome in outcomes.items():
            if isinstance(outcome, ReplicaUnavailable):
                log.warning("round %d: replica %d failed to train: %s", rnd, i, outcome)
                failures.append(f"replica {i}: {outcome}")
                continue
            state, metrics = outcome
            done = int(metrics["local-steps"])
            steps, tokens = steps + done, tokens + int(metrics["train-tokens"])
            for a in self._allocation:  # what the decision became
                if a["replica"] == i:
                    a["trained"] = done
                    a["backfilled"] = int(metrics.get("backfill-steps", 0))
                    a["lent_s"] = float(metrics.get("lent-seconds", 0.0))
                    a["late_rest_s"] = float(metrics.get("late-rest-seconds", 0.0))
                    if i in began:
                        a["began_s"] = began[i]
            step_s = measured_step_seconds(metrics)  # (as the server reads it)
            if step_s is not None:  # the fastest of the last rounds: the replica's own speed
                self._step_s.setdefault(i, deque(maxlen=STEP_HISTORY)).append(step_s)
            if done > 0:
                updates.append(state)
                weights.append(metrics["num-examples"])
                trained.append(done)
        return updates, weights, trained, steps, tokens, failures

    def _train_in_turn(
        self,
        rnd: int,
        replicas: list[int],
        one: Callable[[int, float], tuple[AdapterState, dict[str, float]]],
    ) -> dict[int, tuple[AdapterState, dict[str, float]] | ReplicaUnavailable]:
        """Rolling: each replica in turn leaves the rotation, finishes its requests (up to
        ``DRAIN_TIMEOUT_S``), trains exclusively in what is left of the round's deadline, and
        comes back; the others serve every request meanwhile."""
        assert self.router is not None
        started = self.clock()
        outcomes: dict[int, tuple[AdapterState, dict[str, float]] | ReplicaUnavailable] = {}
        # A different replica first each round: a fixed order would leave the last ones' data
        # short whenever the deadline runs out.
        shift = (rnd - 1) % len(replicas) if replicas else 0
        for i in [*replicas[shift:], *replicas[:shift]]:
            if self._stop.is_set():
                break
            left = self.s.deadline_s - (self.clock() - started)
            step_s = self._step_seconds(i)
            if left < step_s:  # not one step fits: it stays in rotation, trains nothing
                log.info("round %d: replica %d skipped: %.1fs left of the deadline", rnd, i, left)
                continue
            self.router.take_out(i)
            try:
                drained_s = self._drain(i)
                left = self.s.deadline_s - (self.clock() - started)
                log.info("round %d: replica %d drained in %.1fs; trains", rnd, i, drained_s)
                try:
                    outcomes[i] = one(i, max(left, step_s))
                except ReplicaUnavailable as e:
                    outcomes[i] = e
            finally:
                self.router.put_back(i)
        return outcomes

    def _drain(self, i: int) -> float:
        """Wait until replica ``i`` has no request running or queued on two polls in a row (a
        request routed to it just before it left the rotation may still be on its way), at most
        DRAIN_TIMEOUT_S; the seconds it took."""
        assert self.router is not None
        url = self.router.urls[i] + "/health"
        started = time.monotonic()
        idle = 0
        with httpx.Client(timeout=5.0) as client:
            while idle < 2 and time.monotonic() - started < DRAIN_TIMEOUT_S:
                try:
                    h = client.get(url).json()
                except (httpx.HTTPError, ValueError):
                    break  # (its training call will say what is wrong)
                busy = int(h.get("running", 0)) + int(h.get("queue_depth", 0))
                idle = idle + 1 if busy == 0 else 0
                if idle < 2 and self._stop.wait(DRAIN_POLL_S):
                    break
        return time.monotonic() - started

    def _push(self, version: int, state: AdapterState) -> tuple[list[float], list[str]]:
        """Push to every replica (serving ones in the system's mode): the swap ms of each replica
        that took it, and why the others did not (they keep serving what they had, as a
        SuperNode whose replica refused a version does; the run goes on, but for version 0:
        :meth:`publish_initial`).

        At once, except behind the rolling system's balancer: there one replica at a time, out
        of rotation while it reloads (no drain: its requests in flight wait out the reload, new
        ones go to the others), as an operator rolls a stop-the-world update out.
        """

        def one(i: int) -> dict[str, object] | ReplicaUnavailable:
            mode = self.spec.swap_mode if i in self.serving else "shadow"
            try:
                return self.clients[i].push_version(state, self.peft_config, version, mode=mode)
            except ReplicaUnavailable as e:
                return e

        def out_of_rotation(i: int) -> dict[str, object] | ReplicaUnavailable:
            assert self.router is not None
            self.router.take_out(i)
            try:
                return one(i)
            finally:
                self.router.put_back(i)

        if self.router is not None:
            replies = [out_of_rotation(i) for i in range(len(self.clients))]
        else:
            with ThreadPoolExecutor(len(self.clients), thread_name_prefix="bench-push") as pool:
                replies = list(pool.map(one, range(len(self.clients))))
        swap_ms, failures = [], []
        for i, reply in enumerate(replies):
            if isinstance(reply, ReplicaUnavailable):
                log.warning("version %d: replica %d did not take it: %s", version, i, reply)
                failures.append(f"replica {i}: version {version} not taken: {reply}")
                continue
            self._pushed_wall.append((float(reply["promoted_at"]), i, version))  # type: ignore[arg-type]
            swap_ms.append(float(reply["load_ms"]))  # type: ignore[arg-type]
        return swap_ms, failures
