"""Request routing: which replica should serve this request? (the short-timescale policy)

Pure functions of what the gateway measures, so the live gateway, the tests and the simulator run
the same code. The latency model is a deliberately simple queueing model of a continuous-batching
replica with ``B`` batch slots and ``L`` requests already on it:

- **Load** ``L = in_flight + max(0, queue_depth + running − in_flight_at_poll)``: the gateway's
  own count is live; the replica's report is up to one poll old, so only what it reported beyond
  the gateway's requests it may hold (those in flight when it came, and those that ended while
  it was on its way) is added: clients that bypass the gateway. A report taken as is would hold
  a drained burst against the replica until the next poll.
- **Decode step** ``step(b) = base_tpot · (1 + batch_slowdown · (b − 1)) · (1 + interference ·
  training_share)``: a batched step costs a little more per extra row (SmolLM2 on 2 CPU cores: a
  batch of 8 steps 1.7× slower than a batch of 1, i.e. ``batch_slowdown ≈ 0.1``), and a replica
  that trains while serving is slower by its training share (the SLO guard bounds it).
- **TPOT** ``= step(min(L + 1, B))``: the step time once this request has joined the batch.
- **TTFT** ``= (base_ttft + prompt_tokens · prefill_s_per_token) · (1 + interference · share)
  + queued_prefill_factor · (P · base_ttft + A · prefill_s_per_token) · (1 + interference · share)
  + step(min(L, B)) [if L > 0] + max(W − 1, 0) · step(B)``: prefill; the prefills of the ``P``
  requests the gateway sent that have not had their first token yet, ``A`` prompt tokens in all
  (a replica prefills what waits before, or batched with, a newcomer: under a burst that, not the
  decode batch, is what a request sent there waits for; batched, each costs a little less than
  on its own); the
  running step a new request waits out before it joins the batch, and — when the batch is full —
  the rest of the ``W`` decode steps (the running one among them) until a slot frees for it
  (:func:`queue_wait_steps`): the oldest ``B`` requests hold the slots until
  their remaining tokens are out, each queued request ahead of it takes the first slot to free
  for its own tokens, and it gets the next. The gateway knows each request's remaining tokens
  (``max_tokens`` less those streamed); requests it did not send count the mean of those on
  that replica, or the chat default ``max_tokens`` when it has none
  (:func:`typical_remaining_tokens`), never the newcomer's own ``max_tokens``: its length does not
  delay its first token. A burst admitted together frees its slots together, which an average
  rate would miss.

``base_ttft`` and ``base_tpot`` are learned per replica by the gateway (EWMAs normalised back to
an unloaded, non-training replica with :func:`unloaded_tpot` / :func:`unloaded_ttft`), with priors
until the first observation.

**Admission control** (opt-in, :func:`admission_decision`): under a burst, a request that would wait
behind full batches misses its TTFT SLO anyway and delays every later arrival, so when even the best
replica's predicted TTFT exceeds ``shed_factor × slo.ttft_s`` the gateway refuses it at once (503,
Retry-After) instead. The prediction is the one :func:`choose_replica` ranks by, without the penalty
for recent failures: that is a routing preference, not time the request would wait (a request shed
never reaches a replica, so nothing would clear it). It never sheds on priors alone: before any
replica the request may go to has been measured the queueing term rests on a guessed TPOT, and
refusing real traffic on a guess could also stop the gateway from ever measuring.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace

from collm_fl.api.schemas import DEFAULT_MAX_TOKENS_CHAT
from collm_fl.errors import ConfigError
from collm_fl.replica.metrics import SLO


@dataclass(frozen=True)
class ReplicaView:
    """What the gateway knows about one replica at the moment of a routing decision."""

    name: str
    healthy: bool  # /health answered recently (and the last proxied connect succeeded)
    queue_depth: int = 0  # replica-reported: waiting for admission (as of the last poll)
    running: int = 0  # replica-reported: being decoded (as of the last poll)
    in_flight: int = 0  # gateway-counted: sent to this replica and not finished
    in_flight_tokens: int = 0  # output tokens the gateway still expects from those requests
    # The gateway's in_flight when the last report (queue_depth, running) came; None: unknown,
    # then the load is the larger of the two counts.
    in_flight_at_poll: int | None = None
    # Each in-flight request's output tokens still expected, oldest first (None: unknown, the
    # mean in_flight_tokens / in_flight is used)
    remaining_tokens: tuple[int, ...] | None = None
    training_share: float = 0.0  # compute share of training while a training job runs (else 0)
    ewma_ttft_s: float | None = None  # unloaded TTFT learned from proxied responses (None: prior)
    ewma_tpot_s: float | None = None  # unloaded per-token time at batch 1 (None: prior)
    max_batch: int | None = None  # batch slots of the replica, if it reports them
    consecutive_failures: int = 0  # failed proxied requests since the last success
    last_error_age_s: float | None = None  # seconds since the last failure (None: never)
    # The gateway's count of requests sent (to any replica) when it last sent this one a request
    # (0: never): ties go to the least recently routed, so idle replicas take turns
    last_routed: int = 0
    # The gateway's streamed requests on it without their first token yet: prefills ahead of a
    # new one (a JSON reply shows no first token, so it is not counted)
    prefills_ahead: int = 0
    prompt_tokens_ahead: int = 0  # the prompt tokens of those prefills


@dataclass(frozen=True)
class Prediction:
    ttft_s: float  # predicted time to first token
    tpot_s: float  # predicted time per output token after the first


@dataclass(frozen=True)
class LatencyModel:
    """Constants of the queueing model (priors until the gateway has measured a replica)."""

    prior_ttft_s: float = 0.05  # unloaded TTFT before any observation
    prior_tpot_s: float = 0.02  # per-token time at batch 1 before any observation
    default_max_batch: int = 8  # `collm replica --max-batch-size` default
    batch_slowdown: float = 0.1  # relative step-time growth per extra row in the batch
    training_interference: float = 0.5  # slowdown per unit of training share (while training)
    prefill_s_per_token: float = 0.0002  # prompt cost; the gateway has no tokenizer (chars/4)
    # A prefill still ahead on the replica costs this share of its unloaded TTFT (batched: SmolLM2
    # on one core prefilled 7 prompts of 64 tokens at once in 1.42 s, one in 0.267 s: each of
    # the 6 more cost 0.72 of one).
    queued_prefill_factor: float = 0.7
    tie_tolerance_s: float = 0.01  # TTFTs closer than max(this, tie_tolerance_frac·best) tie
    tie_tolerance_frac: float = 0.1
    failure_penalty_s: float = 0.5  # added TTFT per consecutive failure ...
    failure_memory_s: float = 10.0  # ... fading out linearly over this many seconds
    # A replica whose last this-many proxied requests failed, while the penalty has not faded,
    # does not count as meeting the SLO (see :func:`is_failing`).
    failing_streak: int = 5
    # The output tokens a request the gateway did not send is taken to have left when the gateway
    # has none of its own on that replica to go by (see :func:`typical_remaining_tokens`)
    default_remaining_tokens: int = DEFAULT_MAX_TOKENS_CHAT


DEFAULT_LATENCY_MODEL = LatencyModel()
MAX_RETRY_AFTER_S = 60  # a shed request's Retry-After at most (a prediction is no promise)


def batch_factor(batch: int, model: LatencyModel = DEFAULT_LATENCY_MODEL) -> float:
    """Decode-step time of a batch of ``batch`` rows relative to a batch of one."""
    return 1.0 + model.batch_slowdown * max(batch - 1, 0)


def interference_factor(
    training_share: float, model: LatencyModel = DEFAULT_LATENCY_MODEL
) -> float:
    """Slowdown of serving while training takes ``training_share`` of the replica."""
    return 1.0 + model.training_interference * min(max(training_share, 0.0), 1.0)


def load_of(view: ReplicaView) -> int:
    """Requests already on the replica (see the module docstring)."""
    return current_load(view.in_flight, view.queue_depth + view.running, view.in_flight_at_poll)


def current_load(in_flight: int, reported: int, in_flight_at_poll: int | None) -> int:
    """The gateway's live count plus what the replica reported beyond it at the last poll
    (``in_flight_at_poll`` None: the larger of the two, never double-counting)."""
    if in_flight_at_poll is None:
        return max(in_flight, reported)
    return in_flight + max(0, reported - in_flight_at_poll)


def queue_wait_steps(
    remaining: Sequence[int], load: int, capacity: int, external_tokens: int
) -> int:
    """Decode steps until a slot frees for a new request behind ``load`` requests on ``capacity``
    slots (0 when one is free now).

    ``remaining``: the output tokens each request the gateway sent still has to produce, oldest
    first; the oldest ``capacity`` of the ``load`` hold the slots, the rest wait in order, and the
    requests the gateway did not send (``load`` beyond ``remaining``) are taken to wait behind
    them with ``external_tokens`` each (:func:`typical_remaining_tokens`; not the new request's
    ``max_tokens``, which would make a long request wait longer behind the same work). Each
    waiting request takes the first slot to free and holds it for its own tokens; the new one
    gets the slot that frees after them.
    """
    if load < capacity:
        return 0
    tokens = [max(int(r), 1) for r in remaining[:load]]
    tokens += [max(external_tokens, 1)] * (load - len(tokens))
    frees = sorted(tokens[:capacity])  # the step at which each slot frees
    heapq.heapify(frees)
    for own in tokens[capacity:]:  # each queued request ahead, in order
        heapq.heappush(frees, heapq.heappop(frees) + own)
    return frees[0]


def capacity_of(view: ReplicaView, model: LatencyModel = DEFAULT_LATENCY_MODEL) -> int:
    return max(1, view.max_batch or model.default_max_batch)


def typical_remaining_tokens(
    view: ReplicaView, model: LatencyModel = DEFAULT_LATENCY_MODEL
) -> float:
    """The output tokens a request on ``view`` is taken to have left when the gateway does not
    know (one it did not send): the mean of the gateway's own in-flight requests there, else
    ``model.default_remaining_tokens``. Independent of any new request's ``max_tokens``."""
    if view.remaining_tokens:
        return sum(view.remaining_tokens) / len(view.remaining_tokens)
    if view.in_flight > 0:
        return view.in_flight_tokens / view.in_flight
    return float(model.default_remaining_tokens)


