"""The replica's OpenAI-compatible HTTP API (thin: parse, submit to the engine, format).

Endpoints: POST /v1/completions, POST /v1/chat/completions (JSON or SSE streaming), GET /v1/models,
GET /health, GET /metrics (Prometheus). Every response names the adapter version that produced it
(``adapter_version`` in the body, ``X-Adapter-Version`` header).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from collm_fl.api.disconnect import ClientGone, unless_client_leaves
from collm_fl.api.errors import (
    APIError,
    BodySizeLimit,
    check_bearer,
    install_error_handlers,
    overloaded,
)
from collm_fl.api.limits import DEFAULT_BODY_TIMEOUT_S
from collm_fl.api.schemas import (
    DEFAULT_MAX_TOKENS_CHAT,
    DEFAULT_MAX_TOKENS_COMPLETIONS,
    ChatChoice,
    ChatChoiceMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    SamplingFields,
    Usage,
)
from collm_fl.data.files import chat_prompt
from collm_fl.errors import ChatTemplateError
from collm_fl.replica.metrics import RequestRecord
from collm_fl.replica.requests import (
    EngineStoppedError,
    GenerationRequest,
    InvalidPromptError,
    PromptTooLongError,
    QueueFullError,
    RequestHandle,
    TokenEvent,
)
from collm_fl.replica.runtime import Replica
from collm_fl.replica.sampling import SamplingParams

log = logging.getLogger(__name__)

VERSION_HEADER = "X-Adapter-Version"
# A JSON reply's own latencies (W3C Server-Timing, ms): ``replica-ttft;dur=…, replica-total;dur=…``
# from when the request reached the engine, so that a gateway can learn TTFT from JSON traffic too
# (the client's own TTFT adds the network and whatever came before: a gateway, its retries).
TIMING_HEADER = "Server-Timing"
MAX_CHARS_PER_TOKEN = 64  # more than any tokenizer's longest tokens average (BPEs: ~4)


def create_app(
    replica: Replica,
    api_key: str | None = None,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
) -> FastAPI:
    """The OpenAI-compatible app of one replica (lifecycle is the caller's: see serve.py); a
    request body not received within ``body_timeout_s`` is a 408."""
    app = FastAPI(title="CoLLM-FL replica", version="1")
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, read_timeout_s=body_timeout_s)  # type: ignore[arg-type]

    def auth(authorization: Annotated[str | None, Header()] = None) -> None:
        check_bearer(authorization, api_key)

    guarded = [Depends(auth)]

    @app.get("/health")
    async def health() -> dict[str, object]:
        s = replica.engine.stats()
        return {
            "status": "ok",
            "model": replica.cfg.model_id,
            "adapter_version": replica.served_version,
            "run": replica.run,
            "queue_depth": s.queue_depth,
            "max_batch_size": replica.cfg.max_batch_size,
            "running": s.running,
            "training_share": replica.training_share,
            "training": bool(replica.trainer and replica.trainer.running_job),
            "schedule": replica.cfg.schedule,
            "admitted_late": s.admitted_late,
        }

    @app.get("/metrics")
    async def metrics() -> Response:
        s = replica.engine.stats()
        m = replica.metrics
        m.queue_depth.set(s.queue_depth)
        m.running.set(s.running)
        m.tokens_per_s.set(s.running / s.decode_step_s if s.decode_step_s > 0 else 0.0)
        m.prefill_fixed_s.set(s.prefill_fixed_s)
        m.prefill_s_per_token.set(s.prefill_s_per_token)
        return Response(m.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> ModelList:
        card = ModelCard(
            id=replica.cfg.model_id,
            created=int(replica.started_at),
            root=replica.cfg.model,
            adapter_version=replica.served_version,
        )
        return ModelList(data=[card])

    # Tokenizing (and a chat template's rendering) runs in a worker thread: on the event loop a
    # long prompt would stall every stream and the control API meanwhile.
    @app.post("/v1/completions", dependencies=guarded, response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        text = body.prompt_text()
        _check_prompt_chars(replica, len(text), "prompt")
        encoded = await asyncio.to_thread(replica.tokenizer, text, add_special_tokens=True)
        return await _generate(replica, body, encoded.input_ids, request, chat=False)

    @app.post("/v1/chat/completions", dependencies=guarded, response_model=None)
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        # (OpenAI's "developer" role is its newer name for "system")
        roles = {"developer": "system"}
        messages = [(roles.get(m.role, m.role), m.text()) for m in body.messages]
        _check_prompt_chars(replica, sum(len(c) for _, c in messages), "messages")

        def encode() -> list[int]:
            prompt = chat_prompt(messages, replica.tokenizer)
            return list(replica.tokenizer(prompt, add_special_tokens=False).input_ids)

        try:
            ids = await asyncio.to_thread(encode)
        except ChatTemplateError as e:  # e.g. a system turn the model's template does not take
            raise APIError(400, str(e), param="messages", code="invalid_prompt") from e
        return await _generate(replica, body, ids, request, chat=True)

    return app


def _check_prompt_chars(replica: Replica, chars: int, param: str) -> None:
    """Refuse before tokenizing a prompt certain to be over the context (no tokenizer makes fewer
    tokens than 1/64 of the characters; most make a quarter or more)."""
    limit = replica.engine.max_model_len
    if chars > MAX_CHARS_PER_TOKEN * limit:
        raise APIError(
            400,
            f"the prompt has {chars} characters: far more than the {limit} tokens of context "
            f"this model takes",
            param=param,
            code="context_length_exceeded",
        )


def _sampling(body: SamplingFields, chat: bool, room: int) -> SamplingParams:
    """The request's sampling parameters; ``room`` is the context its prompt leaves. Without a
    ``max_tokens`` the request gets the endpoint's default (chat: ``DEFAULT_MAX_TOKENS_CHAT``,
    completions: OpenAI's 16) or what room is left, whichever is less: a prompt that fits is
    not refused for a length the client never asked for."""
    if body.max_tokens is not None:
        max_tokens = body.max_tokens
    else:
        default = DEFAULT_MAX_TOKENS_CHAT if chat else DEFAULT_MAX_TOKENS_COMPLETIONS
        max_tokens = max(1, min(default, room))
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=body.stop_list(),
            seed=body.seed,
            ignore_eos=body.ignore_eos,
        )
    except ValueError as e:
        raise APIError(400, str(e), code="invalid_parameter") from e


async def _generate(
    replica: Replica, body: SamplingFields, ids: list[int], request: Request, chat: bool
) -> Response:
    if body.model != replica.cfg.model_id:
        raise APIError(
            404,
            f"model {body.model!r} does not exist; this replica serves {replica.cfg.model_id!r}",
            param="model",
            code="model_not_found",
        )
    params = _sampling(body, chat, replica.engine.max_model_len - len(ids))
    req_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    try:
        handle = replica.engine.submit(GenerationRequest(list(ids), params, req_id))
    except QueueFullError as e:
        replica.load_window.add(RequestRecord(time.monotonic(), None, None, "rejected", 0))
        replica.metrics.requests.labels("rejected").inc()
        raise overloaded(retry_after_s=1, message=str(e)) from e
    except EngineStoppedError as e:  # the replica is shutting down: another may take it
        raise APIError(
            503,
            "the replica is shutting down; retry on another",
            "server_error",
            code="shutting_down",
            headers={"Retry-After": "1"},
        ) from e
    except InvalidPromptError as e:  # empty, out of vocabulary, or over the context
        code = "context_length_exceeded" if isinstance(e, PromptTooLongError) else "invalid_prompt"
        raise APIError(400, str(e), param="messages" if chat else "prompt", code=code) from e
    created = int(time.time())
    events = handle.aiter()
    try:
        # The first event comes after admission, when the request's version is pinned. A client
        # that leaves while its request waits takes it off the queue: nobody is left to read it.
        first = await unless_client_leaves(request, anext(events))
    except BaseException as e:
        handle.cancel()
        _record(replica, handle, None)
        if isinstance(e, ClientGone):
            return Response(status_code=499)  # (nginx's "client closed request"; unread)
        raise
    if first.finish_reason == "error":  # failed before any token: nothing streamed yet
        _record(replica, handle, "error")
        raise APIError(
            500, "generation failed on the replica", "server_error", code="generation_error"
        )
    if body.stream:
        end = _StreamEnd(replica, handle)
        return _EndingStream(
            _sse(end, first, events, body.model, created, chat, body.include_usage),
            end,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", **_version_headers(handle)},
        )
    text, finish = [first.text_delta], first.finish_reason

    async def rest() -> str | None:
        last = finish
        async for ev in events:
            text.append(ev.text_delta)
            last = ev.finish_reason or last
        return last

    try:
        finish = await unless_client_leaves(request, rest())
    except ClientGone:
        handle.cancel()
        finish = None
        return Response(status_code=499)
    finally:
        _record(replica, handle, finish)
    if finish == "error":
        raise APIError(
            500, "generation failed on the replica", "server_error", code="generation_error"
        )
    usage = _usage(handle)
    headers = {**_version_headers(handle), **_timing_headers(handle)}
    out: ChatCompletionResponse | CompletionResponse
    if chat:
        out = ChatCompletionResponse(
            id=req_id,
            created=created,
            model=body.model,
            choices=[
                ChatChoice(message=ChatChoiceMessage(content="".join(text)), finish_reason=finish)
            ],
            usage=usage,
            adapter_version=handle.version,
        )
    else:
        out = CompletionResponse(
            id=req_id,
            created=created,
            model=body.model,
            choices=[CompletionChoice(text="".join(text), finish_reason=finish)],
            usage=usage,
            adapter_version=handle.version,
        )
    return JSONResponse(out.model_dump(), headers=headers)


class _StreamEnd:
    """What ends a stream, once: its row cancelled if it is still decoding (the client went
    away), the request recorded with how it finished (``finish``, set as events arrive)."""

    def __init__(self, replica: Replica, handle: RequestHandle) -> None:
        self.replica, self.handle = replica, handle
        self.finish: str | None = None
        self._done = False

    def __call__(self) -> None:
        if self._done:
            return
        self._done = True
        if not self.handle.finished:
            self.handle.cancel()
        _record(self.replica, self.handle, self.finish)


class _EndingStream(StreamingResponse):
    """A stream whose end runs however the response ends. Under ASGI 2.3 Starlette runs the body
    beside a listener for the client's disconnect and cancels it when the client has gone: if
    that comes before the body generator starts, its own ``finally`` never runs, and the row
    would decode to ``max_tokens`` unrecorded."""

    def __init__(self, content: AsyncIterator[bytes], end: _StreamEnd, **kwargs: object) -> None:
        super().__init__(content, **kwargs)  # type: ignore[arg-type]
        self._end = end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._end()


async def _sse(
    end: _StreamEnd,
    first: TokenEvent,
    events: AsyncIterator[TokenEvent],
    model: str,
    created: int,
    chat: bool,
    include_usage: bool = False,
) -> AsyncIterator[bytes]:
    handle = end.handle
    obj = "chat.completion.chunk" if chat else "text_completion"

    async def all_events() -> AsyncIterator[TokenEvent]:
        yield first
        async for ev in events:
            yield ev

    try:
        if chat:  # OpenAI sends the role first
            yield _chunk(
                handle, obj, model, created, {"role": "assistant", "content": ""}, None, chat
            )
        async for ev in all_events():
            end.finish = ev.finish_reason or end.finish
            if not (ev.text_delta or ev.finish_reason):
                continue
            if chat:
                delta: dict[str, str] | str = {"content": ev.text_delta} if ev.text_delta else {}
            else:
                delta = ev.text_delta
            yield _chunk(handle, obj, model, created, delta, ev.finish_reason, chat)
        if include_usage:  # as OpenAI: one more chunk, no choices, the request's token counts
            usage = _usage(handle).model_dump()
            last = {"id": handle.request_id, "object": obj, "created": created, "model": model}
            payload = {**last, "choices": [], "usage": usage, "adapter_version": handle.version}
            yield f"data: {json.dumps(payload)}\n\n".encode()
        yield b"data: [DONE]\n\n"
    finally:
        end()  # (the client went away mid-stream: its row is cancelled)


def _chunk(
    handle: RequestHandle,
    obj: str,
    model: str,
    created: int,
    delta: dict[str, str] | str,
    finish: str | None,
    chat: bool,
) -> bytes:
    choice: dict[str, object] = {"index": 0, "finish_reason": finish}
    if chat:
        choice["delta"] = delta
    else:
        choice["text"] = delta
        choice["logprobs"] = None
    payload = {
        "id": handle.request_id,
        "object": obj,
        "created": created,
        "model": model,
        "choices": [choice],
        "adapter_version": handle.version,
    }
    if finish == "error":  # (as the gateway ends a broken stream: the reason, OpenAI-style)
        payload["error"] = {
            "message": "generation failed on the replica",
            "type": "server_error",
            "param": None,
            "code": "generation_error",
        }
    return f"data: {json.dumps(payload)}\n\n".encode()


def _usage(handle: RequestHandle) -> Usage:
    return Usage(
        prompt_tokens=handle.num_prompt_tokens,
        completion_tokens=handle.num_generated,
        total_tokens=handle.num_prompt_tokens + handle.num_generated,
    )


def _version_headers(handle: RequestHandle) -> dict[str, str]:
    return {VERSION_HEADER: "base" if handle.version is None else str(handle.version)}


def _timing_headers(handle: RequestHandle) -> dict[str, str]:
    if handle.first_token_at is None or handle.finished_at is None:
        return {}
    ttft_ms = (handle.first_token_at - handle.arrival) * 1000
    total_ms = (handle.finished_at - handle.arrival) * 1000
    return {TIMING_HEADER: f"replica-ttft;dur={ttft_ms:.1f}, replica-total;dur={total_ms:.1f}"}


def _record(replica: Replica, handle: RequestHandle, finish: str | None) -> None:
    status = {"error": "error", "cancelled": "cancelled"}.get(finish or "", "ok")
    if finish is None:
        status = "cancelled"
    end = handle.finished_at or time.monotonic()
    waited = end - handle.arrival if handle.ttft is None else None
    record = RequestRecord(end, handle.ttft, handle.tpot, status, handle.num_generated, waited)
    replica.load_window.add(record)
    replica.metrics.observe_request(record, end - handle.arrival)
