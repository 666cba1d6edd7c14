"""Test harness: a real gateway (uvicorn on a free loopback port, in a thread) and its helpers."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from collm_fl.gateway.app import create_gateway_app
from collm_fl.gateway.pool import ReplicaPool
from collm_fl.launch import free_port
from collm_fl.replica.metrics import SLO

GATEWAY_KEY = "sk-gateway"
REPLICA_KEY = "sk-replica"


class GatewayServer:
    """The gateway app served by uvicorn in a background thread; :meth:`stop` ends it."""

    def __init__(
        self,
        urls: list[str],
        api_key: str | None = GATEWAY_KEY,
        replica_api_key: str | None = REPLICA_KEY,
        poll_interval_s: float = 0.25,
        slo: SLO | None = None,
        stream_stall_timeout_s: float = 60.0,
        shed_factor: float = 0.0,
        read_timeout_s: float = 300.0,
        max_connections: int = 1024,
    ) -> None:
        self.pool = ReplicaPool(
            urls,
            poll_interval_s=poll_interval_s,
            stream_stall_timeout_s=stream_stall_timeout_s,
            read_timeout_s=read_timeout_s,
            max_connections=max_connections,
        )
        self.app = create_gateway_app(
            self.pool, api_key, replica_api_key, slo or SLO(), shed_factor=shed_factor
        )
        self.port = free_port()
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", ws="none"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="gateway", daemon=True)
        self.thread.start()
        wait_for(lambda: self._answers(), 30, "gateway did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _answers(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=1).status_code in (200, 503)
        except httpx.HTTPError:
            return False

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()

    def replica(self, name: str) -> dict:
        return next(r for r in self.health()["replicas"] if r["name"] == name)

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the gateway's Prometheus samples called ``name`` with these labels."""
        text = httpx.get(self.url + "/metrics", timeout=5).text
        return sum(
            s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` until true, failing with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} (after {timeout:.0f}s)")
        time.sleep(0.05)  # polling another server's state over HTTP


def name_of(replica) -> str:
    return f"127.0.0.1:{replica.port}"


def start_replicas(factory, root: Path, n: int) -> list:
    """Start ``n`` real tiny replicas in parallel (no private data: they only serve)."""
    with ThreadPoolExecutor(n) as ex:
        futures = [
            ex.submit(
                factory, "--data", "none", store_dir=root / f"gw-store{i}", api_key=REPLICA_KEY
            )
            for i in range(n)
        ]
        return [f.result() for f in futures]