def predict_latency(
    view: ReplicaView,
    prompt_tokens: int,
    max_tokens: int,
    model: LatencyModel = DEFAULT_LATENCY_MODEL,
) -> Prediction:
    """Predicted TTFT and TPOT of a new request sent to ``view`` now (module docstring).

    ``max_tokens`` does not change the prediction: a request's own length does not delay its
    first token, and the requests ahead of it the gateway did not send are counted at
    :func:`typical_remaining_tokens`, not at the newcomer's length (which predicted a request for
    4096 tokens to wait ~250× longer than one for 16 behind the same work, and shed it)."""
    load, cap = load_of(view), capacity_of(view, model)
    slow = interference_factor(view.training_share, model)
    base_tpot = view.ewma_tpot_s if view.ewma_tpot_s is not None else model.prior_tpot_s
    base_ttft = view.ewma_ttft_s if view.ewma_ttft_s is not None else model.prior_ttft_s

    def step(batch: int) -> float:
        return base_tpot * batch_factor(batch, model) * slow

    # its prefill after the running step, then it joins the batch ...
    ttft = admitted_ttft(
        base_ttft,
        base_tpot,
        prompt_tokens,
        load,
        cap,
        view.training_share,
        model,
        view.prefills_ahead,
        view.prompt_tokens_ahead,
    )
    if load >= cap:
        typical = typical_remaining_tokens(view, model)
        if view.remaining_tokens is not None:
            wait = float(queue_wait_steps(view.remaining_tokens, load, cap, round(typical)))
        else:  # no per-request counts: a slot frees about every (mean remaining) / cap steps
            wait = (load + 1 - cap) * max(typical, 1.0) / cap
        # The first of those steps is the running one, already in ``ttft``.
        ttft += max(wait - 1.0, 0.0) * step(cap)
    return Prediction(ttft_s=ttft, tpot_s=step(min(load + 1, cap)))


