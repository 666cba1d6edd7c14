"""Forwarding for the gateway: route with the policy, relay JSON or SSE, fail over.

Models: a request goes only to replicas that serve the model it names (or whose model is not known
yet); one naming a model no replica serves is the gateway's own 404 ``model_not_found``, and
``/v1/models`` lists the models of every healthy replica.

Failover: a replica that refuses a request before any byte of the reply reached the client
(connection error, 5xx, 429, a broken body, or an SSE stream that breaks, stalls or sends an error
event before its first token) is marked and the request goes to the next choice, up to
``max_attempts``; then a 503 with Retry-After. A stream is committed to its replica by its first
event that carries a token or a finish (a chat stream's role chunk before it is held back until
then). A committed stream that breaks ends with a final chunk carrying ``finish_reason: "error"``
and an ``error`` object, then ``data: [DONE]``. A replica's 4xx is the client's problem and passes
through as is. A client that goes away cancels the upstream request.

A hung replica (frozen process, deadlock) is caught two ways, both handled like a refusal before the
first token and like a broken stream after it: the pool abandons the requests in flight on a replica
whose ``/health`` polls hang or fail, and a stream that sends no event for the pool's stall timeout
once its response headers came is given up on. (Before its headers a stream, like a JSON request
until it is done, rightly sends nothing while it waits for admission: only the read timeout bounds
it.)

Shutdown: the requests still in flight shortly before the gateway's graceful shutdown runs out are
ended by the gateway (:meth:`Router.shut_down`), not cut by uvicorn: a 503 ``shutting_down`` with
Retry-After for one not yet answered, an error chunk then ``data: [DONE]`` for a committed stream.

Admission control (opt-in, ``shed_factor > 0``): a request whose predicted TTFT exceeds
``shed_factor ×`` the TTFT SLO on every replica is refused on arrival with a 503 of its own code,
``load_shed``, before any replica sees it (:func:`~collm_fl.policies.routing.admission_decision`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import TypeVar

import httpx
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge
from starlette.types import Receive, Scope, Send

from collm_fl.api.disconnect import ClientGone, unless_client_leaves
from collm_fl.api.errors import APIError, overloaded
from collm_fl.api.schemas import (
    DEFAULT_MAX_TOKENS_CHAT,
    DEFAULT_MAX_TOKENS_COMPLETIONS,
    SamplingFields,
)
from collm_fl.api.streams import drain
from collm_fl.gateway.pool import ReplicaPool, Ticket
from collm_fl.gateway.sse import DONE, error_chunk, is_done, is_token, replica_failed, sse_events
from collm_fl.policies.routing import admission_decision, choose_replica
from collm_fl.replica.metrics import SLO

log = logging.getLogger(__name__)
ROUTED_HEADER = "X-Routed-To"
VERSION_HEADER = "X-Adapter-Version"
SHED_CODE = "load_shed"  # a shed request's 503 (the others: "overloaded", no replica took it)
SHUTDOWN_CODE = "shutting_down"  # a request the gateway ended as it stopped (503, error chunk)
SHUTDOWN_REASON = "the gateway is shutting down"
# a replica's JSON reply: ``replica-ttft;dur=…, replica-total;dur=…`` (ms)
TIMING_HEADER = "Server-Timing"
RETRY_AFTER_S = 1
CHARS_PER_TOKEN = 4  # prompt-length estimate: the gateway has no tokenizer
T = TypeVar("T")


class GatewayMetrics:
    """The gateway's Prometheus series (a registry per app, so tests can run several)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "collm_gateway_requests",
            "Requests routed to a replica, by outcome (ok, client_error, stream_error, "
            "cancelled, timeout, shutdown)",
            ["replica", "outcome"],
            registry=r,
        )
        self.failovers = Counter(
            "collm_gateway_failovers",
            "Attempts a replica refused before any byte reached the client (retried elsewhere)",
            ["replica", "reason"],
            registry=r,
        )
        self.unavailable = Counter(
            "collm_gateway_unavailable", "Requests answered 503: no replica took them", registry=r
        )
        self.shed = Counter(
            "collm_gateway_shed",
            "Requests refused with 503 because every replica's predicted TTFT exceeded "
            "shed-factor × the TTFT SLO",
            registry=r,
        )
        self.in_flight = Gauge(
            "collm_gateway_in_flight", "Requests in flight per replica", ["replica"], registry=r
        )
        self.healthy = Gauge(
            "collm_gateway_replica_healthy", "1 if the replica is healthy", ["replica"], registry=r
        )


