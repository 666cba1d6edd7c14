"""The SLO guard: may the replica's trainer run its next micro-step now?

Short-timescale half of the coordination. Serving has priority. The co-execution trainer's steps
give way to serving inside the step (they wait at every LoRA layer while serving has work, see
``collm_fl.replica.coexec``), so a step it starts cannot delay admission and runs on serving's
idle moments; the guard decides whether to start one at all (not while a waiting request's TTFT
or the running requests' TPOT is at risk) — unless the decision's ``lend_share`` says serving
rests that share of its time for it (``InferenceEngine.lend_to_training``). It says so only for
a trainer that has fallen behind its round's plan (``behind_schedule``): idle moments first,
borrowed time only as late as the plan allows, and then even while requests are at risk, so
sustained load neither cancels the allocation's plan nor lets training take more than the
allocation's share — where the replica lends (``--max-lend-share`` above 0, which caps the share
lent). Under the default 0 nothing is lent and no plan counts as behind (the share a plan is
judged at is the share it can borrow): training runs on serving's idle moments alone, the TTFT
and TPOT rules always hold, and sustained load can leave a round's plan unmet. When the replica
is idle, training takes the whole replica (all threads); so it does when every request the
replica holds is already late (``only_late``: every waiting one has waited past its TTFT budget,
every running one got its first token late, none overdue) — serving them earns no goodput, so
planned and backfill steps alike take that time, and the engine rests for them until a fresh
request arrives (``InferenceEngine.want_late_turn``).
"""

from __future__ import annotations

from dataclasses import dataclass

IDLE_RECHECK_S = 0.5  # how long a yielding trainer waits before re-checking on its own
MIN_RECHECK_S = 0.02  # ... and at least this long (no step timed yet must not mean a busy loop)


@dataclass(frozen=True)
class GuardInputs:
    queue_depth: int  # requests waiting for admission
    running: int  # requests being decoded
    oldest_waiting_s: float  # age of the oldest waiting request
    decode_step_s: float  # recent seconds per batched decode step
    training_share: float  # 0..1, set by the round's allocation (or an operator)
    train_step_s: float  # recent wall seconds per training micro-step (paces re-checks)
    ttft_slo_s: float
    tpot_slo_s: float
    total_threads: int  # compute threads the replica may use (cores)
    # The round's planned steps left need at least the time left before its deadline at the
    # training share: yielding any longer means the replica's plan is not met this round.
    behind_schedule: bool = False
    # Every request the replica holds is late and none overdue (EngineStats.only_late).
    only_late: bool = False


@dataclass(frozen=True)
class GuardDecision:
    run: bool
    threads: int  # torch threads for this micro-step
    wait_s: float  # when not running: how long to wait before re-checking (or until woken)
    reason: str
    lend_share: float = 0.0  # running: the share of serving's time to lend the step (0: none)


def training_decision(x: GuardInputs, margin: float = 0.8, backfill: bool = False) -> GuardDecision:
    """Decide whether the next training micro-step runs now, and with how many threads.

    A ``backfill`` step (beyond the round's planned steps) runs only on an idle replica, or
    one whose requests are all late.
    """
    if x.training_share <= 0.0 and not backfill:
        return GuardDecision(False, 0, IDLE_RECHECK_S, "training share is 0")
    if x.queue_depth == 0 and x.running == 0:
        return GuardDecision(True, max(1, x.total_threads), 0.0, "idle: training takes the replica")
    if x.only_late:  # serving them earns no goodput: the engine rests while the step runs
        return GuardDecision(
            True, max(1, x.total_threads), 0.0, "only late requests: training takes their turn"
        )
    if backfill:  # woken by the engine when it goes idle; the recheck is a safety net
        return GuardDecision(False, 0, IDLE_RECHECK_S, "backfill waits for an idle replica")
    if x.behind_schedule:
        # Under sustained load a waiting request is always at risk, and yielding to it every
        # time would cancel the round's plan instead of slowing it. Serving lends the share.
        return GuardDecision(
            True,
            shared_threads(x.total_threads),
            0.0,
            "behind the round's plan: taking the share",
            lend_share=x.training_share,
        )
    # A step started now gives way to a waiting request at its next layer, but a request
    # already close to its TTFT SLO (or a slow decode) is left all the machine.
    if x.queue_depth > 0 and x.oldest_waiting_s > margin * x.ttft_slo_s:
        return GuardDecision(False, 0, _recheck_s(x), "TTFT at risk")
    if x.running > 0 and x.decode_step_s > margin * x.tpot_slo_s:
        return GuardDecision(False, 0, _recheck_s(x), "TPOT at risk")
    # Serving keeps its own core; training takes the rest (its steps wait while serving works).
    return GuardDecision(True, shared_threads(x.total_threads), 0.0, "within share and SLOs")


def shared_threads(total_threads: int) -> int:
    """Threads a training step gets while serving has work: all but serving's own (at least
    one). A step behind its round's plan runs on these, so its plan is costed at them."""
    return max(1, total_threads - 1)


def behind_schedule(
    planned_left: int,
    step_s: float,
    share: float,
    time_left_s: float,
    margin: float = 0.8,
    early: bool = False,
) -> bool:
    """Whether ``planned_left`` steps of ``step_s`` at training share ``share`` need at least
    ``margin`` of the ``time_left_s`` before the deadline (False with nothing planned left or a
    share of 0). The margin starts a plan on borrowed time a little before its latest start, as
    step times vary and the trainer decides only between steps.

    Before any step is timed (``step_s`` 0) the plan's cost is unknown, and waiting for an idle
    moment to learn it can take the whole round under load: the first step counts as behind.

    ``early``: the plan borrows from the round's start, not as late as it can (replica
    ``--lend-early``): behind whenever planned steps are left, so the round's version comes as
    soon as the share allows — at the cost of serving during the first part of the round.
    """
    if planned_left <= 0 or share <= 0:
        return False
    if step_s <= 0 or early:
        return True
    return planned_left * step_s / share >= margin * time_left_s


def _recheck_s(x: GuardInputs) -> float:
    """How long a trainer yielding to serving waits before deciding again (unless woken)."""
    return min(IDLE_RECHECK_S, max(MIN_RECHECK_S, x.train_step_s))