def failure_penalty_s(view: ReplicaView, model: LatencyModel = DEFAULT_LATENCY_MODEL) -> float:
    """Extra TTFT charged to a replica that failed recently (fades over ``failure_memory_s``)."""
    if view.consecutive_failures <= 0 or view.last_error_age_s is None:
        return 0.0
    fade = 1.0 - view.last_error_age_s / model.failure_memory_s
    return model.failure_penalty_s * view.consecutive_failures * max(fade, 0.0)


def is_failing(view: ReplicaView, model: LatencyModel = DEFAULT_LATENCY_MODEL) -> bool:
    """Whether ``view`` failed its last ``model.failing_streak`` (or more) proxied requests and
    its penalty has not faded: it answers /health but fails what it is sent (a wrong replica key,
    a broken model), so :func:`choose_replica` does not count it as meeting the SLO."""
    return view.consecutive_failures >= model.failing_streak and failure_penalty_s(view, model) > 0


@dataclass(frozen=True)
class Shed:
    """Why :func:`admission_decision` refused a request: even the best replica is too slow."""

    replica: str  # the healthy replica with the lowest predicted TTFT
    predicted_ttft_s: float  # its predicted TTFT (without the failure penalty)
    shed_factor: float
    ttft_slo_s: float

    @property
    def limit_s(self) -> float:
        return self.shed_factor * self.ttft_slo_s

    @property
    def retry_after_s(self) -> int:
        """Whole seconds until the work ahead would have drained to the limit (1 to 60): the
        503's Retry-After, so that clients that honour it do not come back into the backlog."""
        return min(MAX_RETRY_AFTER_S, max(1, math.ceil(self.predicted_ttft_s - self.limit_s)))

    @property
    def reason(self) -> str:
        return (
            f"request shed: its predicted TTFT {self.predicted_ttft_s:.3g} s (on the best replica, "
            f"{self.replica}) exceeds shed-factor × TTFT SLO = {self.shed_factor:g} × "
            f"{self.ttft_slo_s:g} s = {self.limit_s:.3g} s"
        )


