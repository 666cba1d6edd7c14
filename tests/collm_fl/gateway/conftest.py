"""Fixtures of the gateway tests (the harness itself lives in gateway_harness.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from gateway_harness import GatewayServer


@pytest.fixture()
def start_gateway() -> Iterator[Callable[..., GatewayServer]]:
    """Factory: start gateways for a test; all are stopped at its end."""
    started: list[GatewayServer] = []

    def start(urls: list[str], **kw: object) -> GatewayServer:
        gw = GatewayServer(urls, **kw)  # type: ignore[arg-type]
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()
