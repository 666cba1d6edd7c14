"""Fixtures of the gateway tests (the harness lives in gateway_harness.py, the scripted replica in
fake_replica.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from fake_replica import ScriptedReplica
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


@pytest.fixture()
def scripted() -> Iterator[Callable[..., ScriptedReplica]]:
    """Factory: start scripted stand-in replicas for a test; all are stopped at its end."""
    started: list[ScriptedReplica] = []

    def start(model: str = "tiny") -> ScriptedReplica:
        replica = ScriptedReplica(model)
        started.append(replica)
        return replica

    yield start
    for replica in started:
        replica.stop()