def check_shed_factor(shed_factor: float) -> None:
    """ConfigError unless ``shed_factor`` is 0 (off) or a finite number >= 1: below 1 the gateway
    would refuse requests that are predicted to meet their TTFT SLO."""
    if not (shed_factor == 0 or 1 <= shed_factor < math.inf):  # NaN too
        raise ConfigError(
            f"--shed-factor must be 0 (off) or a finite number >= 1, got {shed_factor}"
        )


def admission_decision(
    views: Sequence[ReplicaView],
    prompt_tokens: int,
    max_tokens: int,
    slo: SLO,
    shed_factor: float,
    exclude: Collection[str] = (),
    model: LatencyModel = DEFAULT_LATENCY_MODEL,
) -> Shed | None:
    """A :class:`Shed` when the request should be refused now, else None (admit it).

    Refused when ``shed_factor > 0`` and every healthy, non-excluded replica's predicted TTFT (as
    :func:`choose_replica` predicts it, peer estimates filled in, without the failure penalty)
    exceeds ``shed_factor · slo.ttft_s``. ``shed_factor == 0`` turns shedding off. Never refused
    while none of those replicas has a measured latency (the prediction would be priors only, or
    another model's), nor when none is left (that is the caller's "unavailable", not a
    prediction).
    """
    if shed_factor <= 0:
        return None
    candidates = _candidates(views, exclude)
    if all(v.ewma_ttft_s is None and v.ewma_tpot_s is None for v in candidates):
        return None
    predicted = [
        (predict_latency(v, prompt_tokens, max_tokens, model).ttft_s, v.name)
        for v in with_peer_estimates(candidates)
    ]
    ttft, best = min(predicted)
    if ttft <= shed_factor * slo.ttft_s:
        return None
    return Shed(best, ttft, shed_factor, slo.ttft_s)


