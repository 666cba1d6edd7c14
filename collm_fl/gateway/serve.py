"""Run the gateway: one uvicorn server in front of the replicas, until SIGINT/SIGTERM."""

from __future__ import annotations

import logging

import uvicorn

from collm_fl.errors import ConfigError
from collm_fl.gateway.app import create_gateway_app
from collm_fl.gateway.pool import ReplicaPool
from collm_fl.replica.metrics import SLO

log = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 10  # open streams get this long to finish after SIGINT/SIGTERM


def run_gateway(
    replica_urls: list[str],
    host: str,
    port: int,
    api_key: str | None,
    replica_api_key: str | None,
    slo: SLO,
    max_attempts: int = 3,
) -> None:
    """Serve the gateway on ``host:port`` until SIGINT/SIGTERM (uvicorn's handlers), then stop.

    Raises ConfigError for an empty, malformed or duplicated replica list or a bad port.
    """
    if not 0 < port < 65536:
        raise ConfigError(f"--port must be a TCP port, got {port}")
    if slo.ttft_s <= 0 or slo.tpot_s <= 0:
        raise ConfigError("--ttft-slo and --tpot-slo must be > 0")
    if max_attempts < 1:
        raise ConfigError(f"max_attempts must be >= 1, got {max_attempts}")
    pool = ReplicaPool(replica_urls)
    app = create_gateway_app(pool, api_key, replica_api_key, slo, max_attempts=max_attempts)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        timeout_keep_alive=30,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    log.info(
        "gateway on http://%s:%d/v1 in front of %d replica(s): %s",
        host,
        port,
        len(pool.names()),
        ", ".join(pool.names()),
    )
    uvicorn.Server(config).run()
    log.info("gateway stopped")
