"""The gateway's view of its replicas: health polling, in-flight accounting and learned latencies.

A background task per replica polls its ``/health`` (queue depth, running requests, training state,
adapter version, model), each at its own cadence, so one replica hanging on ``/health`` does not
slow the checks of the others. A replica whose polls fail is marked unhealthy (it gets no new
requests). Only one that is there but stuck (its ``/health`` times out or errors) also has the
requests in flight on it abandoned (:meth:`Ticket.abandon`), so that it does not hold its clients
until the read timeout; one that refuses connections has closed its listener (it is draining after
SIGTERM, and finishes what it has) or is gone (and its open connections broke, which the relay
handles), so its requests are left to end on their own. The gateway itself counts what it has sent
to each replica and learns each replica's unloaded TTFT/TPOT (EWMAs) from the responses it proxies:
a stream's from its events' arrival, a JSON reply's from the replica's ``Server-Timing`` header.
:meth:`ReplicaPool.views` turns all of it into the :class:`ReplicaView` list the routing policy
reads.

Everything runs on the gateway's event loop: no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

from collm_fl.api.urls import normalize_url
from collm_fl.errors import ConfigError
from collm_fl.policies.routing import (
    DEFAULT_LATENCY_MODEL,
    LatencyModel,
    ReplicaView,
    admitted_ttft,
    current_load,
    unloaded_tpot,
    unloaded_ttft,
)

log = logging.getLogger(__name__)

# A learned latency not refreshed for this long is forgotten (the replica is then assumed like its
# peers): a replica that one bad burst made look slow would otherwise never be sent the requests
# that could show it is fast again. Not while requests are in flight on it: those will refresh it,
# and under sustained overload (every request queued, which teaches nothing) forgetting would
# make a saturated replica look idle to routing and admission control.
ESTIMATE_TTL_S = 15.0


@dataclass
class _Replica:
    name: str
    url: str
    healthy: bool = False
    poll_failures: int = 0  # consecutive failed /health polls
    stuck_polls: int = 0  # consecutive failed polls that were not refused (the replica is stuck)
    queue_depth: int = 0
    running: int = 0
    training_share: float = 0.0
    training: bool = False
    max_batch: int | None = None
    adapter_version: int | None = None
    model: str | None = None
    in_flight: int = 0
    in_flight_tokens: int = 0
    # The gateway's requests the last report (queue_depth, running) may hold: those in flight
    # when it came, and those that ended while it was on its way.
    in_flight_at_poll: int | None = None
    ended: int = 0  # the gateway's requests to it that have ended, ever
    ewma_ttft_s: float | None = None
    ewma_tpot_s: float | None = None
    ttft_learned_at: float | None = None  # clock() of the last TTFT / TPOT sample
    tpot_learned_at: float | None = None
    consecutive_failures: int = 0  # failed proxied requests since the last success
    failed_at: float | None = None  # the last failed proxied request (its penalty fades from it)
    last_error_at: float | None = None  # the last error of any kind (/health polls too)
    last_error: str | None = None
    routed: int = 0
    last_routed: int = 0  # the pool's send count when it last sent this one a request (0: never)
    # The requests in flight on it, oldest first (sent in clock order; a dict keeps that order
    # and drops an ended one in O(1))
    tickets: dict[Ticket, None] = field(default_factory=dict)


@dataclass(eq=False)  # compared and hashed by identity: the pool keeps the open ones in a dict
class Ticket:
    """One request on one replica, from sending it to its end (see :meth:`ReplicaPool.begin`)."""

    replica: str
    prompt_tokens: int
    sent_at: float
    load_at_send: int  # requests already on the replica when this one was sent
    capacity: int  # the replica's batch slots
    training_share: float  # the replica's effective training share when sent
    remaining: int  # output tokens still expected
    stream: bool = True  # its first token will be seen (a JSON reply shows none until its end)
    prefills_ahead: int = 0  # the replica's streamed requests without a first token when sent
    prompt_tokens_ahead: int = 0  # their prompt tokens
    first_token_at: float | None = None
    last_token_at: float | None = None
    # Seconds the client held the relay (it read slowly: the gateway could not take the next
    # event meanwhile), in all and as of the first and the last token: not the replica's time.
    held_s: float = 0.0
    held_at_first: float = 0.0
    held_at_last: float = 0.0
    tokens: int = 0  # tokens seen so far (streamed, or a timed JSON reply's count at its end)
    done: bool = False
    abandoned: str | None = None  # why the pool gave up on the replica while this was in flight
    on_abandon: Callable[[], None] | None = None  # set by whoever waits on the replica right now

    def abandon(self, reason: str) -> None:
        """Give up on the replica: whoever waits on it is woken (and fails over or ends)."""
        self.abandoned = reason
        if self.on_abandon is not None:
            self.on_abandon()


def prefills_ahead(r: _Replica) -> tuple[int, int]:
    """``r``'s streamed requests from this gateway that have not had their first token, and
    their prompt tokens."""
    waiting = [t.prompt_tokens for t in r.tickets if t.stream and t.first_token_at is None]
    return len(waiting), sum(waiting)


def replica_name(url: str) -> str:
    """A replica's name: its ``host:port`` (plus path, if any)."""
    parts = urlsplit(url)
    return parts.netloc + parts.path.rstrip("/")