def _candidates(views: Sequence[ReplicaView], exclude: Collection[str]) -> list[ReplicaView]:
    """The healthy replicas not excluded (other models, or already tried for this request)."""
    return [v for v in views if v.healthy and v.name not in exclude]


def _scored(
    views: Sequence[ReplicaView],
    prompt_tokens: int,
    max_tokens: int,
    exclude: Collection[str],
    model: LatencyModel,
) -> list[tuple[float, float, float, ReplicaView]]:
    """(predicted TTFT, the failure penalty, TPOT, view) of each healthy, non-excluded replica
    (peer estimates from those replicas alone: an excluded one may serve another model)."""
    scored: list[tuple[float, float, float, ReplicaView]] = []
    for v in with_peer_estimates(_candidates(views, exclude)):
        p = predict_latency(v, prompt_tokens, max_tokens, model)
        scored.append((p.ttft_s, failure_penalty_s(v, model), p.tpot_s, v))
    return scored


def choose_replica(
    views: Sequence[ReplicaView],
    prompt_tokens: int,
    max_tokens: int,
    slo: SLO,
    exclude: Collection[str] = (),
    model: LatencyModel = DEFAULT_LATENCY_MODEL,
) -> str | None:
    """The replica to send a request to, or None when no healthy one is left.

    Among healthy, non-excluded replicas: those predicted to meet both SLOs come first (by the
    prediction alone, except that a replica that :func:`is_failing` never counts as meeting them:
    every request sent there would pay a failed attempt first; it is still chosen when none meets
    them and it ranks best). Within that tier the lowest predicted TTFT plus a penalty for recent
    failures wins, where TTFTs within the tie tolerance count as equal and then: a replica not
    training goes first (a request it takes costs no training step its turn; see the
    allocation's turns), then the fewest in-flight requests (measurement noise of a few ms should
    spread load, not pin it), then the least recently routed (so idle replicas take turns instead
    of the first one taking every sequential request, and one back from downtime takes its turn,
    not every request until a lifetime count caught up), then the lower predicted TTFT plus
    penalty, then predicted TPOT, then the name. A replica not yet measured is assumed to be like
    the measured ones (they serve the same base model), so a fresh replica is neither shunned nor
    flooded because of a prior.
    """
    # Whether it meets the SLOs is its prediction's; the penalty only ranks (a replica that
    # refused a burst's requests a second ago is not predicted slower for it) — unless its
    # streak says it fails whatever it is sent.
    scored = [
        (
            ttft <= slo.ttft_s and tpot <= slo.tpot_s and not is_failing(v, model),
            ttft + penalty,
            tpot,
            v,
        )
        for ttft, penalty, tpot, v in _scored(views, prompt_tokens, max_tokens, exclude, model)
    ]
    if not scored:
        return None
    if any(meets for meets, *_ in scored):
        scored = [s for s in scored if s[0]]
    best = min(ttft for _, ttft, _, _ in scored)
    tolerance = max(model.tie_tolerance_s, model.tie_tolerance_frac * best)
    near = [s for s in scored if s[1] <= best + tolerance]
    _, _, _, chosen = min(
        near,
        key=lambda s: (
            s[3].training_share > 0,  # (a view's share is 0 unless a training job runs)
            s[3].in_flight,
            s[3].last_routed,
            s[1],
            s[2],
            s[3].name,
        ),
    )
    return chosen.name


