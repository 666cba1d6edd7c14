"""Run a replica: its OpenAI API and its control API, two uvicorn servers in one process."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from types import FrameType

import uvicorn

from collm_fl.api.limits import DEFAULT_BODY_TIMEOUT_S, check_body_timeout
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
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
) -> None:
    """Load the model, recover the latest stored version, serve until SIGINT/SIGTERM (both APIs
    answer a request body not received within ``body_timeout_s`` with a 408)."""
    check_body_timeout(body_timeout_s)
    replica = Replica(cfg)
    api = create_app(replica, api_key=api_key, body_timeout_s=body_timeout_s)
    control = create_control_app(replica, control_token, body_timeout_s=body_timeout_s)
    replica.start()

    once = threading.Lock()

    def stop_training() -> None:  # (either server's signal handler may call it first)
        if replica.trainer is not None and once.acquire(blocking=False):
            if replica.trainer.running_job:
                log.info("stopping: the training job in progress ends at its next step")
            replica.trainer.stop()

    servers = [
        _Server(
            uvicorn.Config(api, host=host, port=port, log_level="warning", timeout_keep_alive=30),
            stop_training,
        ),
        _Server(
            uvicorn.Config(control, host=control_host, port=control_port, log_level="warning"),
            stop_training,
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


class _Server(uvicorn.Server):
    """A uvicorn server that, on the first exit signal, also ends the replica's training job.

    uvicorn's graceful shutdown waits for every open request, and a ``/control/train`` request
    lasts until its job's deadline (up to days): without this, SIGTERM would wait that long (and
    a supervisor would SIGKILL first). Serving requests in flight still complete.
    """

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit
        self._exit_started = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if not self._exit_started:  # (in the signal handler: the work, which waits, elsewhere)
            self._exit_started = True
            threading.Thread(target=self._on_exit, name="replica-exit", daemon=True).start()


async def _serve_all(servers: Sequence[uvicorn.Server]) -> None:
    tasks = [asyncio.create_task(s.serve()) for s in servers]
    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for s in servers:  # one stopped (signal or failure): stop the other too
        s.should_exit = True
    await asyncio.gather(*tasks, return_exceptions=True)
    for t in done:
        if t.exception() is not None:
            raise t.exception()  # type: ignore[misc]
