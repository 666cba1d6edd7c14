"""Admission order inside a replica: which waiting requests join the batch at this step?

Goodput counts a request only when its first token comes within the TTFT SLO. First come, first
served (vLLM's default, and what the baselines of ``collm bench goodput`` run) fails that under a
burst in two ways: every request of the burst is prefilled in one batch, so all of them wait for
the whole batch and miss together; and once a backlog forms, requests that can no longer meet
their SLO are served ahead of fresh ones that still could, so the miss spreads to everyone after
them. The ``"slo"`` order fixes both, and never refuses or drops a request:

1. **Overdue first.** A request that has waited ``defer_limit_s`` or longer goes before anything
   else (oldest first): deferring never turns a late answer into a client timeout.
2. **Those that can still make it, within the TTFT budget.** Oldest first, a request whose wait
   plus its own prefill fits in ``margin × ttft_slo_s`` joins the prefill batch, as long as the
   whole batch's predicted prefill time still lets every member already in it meet its SLO (one
   batched prefill delays each member's first token until the whole batch is done). The rest wait
   for the next step — by then some may have become late.
3. **Late ones fill the rows of a step that admits nobody else.** A request that can no longer
   meet its TTFT SLO is admitted (oldest first, overdue ones aside) only at a step where no
   request that can still make it is admitted or left waiting: in a batch with fresh ones, its
   prompt would lengthen their prefill (and with it their first tokens). It is answered, just
   not first.

A like notion of late tells the replica when its work earns no goodput (:func:`only_late`):
while every request it holds is late — a waiting one by its wait alone — and none overdue, a
co-executed training step may take the core (``InferenceEngine.want_late_turn``) — that time is
lost to goodput either way.

A batched prefill's time is predicted as affine in the tokens it computes (:class:`PrefillCost`):
a fixed part per forward plus a part per token, the batch left-padded to its longest prompt, as
the engine runs it, and never below the largest recent prefill's seconds per token. Fitted from
the engine's own prefills (:class:`PrefillFit`). A cost per token alone, learned from prompts
prefilled one at a time, carries each one's share of the fixed part, and so overestimates every
prompt added to a batch: a burst was split into turns too small, and the ones left for the next
turn missed (SmolLM2-135M on one core fits 21.8 ms per forward plus 2.20 ms per token, where a
single 64-token prompt reads as 2.99 ms per token:
``docs/bench/goodput-light-checks/prefill_fit.py``, its output beside it).

With nothing timed yet (a zero cost) the order is first come, first served and the whole batch's
free rows are filled, as with ``"fcfs"``. Pure functions of their inputs (the house style's rule
for policies), so the engine, the tests and a simulator run the same code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

SCHEDULES = ("slo", "fcfs")
DEFAULT_DEFER_LIMIT_S = 30.0  # "slo": no request waits longer than this for its turn
DEFAULT_MARGIN = 0.9  # of the TTFT SLO: the HTTP path and a gateway hop add a little on top
FIT_DECAY = 0.8  # PrefillFit: the weight an older prefill keeps with each newer one
# PrefillFit: the fixed part is fitted only once the timed sizes spread this much (coefficient
# of variation); over sizes all alike it cannot be told from the part per token.
MIN_SPREAD = 0.1


@dataclass(frozen=True)
class Waiting:
    """One request waiting for admission, as the engine sees it."""

    age_s: float  # since it reached the replica
    prompt_tokens: int


@dataclass(frozen=True)
class PrefillCost:
    """Predicted seconds of one batched prefill of ``tokens`` (the padded batch: rows × longest
    prompt, as the engine computes it): ``fixed_s + per_token_s × tokens``, and never less than
    ``floor_s_per_token × tokens``.

    The floor is the seconds per token of the largest prefill timed lately. The line is fitted
    where the timed sizes are; beyond them it may fall short: prompts timed one at a time fit a
    slope below what a large batch costs per token (SmolLM2 on one core: 32-, 64- and 128-token
    prompts alone fit 81 ms + 1.67 ms a token, which puts 8 × 64 tokens at 0.94 s where they took
    1.18 s), and an underestimate lets a burst into one prefill that misses together. Seconds per
    token fall as a prefill grows, so the largest one's rate is a floor for any larger batch."""

    fixed_s: float = 0.0
    per_token_s: float = 0.0
    floor_s_per_token: float = 0.0

    @property
    def known(self) -> bool:
        """Whether anything has been timed (a zero cost means first come, first served)."""
        return self.per_token_s > 0.0 or self.fixed_s > 0.0 or self.floor_s_per_token > 0.0

    def batch_s(self, rows: int, longest: int) -> float:
        """Seconds to prefill ``rows`` prompts of at most ``longest`` tokens together."""
        if not rows:
            return 0.0
        tokens = rows * longest
        return max(self.fixed_s + self.per_token_s * tokens, self.floor_s_per_token * tokens)