def upstream_gone(e: BaseException) -> bool:
    """Whether ``e`` is a 502 or 503 answer: a reverse proxy (nginx, Caddy) in front of a replica
    that closed its listener (draining) or is gone says so, while it still relays the streams it
    has open; as with a refused connection, nothing in flight is taken for hung."""
    return isinstance(e, httpx.HTTPStatusError) and e.response.status_code in (502, 503)


def connection_refused(e: BaseException) -> bool:
    """Whether ``e`` is a connection the replica's host refused (its listener is closed: a replica
    draining, or its process gone), as opposed to a host that did not answer (unreachable, a DNS
    failure, a timeout), where its open connections may hang."""
    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ConnectionRefusedError):
            return True
        if isinstance(cause, BaseExceptionGroup):  # (anyio: every address tried failed)
            return all(connection_refused(x) for x in cause.exceptions)
        cause = cause.__cause__ or cause.__context__
    return False


# The gateway's connections to its replicas, all of them together (each request in flight holds
# one), and how long a request waits for one when all are taken: then the gateway is the one
# overloaded (a 503 to retry), not the replica it was routed to.
MAX_CONNECTIONS = 1024
POOL_WAIT_S = 1.0


class ReplicaPool:
    """The replicas behind a gateway. :meth:`start` before use and :meth:`close` after."""

    def __init__(
        self,
        urls: Sequence[str],
        poll_interval_s: float = 0.5,
        health_timeout_s: float = 2.0,
        unhealthy_after: int = 2,
        connect_timeout_s: float = 2.0,
        read_timeout_s: float = 300.0,
        stream_stall_timeout_s: float = 60.0,
        ewma_alpha: float = 0.3,
        model: LatencyModel = DEFAULT_LATENCY_MODEL,
        clock: Callable[[], float] = time.monotonic,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        if not urls:
            raise ConfigError("the gateway needs at least one replica URL")
        if poll_interval_s <= 0 or unhealthy_after < 1 or not 0 < ewma_alpha <= 1:
            raise ConfigError("poll_interval_s > 0, unhealthy_after >= 1, 0 < ewma_alpha <= 1")
        if not stream_stall_timeout_s > 0:  # NaN too
            raise ConfigError(f"stream_stall_timeout_s must be > 0, got {stream_stall_timeout_s}")
        self._replicas: dict[str, _Replica] = {}
        for url in urls:
            base = normalize_url(url)
            name = replica_name(base)
            if name in self._replicas:
                raise ConfigError(f"replica {name} is listed twice")
            self._replicas[name] = _Replica(name, base)
        self.poll_interval_s = poll_interval_s
        self.unhealthy_after = unhealthy_after
        self.ewma_alpha = ewma_alpha
        self.model = model
        self.clock = clock
        self.health_timeout = httpx.Timeout(health_timeout_s)  # also quick calls (/v1/models)
        self.max_connections = max_connections
        self._proxy_timeout = httpx.Timeout(
            connect=connect_timeout_s, read=read_timeout_s, write=30.0, pool=POOL_WAIT_S
        )
        # A stream sends an event per token once it has its response headers: one silent for this
        # long is stalled, not busy. (Before its headers it may be queued: the read timeout holds.)
        self.stream_stall_timeout_s = stream_stall_timeout_s
        # httpx's own read timeout must not end a stream before the stall timeout does.
        self.stream_timeout = httpx.Timeout(
            connect=connect_timeout_s,
            read=max(read_timeout_s, stream_stall_timeout_s),
            write=30.0,
            pool=POOL_WAIT_S,
        )
        self._proxy: httpx.AsyncClient | None = None
        self._health: httpx.AsyncClient | None = None
        self._sent = 0  # requests begun on any replica (each replica's last_routed is one)
        self._pollers: list[asyncio.Task[None]] = []

    # ---- lifecycle ----

    async def start(self) -> None:
        """Open the HTTP clients, poll every replica once, then keep polling in the background."""
        limits = httpx.Limits(max_connections=self.max_connections, max_keepalive_connections=64)
        self._proxy = httpx.AsyncClient(timeout=self._proxy_timeout, limits=limits)
        # A separate client, so a saturated proxy pool cannot starve the health checks.
        self._health = httpx.AsyncClient(timeout=self.health_timeout)
        await self.poll_once()
        self._pollers = [
            asyncio.create_task(self._poll_forever(r), name=f"health-poller {r.name}")
            for r in self._replicas.values()
        ]

    async def close(self) -> None:
        for poller in self._pollers:
            poller.cancel()
        for poller in self._pollers:
            with contextlib.suppress(asyncio.CancelledError):
                await poller
        self._pollers = []
        for client in (self._proxy, self._health):
            if client is not None:
                await client.aclose()
        self._proxy = self._health = None

    @property
    def client(self) -> httpx.AsyncClient:
        """The client requests are proxied with (only between start and close)."""
        if self._proxy is None:
            raise RuntimeError("ReplicaPool.start() has not been awaited")
        return self._proxy

    # ---- health ----

    async def poll_once(self) -> None:
        """Poll every replica's /health once (concurrently)."""
        await asyncio.gather(*(self._poll(r) for r in self._replicas.values()))

    async def _poll_forever(self, r: _Replica) -> None:
        """Poll one replica for good: a replica hanging on /health delays only its own checks."""
        while True:
            await asyncio.sleep(self.poll_interval_s)  # the polling cadence itself
            try:
                await self._poll(r)
            except Exception:  # a bug in one poll must not stop health checking for good
                log.exception("health poll of replica %s failed", r.name)

    async def _poll(self, r: _Replica) -> None:
        if self._health is None:
            raise RuntimeError("ReplicaPool.start() has not been awaited")
        ended_before = r.ended
        try:
            resp = await self._health.get(r.url + "/health")
            resp.raise_for_status()
            body = resp.json()
            if not isinstance(body, dict):
                raise ValueError("/health did not return a JSON object")
            self._apply_health(r, body, r.ended - ended_before)
        except (httpx.HTTPError, ValueError) as e:
            self._poll_failed(r, e)
            return
        self._poll_succeeded(r)

    def _poll_succeeded(self, r: _Replica) -> None:
        r.poll_failures = r.stuck_polls = 0
        if not r.healthy:
            r.healthy = True
            # Back (restarted, or its network mended): the requests that failed while it was
            # down are no penalty now; charged, they could shed every request an idle replica
            # would take, and only a request it serves would clear them.
            r.consecutive_failures = 0
            log.info("replica %s healthy (adapter version %s)", r.name, r.adapter_version)

    def _poll_failed(self, r: _Replica, e: Exception) -> None:
        """Mark ``r`` unhealthy after ``unhealthy_after`` failed polls; abandon its requests in
        flight only if it is stuck (see the module docstring)."""
        r.poll_failures += 1
        r.stuck_polls = 0 if connection_refused(e) or upstream_gone(e) else r.stuck_polls + 1
        r.last_error, r.last_error_at = f"/health: {_describe(e)}", self.clock()
        if not r.healthy and r.poll_failures == self.unhealthy_after:
            # Never healthy (a wrong URL, a replica still loading): say so once.
            log.warning(
                "replica %s does not answer /health (%s); it gets no requests until it does",
                r.name,
                _describe(e),
            )
        if r.healthy and r.poll_failures >= self.unhealthy_after:
            r.healthy = False
            log.warning(
                "replica %s unhealthy: /health failed (%s); %d request(s) in flight on it",
                r.name,
                _describe(e),
                len(r.tickets),
            )
        if r.stuck_polls >= self.unhealthy_after:
            reason = f"replica {r.name} stopped answering /health ({_describe(e)})"
            # Each ticket leaves the dict once its waiter has ended it; abandon each once.
            abandoned = [t for t in r.tickets if t.abandoned is None]
            for ticket in abandoned:
                ticket.abandon(reason)
            if abandoned:
                log.warning(
                    "replica %s is stuck (%s); abandoning its %d request(s) in flight",
                    r.name,
                    _describe(e),
                    len(abandoned),
                )

    @staticmethod
    def _apply_health(r: _Replica, body: dict[str, object], ended_meanwhile: int = 0) -> None:
        """``ended_meanwhile``: the gateway's requests to ``r`` that ended while the poll was on
        its way; the report may still count them, so they are not taken for other clients'."""
        r.queue_depth = _int(body.get("queue_depth"), 0)
        r.running = _int(body.get("running"), 0)
        r.in_flight_at_poll = r.in_flight + ended_meanwhile
        r.training = bool(body.get("training", False))
        share = body.get("training_share", 0.0)  # (JSON's NaN would poison every ranking)
        if isinstance(share, int | float) and math.isfinite(share):
            r.training_share = min(max(float(share), 0.0), 1.0)
        else:
            r.training_share = 0.0
        batch = body.get("max_batch_size")
        r.max_batch = batch if isinstance(batch, int) and batch > 0 else None
        version = body.get("adapter_version")
        r.adapter_version = version if isinstance(version, int) else None
        model = body.get("model")
        r.model = model if isinstance(model, str) else None

    # ---- what the policy reads ----

    def views(self) -> list[ReplicaView]:
        now = self.clock()
        views = []
        for r in self._replicas.values():
            ahead, tokens_ahead = prefills_ahead(r)
            views.append(
                ReplicaView(
                    name=r.name,
                    healthy=r.healthy,
                    queue_depth=r.queue_depth,
                    running=r.running,
                    in_flight=r.in_flight,
                    in_flight_tokens=r.in_flight_tokens,
                    in_flight_at_poll=r.in_flight_at_poll,
                    remaining_tokens=tuple(t.remaining for t in r.tickets if not t.done),
                    # A share slows serving only while a training job actually runs.
                    training_share=r.training_share if r.training else 0.0,
                    ewma_ttft_s=self._fresh(r, r.ewma_ttft_s, r.ttft_learned_at, now),
                    ewma_tpot_s=self._fresh(r, r.ewma_tpot_s, r.tpot_learned_at, now),
                    max_batch=r.max_batch,
                    consecutive_failures=r.consecutive_failures,
                    last_error_age_s=None if r.failed_at is None else now - r.failed_at,
                    last_routed=r.last_routed,
                    prefills_ahead=ahead,
                    prompt_tokens_ahead=tokens_ahead,
                )
            )
        return views

    def names(self) -> list[str]:
        return list(self._replicas)

    def served_models(self) -> dict[str, str | None]:
        """Each replica's model as its last good /health reported it (None: not reported)."""
        return {r.name: r.model for r in self._replicas.values()}

    def url_of(self, name: str) -> str:
        return self._replicas[name].url

    def snapshot(self) -> list[dict[str, object]]:
        """Each replica's state, for the gateway's /health."""
        out: list[dict[str, object]] = []
        now = self.clock()
        for r in self._replicas.values():
            out.append(
                {
                    "name": r.name,
                    "url": r.url,
                    "healthy": r.healthy,
                    "model": r.model,
                    "adapter_version": r.adapter_version,
                    "queue_depth": r.queue_depth,
                    "running": r.running,
                    "in_flight": r.in_flight,
                    "in_flight_tokens": r.in_flight_tokens,
                    "training": r.training,
                    "training_share": r.training_share,
                    "ewma_ttft_s": r.ewma_ttft_s,
                    "ewma_tpot_s": r.ewma_tpot_s,
                    "consecutive_failures": r.consecutive_failures,
                    "last_error": r.last_error,
                    "last_error_age_s": None if r.last_error_at is None else now - r.last_error_at,
                    "routed": r.routed,
                }
            )
        return out

    # ---- per-request accounting ----

    def begin(self, name: str, prompt_tokens: int, max_tokens: int, stream: bool = True) -> Ticket:
        """Count a request as sent to ``name`` (``stream``: its tokens will be seen as they
        come); end it with succeed, fail or release."""
        r = self._replicas[name]
        ahead, tokens_ahead = prefills_ahead(r)
        ticket = Ticket(
            replica=name,
            prompt_tokens=prompt_tokens,
            sent_at=self.clock(),
            load_at_send=current_load(r.in_flight, r.queue_depth + r.running, r.in_flight_at_poll),
            capacity=r.max_batch or self.model.default_max_batch,
            training_share=r.training_share if r.training else 0.0,
            remaining=max_tokens,
            stream=stream,
            prefills_ahead=ahead,
            prompt_tokens_ahead=tokens_ahead,
        )
        r.in_flight += 1
        r.in_flight_tokens += max_tokens
        r.tickets[ticket] = None
        r.routed += 1
        self._sent += 1  # (routing breaks ties by the least recently routed, see ReplicaView)
        r.last_routed = self._sent
        return ticket

    def on_token(self, ticket: Ticket) -> None:
        """A streamed token of ``ticket`` reached the gateway."""
        now = self.clock()
        if ticket.first_token_at is None:
            ticket.first_token_at = now
            ticket.held_at_first = ticket.held_s
        ticket.last_token_at = now
        ticket.held_at_last = ticket.held_s
        ticket.tokens += 1
        if ticket.remaining > 0 and not ticket.done:
            ticket.remaining -= 1
            self._replicas[ticket.replica].in_flight_tokens -= 1

    def succeed(
        self,
        ticket: Ticket,
        completion_tokens: int | None = None,
        replica_timing: tuple[float, float] | None = None,
    ) -> None:
        """The request ended well: learn its latencies and clear the replica's failure streak.

        ``replica_timing``: a JSON reply's (TTFT, total) in seconds as the replica measured them
        (its Server-Timing header): the reply's last ``total − TTFT`` seconds were its decoding,
        so the gateway learns from it as from a stream of ``completion_tokens`` tokens. A stream's
        ``completion_tokens`` (its usage chunk) counts the tokens that came without an event of
        their own (text held back for a stop string or an incomplete character, sent later with
        the next): its decode time is divided among all of them.
        """
        if ticket.done:
            return
        if replica_timing is not None and completion_tokens is not None:
            self._timed_by_replica(ticket, completion_tokens, *replica_timing)
        self._finish(ticket)
        r = self._replicas[ticket.replica]
        r.consecutive_failures = 0
        self._learn(r, ticket, completion_tokens)

    def _timed_by_replica(
        self, ticket: Ticket, completion_tokens: int, ttft_s: float, total_s: float
    ) -> None:
        """Stamp a JSON reply's ticket as if it had streamed (first token ``total − TTFT`` before
        now), unless the timing cannot be this reply's: no token, a decode span longer than the
        gateway waited, or none at all for 2+ tokens (then the JSON fallback in :meth:`_learn`)."""
        if ticket.first_token_at is not None or isinstance(completion_tokens, bool):
            return
        now = self.clock()
        decode_s = total_s - ttft_s
        if completion_tokens < 1 or decode_s > now - ticket.sent_at:
            return
        if completion_tokens >= 2 and decode_s <= 0:
            return
        ticket.first_token_at = now - decode_s
        ticket.last_token_at = now
        ticket.tokens = completion_tokens

    def fail(self, ticket: Ticket, reason: str, replica_down: bool = False) -> None:
        """The replica failed this request; ``replica_down`` (connection refused) marks it unhealthy
        at once instead of waiting for the health poll."""
        if ticket.done:
            return
        self._finish(ticket)
        r = self._replicas[ticket.replica]
        r.consecutive_failures += 1
        r.failed_at = r.last_error_at = self.clock()
        r.last_error = reason
        if replica_down and r.healthy:
            r.healthy = False
            log.warning("replica %s marked unhealthy: %s", r.name, reason)

    def abandon_all(self, reason: str) -> int:
        """Give up on every request in flight, on every replica (the gateway is stopping); each
        waiter ends its request. How many were abandoned."""
        open_ = [t for r in self._replicas.values() for t in r.tickets if t.abandoned is None]
        for ticket in open_:
            ticket.abandon(reason)
        return len(open_)

    def release(self, ticket: Ticket) -> None:
        """The request ended without saying anything about the replica (client left, 4xx)."""
        if not ticket.done:
            self._finish(ticket)

    def _finish(self, ticket: Ticket) -> None:
        r = self._replicas[ticket.replica]
        ticket.done = True
        r.tickets.pop(ticket, None)
        r.in_flight -= 1
        r.ended += 1
        r.in_flight_tokens -= ticket.remaining
        ticket.remaining = 0

    def _learn(self, r: _Replica, t: Ticket, completion_tokens: int | None) -> None:
        batch = min(t.load_at_send + 1, t.capacity)
        queued = t.load_at_send + 1 > t.capacity  # the batch was full when it was sent
        base_tpot = r.ewma_tpot_s if r.ewma_tpot_s is not None else self.model.prior_tpot_s
        if t.first_token_at is not None:  # streamed, or timed by the replica: TTFT and TPOT
            ttft = unloaded_ttft(
                t.first_token_at - t.sent_at,
                t.prompt_tokens,
                t.load_at_send,
                t.capacity,
                base_tpot,
                t.training_share,
                self.model,
                t.prefills_ahead,
                t.prompt_tokens_ahead,
            )
            if ttft is not None:
                r.ewma_ttft_s = self._ewma(r, r.ewma_ttft_s, r.ttft_learned_at, ttft)
                r.ttft_learned_at = self.clock()
            tokens = max(t.tokens, completion_tokens or 0)  # (events can carry several)
            if tokens >= 2 and t.last_token_at is not None:
                held = t.held_at_last - t.held_at_first  # (a slow client's pauses between them)
                tpot = max(0.0, t.last_token_at - t.first_token_at - held) / (tokens - 1)
                sample = unloaded_tpot(tpot, batch, t.training_share, self.model)
                r.ewma_tpot_s = self._ewma(r, r.ewma_tpot_s, r.tpot_learned_at, sample)
                r.tpot_learned_at = self.clock()
        elif completion_tokens is not None and completion_tokens >= 2 and not queued:
            # One JSON body at the end and no Server-Timing (a replica of another kind, or an
            # older one): split its time with the TTFT this request was predicted
            # (its prompt's prefill and the running step included, as unloaded_ttft). (One that
            # found the batch full also waited an unknowable time for a slot: it teaches nothing,
            # as unloaded_ttft skips such streamed requests.)
            base_ttft = r.ewma_ttft_s if r.ewma_ttft_s is not None else self.model.prior_ttft_s
            e2e = self.clock() - t.sent_at
            ttft = admitted_ttft(
                base_ttft,
                base_tpot,
                t.prompt_tokens,
                t.load_at_send,
                t.capacity,
                t.training_share,
                self.model,
                t.prefills_ahead,  # (their prefills came before its first token too)
                t.prompt_tokens_ahead,
            )
            tpot = max(e2e - ttft, 0.0) / (completion_tokens - 1)
            sample = unloaded_tpot(tpot, batch, t.training_share, self.model)
            r.ewma_tpot_s = self._ewma(r, r.ewma_tpot_s, r.tpot_learned_at, sample)
            r.tpot_learned_at = self.clock()

    def _fresh(
        self, r: _Replica, value: float | None, learned_at: float | None, now: float
    ) -> float | None:
        """A learned latency, or None once it is older than ``ESTIMATE_TTL_S`` while no request
        is in flight on ``r``."""
        if value is None or learned_at is None:
            return None
        if now - learned_at > ESTIMATE_TTL_S and r.in_flight <= 0:
            return None
        return value

    def _ewma(
        self, r: _Replica, old: float | None, learned_at: float | None, sample: float
    ) -> float:
        """The EWMA with ``sample``; a forgotten (stale) estimate restarts from the sample."""
        if self._fresh(r, old, learned_at, self.clock()) is None:
            return sample
        assert old is not None
        return old + self.ewma_alpha * (sample - old)


def _int(value: object, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _describe(e: Exception) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