AUTH_REFUSALS = ("http_401", "http_403")  # a replica refused the gateway's credentials


class _Refused(Exception):
    """A replica refused a request before any byte of the reply reached the client."""

    def __init__(self, reason: str, kind: str, replica_down: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.kind, self.replica_down = reason, kind, replica_down


class _GatewayFull(Exception):
    """Every one of the gateway's connections to its replicas is in use: the gateway is the one
    overloaded, not the replica the request was routed to (which is neither failed over from
    nor penalized)."""


class _Abandoned(_Refused):
    """The gateway gave up on a replica that stopped answering (its cause is already logged)."""


@dataclass(frozen=True)
class Job:
    """One validated request, forwarded as the client sent it."""

    path: str
    body: bytes
    stream: bool
    chat: bool
    prompt_tokens: int  # estimated: the gateway has no tokenizer
    max_tokens: int
    model: str

    @classmethod
    def of(cls, req: SamplingFields, raw: bytes, prompt_chars: int, chat: bool) -> Job:
        path = "/v1/chat/completions" if chat else "/v1/completions"
        # (as the replica defaults it: at most, since it also caps it at the context's room)
        default = DEFAULT_MAX_TOKENS_CHAT if chat else DEFAULT_MAX_TOKENS_COMPLETIONS
        max_tokens = req.max_tokens or default
        prompt_tokens = max(1, prompt_chars // CHARS_PER_TOKEN)
        return cls(path, raw, req.stream, chat, prompt_tokens, max_tokens, req.model)


class RelayResponse(StreamingResponse):
    """A streaming response that always runs its cleanup, even if its body never started."""

    def __init__(
        self,
        content: AsyncGenerator[bytes, None],
        on_close: Callable[[], Awaitable[None]],
        headers: dict[str, str],
    ) -> None:
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self._gen, self._on_close = content, on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._gen.aclose()
            await self._on_close()


class Router:
    """Routing, forwarding and failover for one app."""

    def __init__(
        self,
        pool: ReplicaPool,
        slo: SLO,
        replica_api_key: str | None,
        max_attempts: int,
        metrics: GatewayMetrics,
        shed_factor: float = 0.0,
    ) -> None:
        self.pool, self.slo, self.max_attempts, self.metrics = pool, slo, max_attempts, metrics
        self.shed_factor = shed_factor  # 0: admission control off
        self.shutting_down = False  # set by shut_down: no new attempt, no failover
        self.headers = {"Content-Type": "application/json"}
        if replica_api_key:
            self.headers["Authorization"] = f"Bearer {replica_api_key}"

    async def handle(self, job: Job, request: Request) -> Response:
        # Admission control judges a request once, on arrival, never again before a failover
        # retry: the retry was already admitted, its first replica's refusal says nothing about
        # how long it would wait elsewhere, and its client has already waited out one attempt.
        views = self.pool.views()  # one snapshot serves admission and the first routing choice
        healthy = [v.name for v in views if v.healthy]
        other_models = replicas_of_other_models(self.pool.served_models(), healthy, job.model)
        shed = admission_decision(
            views, job.prompt_tokens, job.max_tokens, self.slo, self.shed_factor, other_models
        )
        if shed is not None:
            self.metrics.shed.inc()
            log.debug("%s", shed.reason)
            raise overloaded(shed.retry_after_s, shed.reason, code=SHED_CODE)
        excluded = set(other_models)
        last = "no healthy replica"
        refusals: list[str] = []  # the kind of each replica's refusal
        for attempt_no in range(self.max_attempts):
            if self.shutting_down:
                raise _shutting_down()
            if attempt_no:  # a failover: the refusal changed the pool's view
                views = self.pool.views()
            name = choose_replica(views, job.prompt_tokens, job.max_tokens, self.slo, excluded)
            if name is None:
                break
            ticket = self.pool.begin(name, job.prompt_tokens, job.max_tokens, job.stream)
            attempt = self._open_stream(job, ticket) if job.stream else self._forward(job, ticket)
            try:
                return await unless_client_leaves(request, attempt)
            except _Refused as e:
                if isinstance(e, _Abandoned) and self.shutting_down:  # not the replica's doing
                    self.pool.release(ticket)
                    self.metrics.requests.labels(name, "shutdown").inc()
                    raise _shutting_down() from None
                self.pool.fail(ticket, e.reason, e.replica_down)
                self.metrics.failovers.labels(name, e.kind).inc()
                excluded.add(name)
                refusals.append(e.kind)
                last = f"{name}: {e.reason}"
                level = logging.INFO if isinstance(e, _Abandoned) else logging.WARNING
                log.log(level, "replica %s refused a request (%s); failing over", name, e.reason)
            except ClientGone:
                self.pool.release(ticket)
                self.metrics.requests.labels(name, "cancelled").inc()
                return Response(status_code=499)
            except _GatewayFull:
                self.pool.release(ticket)
                self.metrics.unavailable.inc()
                raise overloaded(
                    RETRY_AFTER_S,
                    f"the gateway's {self.pool.max_connections} connections to its replicas are "
                    "all in use; retry later",
                ) from None
            except BaseException:
                self.pool.release(ticket)
                raise
        self.metrics.unavailable.inc()
        raise _unavailable(refusals, last, "no replica can take the request now")

    def shut_down(self) -> int:
        """End every request in flight now, the gateway's graceful shutdown being nearly over:
        one not yet answered (a JSON request, a stream before its first token) gets a 503
        ``shutting_down`` with Retry-After instead of a failover, a committed stream an error chunk
        then ``[DONE]``; a request not yet sent is refused alike. How many were in flight."""
        self.shutting_down = True
        return self.pool.abandon_all(SHUTDOWN_REASON)

    async def models(self) -> Response:
        """The models of every healthy replica, each listed once (the first replica's card)."""
        names = [v.name for v in self.pool.views() if v.healthy]
        lists = await asyncio.gather(*(self._list_models(name) for name in names))
        cards: dict[str, dict[str, object]] = {}
        refusals: list[str] = []
        last = "no healthy replica"
        for name, listed in zip(names, lists, strict=True):
            if isinstance(listed, _Refused):
                log.warning("replica %s failed /v1/models (%s)", name, listed.reason)
                refusals.append(listed.kind)
                last = f"{name}: {listed.reason}"
                continue
            for card in listed:
                cards.setdefault(str(card["id"]), card)
        if len(refusals) < len(names):  # at least one replica answered
            return JSONResponse({"object": "list", "data": list(cards.values())})
        self.metrics.unavailable.inc()
        raise _unavailable(refusals, last, "no replica could list its models")

    async def _list_models(self, name: str) -> list[dict[str, object]] | _Refused:
        """``name``'s model cards, or why it gave none (a list is quick: a stuck replica is
        skipped after the health timeout)."""
        try:
            resp = await self.pool.client.get(
                self.pool.url_of(name) + "/v1/models",
                headers=self.headers,
                timeout=self.pool.health_timeout,
            )
        except httpx.PoolTimeout:  # (the gateway's own limit, not the replica's doing)
            return _Refused("the gateway's connections to its replicas are all in use", "busy")
        except httpx.RequestError as e:
            return _refused(e)
        try:
            _check_status(resp)
        except _Refused as e:
            return e
        try:
            data = resp.json()["data"]
        except (ValueError, KeyError, TypeError):
            data = None
        if resp.status_code != 200 or not isinstance(data, list):
            return _Refused(f"HTTP {resp.status_code}: not a model list", "bad_model_list")
        return [c for c in data if isinstance(c, dict) and isinstance(c.get("id"), str)]

    async def _forward(self, job: Job, ticket: Ticket) -> Response:
        """A JSON request: any failure before the whole reply arrived is retried elsewhere."""
        name = ticket.replica
        try:
            post = self.pool.client.post(
                self.pool.url_of(name) + job.path, content=job.body, headers=self.headers
            )
            resp = await _unless_abandoned(ticket, post)
        except httpx.PoolTimeout as e:
            raise _GatewayFull() from e
        except httpx.ReadTimeout as e:
            raise self._timed_out(ticket, e) from e
        except httpx.RequestError as e:
            raise _refused(e) from e
        _check_status(resp)
        if resp.status_code != 200:
            self.pool.release(ticket)
            self.metrics.requests.labels(name, "client_error").inc()
            return _passthrough(resp, name)
        self.pool.succeed(ticket, _completion_tokens(resp), _replica_timing(resp))
        self.metrics.requests.labels(name, "ok").inc()
        return _passthrough(resp, name)

    def _timed_out(self, ticket: Ticket, e: httpx.ReadTimeout) -> APIError:
        """The replica took the request and gave no answer within the read timeout: a 504, not
        a failover (the request may still be running there; run again elsewhere from scratch,
        it would hold every replica for as long)."""
        self.metrics.requests.labels(ticket.replica, "timeout").inc()
        return APIError(
            504,
            f"replica {ticket.replica} gave no answer within the gateway's read timeout "
            f"({type(e).__name__}); the request was not retried elsewhere",
            "timeout",
            code="upstream_timeout",
        )

    async def _open_stream(self, job: Job, ticket: Ticket) -> Response:
        """An SSE request: committed to this replica once an event with a token has arrived."""
        name = ticket.replica
        client = self.pool.client
        url = self.pool.url_of(name) + job.path
        # The replica sends its headers once the request is admitted and has its first token: a
        # queued request is silent until then, so only the read timeout (and the health polls,
        # for a hung replica) bound this wait, not the stall timeout.
        req = client.build_request(
            "POST", url, content=job.body, headers=self.headers, timeout=self.pool.stream_timeout
        )
        try:
            resp = await _unless_abandoned(ticket, client.send(req, stream=True))
        except httpx.PoolTimeout as e:
            raise _GatewayFull() from e
        except httpx.ReadTimeout as e:
            raise self._timed_out(ticket, e) from e
        except httpx.RequestError as e:
            raise _refused(e) from e
        try:
            if resp.status_code != 200:
                try:  # (a body that breaks or stalls is a refusal too, not the client's 500)
                    await _unless_abandoned(ticket, resp.aread(), self.pool.stream_stall_timeout_s)
                except httpx.RequestError as e:
                    raise _refused(e) from e
                except TimeoutError as e:
                    raise _Abandoned(self._stalled(ticket), "stall") from e
                _check_status(resp)
                self.pool.release(ticket)
                self.metrics.requests.labels(name, "client_error").inc()
                return _passthrough(resp, name)
            events = sse_events(resp)
            head = await self._read_head(job, ticket, events)
        except BaseException:
            await resp.aclose()
            raise

        async def close() -> None:
            await events.aclose()
            await resp.aclose()
            if not ticket.done:  # the client went away mid-stream
                self.pool.release(ticket)
                self.metrics.requests.labels(name, "cancelled").inc()

        headers = {ROUTED_HEADER: name, "Cache-Control": "no-cache"}
        if VERSION_HEADER in resp.headers:
            headers[VERSION_HEADER] = resp.headers[VERSION_HEADER]
        relay = self._relay(job, ticket, head, events)
        return RelayResponse(relay, close, headers=headers)

    async def _read_head(
        self, job: Job, ticket: Ticket, events: AsyncIterator[bytes]
    ) -> list[bytes]:
        """The events up to the first that commits the stream to this replica: one that carries a
        token or a finish. Until then nothing has reached the client, so a stream that breaks,
        stalls, sends an error event or ends (``[DONE]``) before either is a refusal (failed
        over): an empty answer is no success."""
        head: list[bytes] = []
        seen: dict[str, object] = {}
        while True:
            try:
                event = await self._next_event(ticket, events)
            except StopAsyncIteration as e:
                raise _Refused("stream ended before its first token", "empty_stream") from e
            except TimeoutError as e:
                raise _Abandoned(self._stalled(ticket), "stall") from e
            except httpx.RequestError as e:
                raise _refused(e) from e
            head.append(event)
            if is_done(event):
                raise _Refused("the stream ended before its first token or finish", "empty_stream")
            token = is_token(event, seen, job.chat)
            if replica_failed(seen):
                raise _Refused("the replica sent an error event before any token", "error_event")
            if token or seen.get("finish_reason") is not None:
                return head

    async def _next_event(self, ticket: Ticket, events: AsyncIterator[bytes]) -> bytes:
        """The stream's next event; TimeoutError if none came within the stall timeout."""
        return await _unless_abandoned(ticket, anext(events), self.pool.stream_stall_timeout_s)

    async def _relay(
        self, job: Job, ticket: Ticket, head: list[bytes], events: AsyncIterator[bytes]
    ) -> AsyncGenerator[bytes, None]:
        """Relay SSE events (their line ends as LF), ``head`` (read before committing) first;
        end a broken stream cleanly with an error chunk."""
        last: dict[str, object] = {}
        error: str | None = None
        logged = done = stopping = False
        pending = deque(head)
        while True:
            if pending:
                event = pending.popleft()
            else:
                try:
                    event = await self._next_event(ticket, events)
                except StopAsyncIteration:
                    error = "the replica closed the stream before it finished"
                    break
                except TimeoutError:
                    error, logged = self._stalled(ticket), True
                    break
                except httpx.RequestError as e:
                    error = f"the replica failed mid-stream ({type(e).__name__})"
                    break
                except _Abandoned as e:
                    error, logged, stopping = e.reason, True, self.shutting_down
                    break
            if is_done(event):
                yield event
                done = True
                break
            if is_token(event, last, job.chat):
                self.pool.on_token(ticket)
            sent_at = self.pool.clock()
            yield event  # (returns once the client took it: a slow reader holds it here)
            ticket.held_s += self.pool.clock() - sent_at
        failed = replica_failed(last)  # its own error chunk or error event, relayed as it came
        if error is not None and not failed and last.get("finish_reason") is not None:
            # Its answer was whole (its finish chunk relayed): only the end of the stream was
            # lost. Ended here with [DONE], no error chunk after the finish, and no failure.
            log.info(
                "replica %s: a finished stream broke before [DONE] (%s)", ticket.replica, error
            )
            error = None
        if error is None and not failed:
            served = last.get("completion_tokens")
            self.pool.succeed(ticket, served if isinstance(served, int) else None)
            self.metrics.requests.labels(ticket.replica, "ok").inc()
        elif error is None:  # the replica ended the stream with its own error and [DONE]
            log.warning("replica %s failed a stream (its error event)", ticket.replica)
            self.pool.fail(ticket, "the replica's generation failed mid-stream")
            self.metrics.requests.labels(ticket.replica, "stream_error").inc()
        if done:  # the rest of the body (its end), so the connection goes back to the pool
            await drain(events)
        if error is None:
            if not done:
                yield DONE
            return
        if stopping:  # not the replica's doing: no penalty
            self.pool.release(ticket)
            self.metrics.requests.labels(ticket.replica, "shutdown").inc()
        else:
            level = logging.INFO if logged else logging.WARNING
            log.log(
                level, "stream from replica %s broke after %d tokens", ticket.replica, ticket.tokens
            )
            self.pool.fail(ticket, error)
            self.metrics.requests.labels(ticket.replica, "stream_error").inc()
        if not failed:  # (else the client has the replica's own)
            code = SHUTDOWN_CODE if stopping else "replica_failed"
            yield error_chunk(last, job.chat, error, code)
        yield DONE

    def _stalled(self, ticket: Ticket) -> str:
        """Log that ``ticket``'s stream stalled; the reason its client is given."""
        reason = f"the replica sent nothing for {self.pool.stream_stall_timeout_s:g} s"
        log.warning("replica %s stalled a stream (%s); ending 1 request", ticket.replica, reason)
        return reason


async def _unless_abandoned(
    ticket: Ticket, step: Awaitable[T], timeout_s: float | None = None
) -> T:
    """Await ``step`` on the ticket's replica; :class:`_Abandoned` if the pool gives up on it first,
    TimeoutError if ``timeout_s`` passes first.

    :meth:`Ticket.abandon` expires an ``asyncio.timeout`` around the wait at once: the upstream read
    is cancelled (its connection closed) with no extra task or polling per read.
    """
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout_s) as deadline:
            # (not once the timeout fired: rescheduling an expiring one raises RuntimeError, and
            # it ends the wait already; the abandonment is then read from the ticket below)
            ticket.on_abandon = lambda: (
                None if deadline.expired() else deadline.reschedule(loop.time())
            )
            if ticket.abandoned is not None:  # given up on between two reads
                ticket.on_abandon()
            try:
                return await step
            finally:
                ticket.on_abandon = None
    except TimeoutError as e:
        if ticket.abandoned is None:
            raise
        raise _Abandoned(ticket.abandoned, "unhealthy") from e


def replicas_of_other_models(
    served: Mapping[str, str | None], healthy: Collection[str], model: str
) -> set[str]:
    """The replicas known to serve another model than ``model``: a request for it avoids them.

    A replica whose model is not known yet is not among them. APIError 404 ``model_not_found``
    when the healthy replicas all serve other models and every replica has reported another
    model (one that serves it but is down now, or one down that never said what it serves, may
    serve it: a 503, which a client retries, not a 404).
    """
    others = {name for name, m in served.items() if m is not None and m != model}
    if healthy and set(healthy) <= others and set(served) <= others:
        offered = ", ".join(sorted({repr(served[name]) for name in healthy}))
        raise APIError(
            404,
            f"model {model!r} does not exist; the replicas serve {offered}",
            param="model",
            code="model_not_found",
        )
    return others


def _unavailable(refusals: Collection[str], last: str, what: str) -> APIError:
    """The error when no replica took a request: 502 if each refused the gateway's key or failed
    it with a 500, else 503 (overloaded, Retry-After)."""
    if refusals and all(k in AUTH_REFUSALS for k in refusals):
        # Not overload: a setup error no retry mends. 502, as a proxy whose upstream refused.
        return APIError(
            502,
            f"the replicas refused the gateway's credentials ({last}): give the gateway the "
            "replicas' API key (--replica-api-key or $COLLM_REPLICA_API_KEY)",
            "upstream_error",
            code="replica_auth_failed",
        )
    if refusals and all(k == "http_500" for k in refusals):
        # Every replica failed this request with an internal error: not overload, and a retry
        # of the same request would likely fail the same way. 502, as a proxy, no Retry-After.
        return APIError(
            502,
            f"every replica that tried failed the request ({last})",
            "upstream_error",
            code="replica_failed",
        )
    return overloaded(RETRY_AFTER_S, f"{what} ({last})")


def _shutting_down() -> APIError:
    return APIError(
        503,
        f"{SHUTDOWN_REASON}; retry later",
        "server_error",
        code=SHUTDOWN_CODE,
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def _refused(e: httpx.RequestError) -> _Refused:
    """A failed exchange with a replica (a transport error, or a body it could not decode)."""
    down = isinstance(e, httpx.ConnectError)  # nothing listens: the replica is gone
    reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return _Refused(reason, type(e).__name__, replica_down=down)


def _check_status(resp: httpx.Response) -> None:
    """Raise :class:`_Refused` for replies another replica might not give (5xx, 429, 401/403)."""
    code = resp.status_code
    if code in (401, 403):
        log.error(
            "a replica refused the gateway's credentials (HTTP %d): check the replica key", code
        )
    if code >= 500 or code in (401, 403, 429):
        raise _Refused(f"HTTP {code}: {_error_message(resp)}", f"http_{code}")


def _error_message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        return str(body["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return resp.text[:200]


def _passthrough(resp: httpx.Response, name: str) -> Response:
    headers = {ROUTED_HEADER: name}
    for key in (VERSION_HEADER, TIMING_HEADER, "Retry-After", "WWW-Authenticate"):
        if key in resp.headers:
            headers[key] = resp.headers[key]
    media_type = resp.headers.get("content-type", "application/json")
    return Response(resp.content, resp.status_code, headers=headers, media_type=media_type)


def _completion_tokens(resp: httpx.Response) -> int | None:
    try:
        n = resp.json()["usage"]["completion_tokens"]
    except (ValueError, KeyError, TypeError):
        return None
    return n if isinstance(n, int) else None


def _replica_timing(resp: httpx.Response) -> tuple[float, float] | None:
    """(TTFT, total) in seconds from a replica's Server-Timing header (``replica-ttft`` and
    ``replica-total``, the first of each), or None when it has not both as finite, non-negative
    durations with TTFT ≤ total."""
    found: dict[str, float] = {}
    for metric in resp.headers.get(TIMING_HEADER, "").split(","):
        name, _, params = metric.strip().partition(";")
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "dur" and name in ("replica-ttft", "replica-total") and name not in found:
                try:
                    found[name] = float(value) / 1000
                except ValueError:
                    return None
    ttft, total = found.get("replica-ttft"), found.get("replica-total")
    if ttft is None or total is None or not 0 <= ttft <= total < float("inf"):
        return None
    return ttft, total