@dataclass(frozen=True)
class PrefillFit:
    """Least squares of prefill seconds on padded tokens, the older prefills weighing less
    (each newer one multiplies their weight by :data:`FIT_DECAY`): sums, one update per prefill.

    :meth:`cost` is the affine fit when the timed sizes spread enough to tell a fixed part from a
    part per token, and it comes out with both parts non-negative; else the cost per token
    through the origin (what one prompt at a time can tell). Its floor is the seconds per token
    of the largest prefill timed lately: a size shrinks by :data:`FIT_DECAY` with each newer
    prefill, and a newer one at least that large takes its place."""

    n: float = 0.0  # the weights' sum
    x: float = 0.0  # weighted sums of tokens, seconds, tokens², tokens × seconds
    y: float = 0.0
    xx: float = 0.0
    xy: float = 0.0
    largest: float = 0.0  # the largest recent prefill's tokens (shrunk with age) ...
    largest_rate: float = 0.0  # ... and its seconds per token

    def add(self, tokens: int, seconds: float) -> PrefillFit:
        d, x, y = FIT_DECAY, float(tokens), seconds
        largest, rate = d * self.largest, self.largest_rate
        if x >= largest and x > 0:
            largest, rate = x, y / x
        return PrefillFit(
            d * self.n + 1,
            d * self.x + x,
            d * self.y + y,
            d * self.xx + x * x,
            d * self.xy + x * y,
            largest,
            rate,
        )

    def cost(self) -> PrefillCost:
        if self.n <= 0.0 or self.x <= 0.0:
            return PrefillCost()
        proportional = PrefillCost(0.0, self.y / self.x, self.largest_rate)
        var = self.n * self.xx - self.x * self.x  # n² × the weighted variance of tokens
        if var <= (MIN_SPREAD * self.x) ** 2:
            return proportional
        slope = (self.n * self.xy - self.x * self.y) / var
        fixed = (self.y - slope * self.x) / self.n
        if slope <= 0.0 or fixed < 0.0:
            return proportional
        return PrefillCost(fixed, slope, self.largest_rate)


@dataclass(frozen=True)
class Running:
    """One admitted request (its first token sent), as the engine sees it."""

    age_s: float  # since it reached the replica
    ttft_s: float  # when its first token came, seconds after it reached the replica


def is_late(
    w: Waiting, cost: PrefillCost, ttft_slo_s: float, margin: float = DEFAULT_MARGIN
) -> bool:
    """Whether waiting request ``w`` can no longer meet its TTFT SLO: its wait plus its own
    prefill, alone, exceed ``margin × ttft_slo_s``."""
    return w.age_s + cost.batch_s(1, w.prompt_tokens) > margin * ttft_slo_s


def only_late(
    waiting: Sequence[Waiting],
    running: Sequence[Running],
    ttft_slo_s: float,
    defer_limit_s: float,
    margin: float = DEFAULT_MARGIN,
) -> bool:
    """Whether serving's work now earns no goodput: at least one request, every waiting one has
    waited past ``margin × ttft_slo_s``, every running one got its first token after the SLO,
    and none has waited ``defer_limit_s`` or longer (an overdue request is never put off:
    deferring must not turn a late answer into a client timeout).

    A waiting request counts by its wait alone, not by :func:`is_late`'s wait plus predicted
    prefill: the engine rests while this holds, so a request judged late on arrival by a prefill
    estimate would wait out the rest unprefilled and the prediction would come true (a prefill
    timed beside a training step inflates the estimate; in one light-load run both replicas
    rested 14 s and a fresh burst waited 16.5 s for its first token)."""
    if not waiting and not running:
        return False
    if any(r.age_s >= defer_limit_s or r.ttft_s <= ttft_slo_s for r in running):
        return False
    return all(defer_limit_s > w.age_s > margin * ttft_slo_s for w in waiting)


def admission_order(
    waiting: Sequence[Waiting],
    free_rows: int,
    cost: PrefillCost,
    ttft_slo_s: float,
    defer_limit_s: float,
    margin: float = DEFAULT_MARGIN,
) -> list[int]:
    """Indices into ``waiting`` (ordered oldest first) to admit now, in admission order."""
    if free_rows <= 0 or not waiting:
        return []
    order = sorted(range(len(waiting)), key=lambda i: -waiting[i].age_s)  # oldest first
    if not cost.known:
        return order[:free_rows]
    budget = margin * ttft_slo_s
    overdue = [i for i in order if waiting[i].age_s >= defer_limit_s]
    chosen = overdue[:free_rows]
    longest = max((waiting[i].prompt_tokens for i in chosen), default=0)
    # The tightest deadline among the admitted that can still meet theirs: the batch's prefill
    # must end before it. (Overdue requests are late by definition and set no deadline.)
    slack = float("inf")
    late: list[int] = []
    blocked = False  # someone who can still make it waits for the next step
    for i in order:
        if i in chosen:
            continue
        w = waiting[i]
        if is_late(w, cost, ttft_slo_s, margin):
            late.append(i)
            continue
        if len(chosen) >= free_rows:
            blocked = True
            break
        batch_s = cost.batch_s(len(chosen) + 1, max(longest, w.prompt_tokens))
        # Its own deadline in is_late's form (not batch_s > budget - age: in floating point the
        # two can disagree, and a first request is_late let through would then never be admitted).
        if w.age_s + batch_s > budget or batch_s > slack:
            blocked = True
            continue  # a shorter prompt further back may still fit
        chosen.append(i)
        longest = max(longest, w.prompt_tokens)
        slack = min(slack, budget - w.age_s)
    if not blocked and len(chosen) == len(overdue[:free_rows]):
        # Nobody who can still make it is waiting or joins this step's prefill (a late prompt
        # beside theirs would delay their first tokens): the late ones take the spare rows.
        chosen += late[: free_rows - len(chosen)]
    return chosen
