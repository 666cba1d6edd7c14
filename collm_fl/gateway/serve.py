"""Run the gateway: one uvicorn server in front of the replicas, until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import socket
import threading
from collections.abc import Iterator
from types import FrameType

import uvicorn

from collm_fl.api.limits import DEFAULT_BODY_TIMEOUT_S, check_body_timeout
from collm_fl.errors import ConfigError
from collm_fl.gateway.app import create_gateway_app
from collm_fl.gateway.pool import ReplicaPool
from collm_fl.gateway.proxy import Router
from collm_fl.policies.routing import check_shed_factor
from collm_fl.replica.metrics import SLO

log = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 10  # open streams get this long to finish after SIGINT/SIGTERM
# What the gateway ends itself is ended this long before the grace runs out (at most half of it),
# time enough to write each request's 503 or final chunks before uvicorn cancels what is left.
SHUTDOWN_MARGIN_S = 1.0


def run_gateway(
    replica_urls: list[str],
    host: str,
    port: int,
    api_key: str | None,
    replica_api_key: str | None,
    slo: SLO,
    max_attempts: int = 3,
    stream_stall_timeout_s: float = 60.0,
    shed_factor: float = 0.0,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    graceful_shutdown_s: int = GRACEFUL_SHUTDOWN_S,
) -> None:
    """Serve the gateway on ``host:port`` until SIGINT/SIGTERM (uvicorn's handlers), then stop:
    the requests in flight get ``graceful_shutdown_s`` to finish, those still open then are ended
    by the gateway (see :class:`_GatewayServer`).

    Raises ConfigError for an empty, malformed or duplicated replica list, a bad port, a stall
    timeout or body timeout that is not > 0, a graceful shutdown under 1 s or a shed factor that
    is neither 0 (off) nor >= 1.
    """
    if not 0 < port < 65536:
        raise ConfigError(f"--port must be a TCP port, got {port}")
    if graceful_shutdown_s < 1:
        raise ConfigError(f"graceful_shutdown_s must be >= 1 (seconds), got {graceful_shutdown_s}")
    if not all(math.isfinite(v) and v > 0 for v in (slo.ttft_s, slo.tpot_s)):
        raise ConfigError("--ttft-slo and --tpot-slo must be finite numbers > 0")
    if max_attempts < 1:
        raise ConfigError(f"max_attempts must be >= 1, got {max_attempts}")
    check_shed_factor(shed_factor)
    check_body_timeout(body_timeout_s)
    pool = ReplicaPool(replica_urls, stream_stall_timeout_s=stream_stall_timeout_s)
    app = create_gateway_app(
        pool,
        api_key,
        replica_api_key,
        slo,
        max_attempts=max_attempts,
        shed_factor=shed_factor,
        body_timeout_s=body_timeout_s,
    )
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        ws="none",  # HTTP only
        timeout_keep_alive=30,
        timeout_graceful_shutdown=graceful_shutdown_s,
    )
    log.info(
        "gateway on http://%s:%d/v1 in front of %d replica(s): %s",
        host,
        port,
        len(pool.names()),
        ", ".join(pool.names()),
    )
    raise_open_files_limit()
    with _signals_end_the_server_not_the_process():
        _GatewayServer(config, app.state.router, graceful_shutdown_s).run()
    log.info("gateway stopped")


class _GatewayServer(uvicorn.Server):
    """uvicorn's server, whose graceful shutdown the gateway ends itself.

    Once ``timeout_graceful_shutdown`` has passed, uvicorn cancels every request still running: a
    JSON request gets uvicorn's plain-text 500, a stream is cut without an error chunk or
    ``[DONE]``, and each is logged as an exception. Shortly before that the router ends them
    (:meth:`Router.shut_down`), each as an OpenAI-style 503 or an error chunk then ``[DONE]``.
    """

    def __init__(self, config: uvicorn.Config, router: Router, grace_s: float) -> None:
        super().__init__(config)
        self.router = router
        self.end_requests_after_s = max(grace_s - SHUTDOWN_MARGIN_S, grace_s / 2)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.end_requests_after_s, self._end_requests)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()

    def _end_requests(self) -> None:
        n = self.router.shut_down()
        if n:
            log.warning(
                "gateway shutting down: ending %d request(s) still in flight after %g s",
                n,
                self.end_requests_after_s,
            )


MAX_OPEN_FILES = 1 << 20  # the soft limit raised to at most this (a hard limit may be unlimited)


def raise_open_files_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit; return the new limit.

    Every stream holds two sockets (the client's, the replica's): at the common soft limit of
    1,024, about 500 streams in, connects fail with EMFILE, which reads as every replica being
    down. (Only the soft limit: any process may raise it up to the hard one.)
    """
    try:
        import resource
    except ImportError:  # (not on Windows)
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, MAX_OPEN_FILES)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as e:
        log.warning("could not raise the open-files limit from %d to %d: %s", soft, target, e)
        return soft
    log.info("open-files limit raised from %d to %d", soft, target)
    return target


@contextlib.contextmanager
def _signals_end_the_server_not_the_process() -> Iterator[None]:
    """uvicorn shuts down on SIGINT/SIGTERM, then re-raises the signal to the handler it found;
    with this one in place the re-raised signal is logged and ``run_gateway`` simply returns."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach only the main thread; uvicorn does not install handlers either
        return

    def note(signum: int, _: FrameType | None) -> None:
        log.info("gateway shutting down on %s", signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
