"""Run a replica: its OpenAI API and its control API, two uvicorn servers in one process."""

from __future__ import annotations

import asyncio
import logging

import uvicorn

from collm_fl.replica.control import create_control_app
from collm_fl.replica.runtime import Replica, ReplicaConfig
from collm_fl.replica.server import create_app

log = logging.getLogger(__name__)


def run_replica(
    cfg: ReplicaConfig,
    host: str,
    port: int,
    control_host: str,
    control_port: int,
    api_key: str | None,
    control_token: str,
) -> None:
    """Load the model, recover the latest stored version, serve until SIGINT/SIGTERM."""
    replica = Replica(cfg)
    api = create_app(replica, api_key=api_key)
    control = create_control_app(replica, control_token)
    replica.start()
    servers = [
        uvicorn.Server(
            uvicorn.Config(api, host=host, port=port, log_level="warning", timeout_keep_alive=30)
        ),
        uvicorn.Server(
            uvicorn.Config(control, host=control_host, port=control_port, log_level="warning")
        ),
    ]
    log.info(
        "replica of %s serving version %s: API http://%s:%d/v1, control http://%s:%d/control",
        cfg.model,
        replica.served_version,
        host,
        port,
        control_host,
        control_port,
    )
    try:
        asyncio.run(_serve_all(servers))
    finally:
        replica.stop()
        log.info("replica stopped")


async def _serve_all(servers: list[uvicorn.Server]) -> None:
    tasks = [asyncio.create_task(s.serve()) for s in servers]
    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for s in servers:  # one stopped (signal or failure): stop the other too
        s.should_exit = True
    await asyncio.gather(*tasks, return_exceptions=True)
    for t in done:
        if t.exception() is not None:
            raise t.exception()  # type: ignore[misc]