def with_peer_estimates(views: Sequence[ReplicaView]) -> list[ReplicaView]:
    """``views`` with unmeasured EWMAs filled in by the mean of the measured replicas."""
    ttfts = [v.ewma_ttft_s for v in views if v.ewma_ttft_s is not None]
    tpots = [v.ewma_tpot_s for v in views if v.ewma_tpot_s is not None]
    ttft = sum(ttfts) / len(ttfts) if ttfts else None
    tpot = sum(tpots) / len(tpots) if tpots else None
    return [
        replace(
            v,
            ewma_ttft_s=ttft if v.ewma_ttft_s is None else v.ewma_ttft_s,
            ewma_tpot_s=tpot if v.ewma_tpot_s is None else v.ewma_tpot_s,
        )
        for v in views
    ]


def unloaded_tpot(
    observed_tpot_s: float,
    batch: int,
    training_share: float,
    model: LatencyModel = DEFAULT_LATENCY_MODEL,
) -> float:
    """An observed TPOT normalised back to batch 1 on a non-training replica (for the EWMA)."""
    return observed_tpot_s / (
        batch_factor(batch, model) * interference_factor(training_share, model)
    )


def _prefill_work(
    prompt_tokens: int, prefills_ahead: int, prompt_tokens_ahead: int, model: LatencyModel
) -> tuple[float, float]:
    """What stands before a request's first token besides the running step: (how many idle TTFTs,
    how many prompt tokens to prefill) — its own and ``queued_prefill_factor`` of each prefill
    ahead (shared by :func:`admitted_ttft` and its inverse :func:`unloaded_ttft`)."""
    share = model.queued_prefill_factor
    return (
        1.0 + share * max(prefills_ahead, 0),
        max(prompt_tokens, 0) + share * max(prompt_tokens_ahead, 0),
    )


def admitted_ttft(
    base_ttft_s: float,
    base_tpot_s: float,
    prompt_tokens: int,
    load_at_send: int,
    capacity: int,
    training_share: float,
    model: LatencyModel = DEFAULT_LATENCY_MODEL,
    prefills_ahead: int = 0,
    prompt_tokens_ahead: int = 0,
) -> float:
    """The TTFT of a request admitted on arrival (the inverse of :func:`unloaded_ttft`): the idle
    TTFT plus its prompt's prefill and the ``prefills_ahead`` (``prompt_tokens_ahead`` tokens in
    all) still to be done before it, slowed by training, after the running step."""
    slow = interference_factor(training_share, model)
    step = base_tpot_s * batch_factor(min(load_at_send, capacity), model) * slow
    ttfts, tokens = _prefill_work(prompt_tokens, prefills_ahead, prompt_tokens_ahead, model)
    ttft = (base_ttft_s * ttfts + tokens * model.prefill_s_per_token) * slow
    return ttft + (step if load_at_send else 0.0)


def unloaded_ttft(
    observed_ttft_s: float,
    prompt_tokens: int,
    load_at_send: int,
    capacity: int,
    base_tpot_s: float,
    training_share: float,
    model: LatencyModel = DEFAULT_LATENCY_MODEL,
    prefills_ahead: int = 0,
    prompt_tokens_ahead: int = 0,
) -> float | None:
    """An observed TTFT normalised to an idle replica, or None when the request had queued.

    A request that found the batch full waited for an unknowable slot release, so it says little
    about the replica's own TTFT; the gateway learns only from requests admitted on arrival. The
    ``prefills_ahead`` it was sent behind (``prompt_tokens_ahead`` tokens) are taken out as
    :func:`admitted_ttft` puts them in.
    """
    if load_at_send + 1 > capacity:
        return None
    slow = interference_factor(training_share, model)
    step = base_tpot_s * batch_factor(load_at_send, model) * slow if load_at_send else 0.0
    ttfts, tokens = _prefill_work(prompt_tokens, prefills_ahead, prompt_tokens_ahead, model)
    base = (observed_ttft_s - step) / slow - tokens * model.prefill_s_per_token
    return max(base / ttfts, 0.0)
