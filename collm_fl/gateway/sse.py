"""The SSE side of relaying a stream: split it into events, read what an event says, and write the
gateway's own final chunk for a stream that broke."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator

import httpx

DONE = b"data: [DONE]\n\n"


async def sse_events(resp: httpx.Response) -> AsyncGenerator[bytes, None]:
    """Complete SSE events (``…\\n\\n``); a trailing partial event is dropped."""
    buf = b""
    async for chunk in resp.aiter_bytes():
        buf += chunk
        while (end := buf.find(b"\n\n")) >= 0:
            yield buf[: end + 2]
            buf = buf[end + 2 :]


def is_token(event: bytes, last: dict[str, object], chat: bool) -> bool:
    """Whether an SSE event carries generated text; remembers its envelope, its ``error`` object
    (None if it has none), its finish reason and a usage chunk's ``completion_tokens`` in
    ``last``."""
    if not event.startswith(b"data: "):
        return False
    try:
        payload = json.loads(event[6:])
    except ValueError:
        return False
    if not isinstance(payload, dict):
        return False
    last.update(
        {
            k: payload.get(k)
            for k in ("id", "object", "created", "model", "adapter_version", "error")
        }
    )
    usage = payload.get("usage")  # (the last chunk, when the client asked for include_usage)
    if isinstance(usage, dict) and isinstance(n := usage.get("completion_tokens"), int):
        last["completion_tokens"] = n
    choices = payload.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return False
    last["finish_reason"] = choices[0].get("finish_reason")
    part = choices[0].get("delta", {}) if chat else choices[0]
    return isinstance(part, dict) and bool(part.get("content" if chat else "text"))


def error_chunk(last: dict[str, object], chat: bool, message: str) -> bytes:
    """The final chunk the gateway sends on a stream that broke: ``finish_reason: "error"`` and an
    OpenAI-style ``error`` object, in the envelope ``last`` remembered."""
    choice: dict[str, object] = {"index": 0, "finish_reason": "error"}
    if chat:
        choice["delta"] = {}
    else:
        choice.update(text="", logprobs=None)
    payload = {
        "id": last.get("id"),
        "object": last.get("object") or ("chat.completion.chunk" if chat else "text_completion"),
        "created": last.get("created") or int(time.time()),
        "model": last.get("model"),
        "choices": [choice],
        "adapter_version": last.get("adapter_version"),
        "error": {
            "message": message,
            "type": "server_error",
            "param": None,
            "code": "replica_failed",
        },
    }
    return f"data: {json.dumps(payload)}\n\n".encode()
