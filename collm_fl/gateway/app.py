"""The gateway's OpenAI-compatible HTTP API: validate, route, forward, fail over.

Same surface as a replica (POST /v1/completions and /v1/chat/completions, JSON or SSE; GET
/v1/models, /health, /metrics). A request is validated with the replica's own schemas (a bad request
is the gateway's 400, never forwarded), routed with :func:`choose_replica`, and forwarded as sent.

Forwarding and failover live in :mod:`collm_fl.gateway.proxy`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import generate_latest

from collm_fl.api.errors import (
    BodySizeLimit,
    check_bearer,
    install_error_handlers,
)
from collm_fl.api.limits import DEFAULT_BODY_TIMEOUT_S
from collm_fl.api.schemas import ChatCompletionRequest, CompletionRequest
from collm_fl.gateway.pool import ReplicaPool
from collm_fl.gateway.proxy import (
    ROUTED_HEADER,
    VERSION_HEADER,
    GatewayMetrics,
    Job,
    Router,
)
from collm_fl.replica.metrics import SLO

log = logging.getLogger(__name__)

__all__ = ["ROUTED_HEADER", "VERSION_HEADER", "create_gateway_app"]


def create_gateway_app(
    pool: ReplicaPool,
    api_key: str | None,
    replica_api_key: str | None,
    slo: SLO,
    max_attempts: int = 3,
    shed_factor: float = 0.0,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
) -> FastAPI:
    """The gateway app; its lifespan starts and closes ``pool``. ``shed_factor`` > 0 turns on
    admission control (:func:`~collm_fl.policies.routing.admission_decision`); a request body not
    received within ``body_timeout_s`` is a 408."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await pool.start()
        try:
            yield
        finally:
            await pool.close()

    app = FastAPI(title="CoLLM-FL gateway", version="1", lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, read_timeout_s=body_timeout_s)
    router = Router(
        pool, slo, replica_api_key, max(1, max_attempts), GatewayMetrics(), shed_factor=shed_factor
    )
    app.state.metrics = router.metrics
    app.state.router = router  # (run_gateway's server ends its requests as it stops)

    def auth(authorization: Annotated[str | None, Header()] = None) -> None:
        check_bearer(authorization, api_key)

    guarded = [Depends(auth)]

    @app.get("/health")
    async def health() -> JSONResponse:
        replicas = pool.snapshot()
        healthy = sum(1 for r in replicas if r["healthy"])
        body = {
            "status": "ok" if healthy else "unavailable",
            "healthy_replicas": healthy,
            "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
            "replicas": replicas,
        }
        return JSONResponse(body, status_code=200 if healthy else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        m = router.metrics
        for v in pool.views():
            m.in_flight.labels(v.name).set(v.in_flight)
            m.healthy.labels(v.name).set(1.0 if v.healthy else 0.0)
        return Response(generate_latest(m.registry), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> Response:
        return await router.models()

    @app.post("/v1/completions", dependencies=guarded, response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        job = Job.of(body, await request.body(), len(body.prompt_text()), chat=False)
        return await router.handle(job, request)

    @app.post("/v1/chat/completions", dependencies=guarded, response_model=None)
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        chars = sum(len(m.text()) + 16 for m in body.messages)  # + the chat template's share
        job = Job.of(body, await request.body(), chars, chat=True)
        return await router.handle(job, request)

    return app
