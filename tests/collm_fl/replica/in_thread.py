"""A replica's OpenAI app served by a real uvicorn server in a thread, for tests that reach into
the replica (hooks in its model, its tokenizer) while requests go over HTTP."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import uvicorn

from collm_fl.launch import free_port
from collm_fl.replica.runtime import Replica
from collm_fl.replica.server import create_app
from tests.collm_fl.gateway.gateway_harness import wait_for


@contextmanager
def served(replica: Replica) -> Iterator[str]:
    """Start ``replica`` and serve it on a free loopback port; yields its URL; stops both."""
    replica.start()
    port = free_port()
    srv = uvicorn.Server(
        uvicorn.Config(
            create_app(replica), host="127.0.0.1", port=port, log_level="warning", ws="none"
        )
    )
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _answers(url), 60, "replica server did not start")
        yield url
    finally:
        srv.should_exit = True
        thread.join(30)
        replica.stop()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
