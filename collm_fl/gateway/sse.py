"""The SSE side of relaying a stream: split it into events, read what an event says, and write the
gateway's own final chunk for a stream that broke."""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncGenerator

import httpx

DONE = b"data: [DONE]\n\n"
_EOL = re.compile(rb"\r\n|\r|\n")  # (the three line ends the SSE format allows)


async def sse_events(resp: httpx.Response) -> AsyncGenerator[bytes, None]:
    """Complete SSE events, each ended by a blank line, its lines ended by LF whatever ends them
    in ``resp`` (CRLF, CR or LF, as the format allows); a trailing partial event is dropped."""
    buf = b""
    lines: list[bytes] = []
    async for chunk in resp.aiter_bytes():
        buf += chunk
        start = 0
        while (m := _EOL.search(buf, start)) and not (m[0] == b"\r" and m.end() == len(buf)):
            line, start = buf[start : m.start()], m.end()  # (a CR last may be half a CRLF)
            if line:
                lines.append(line)
            elif lines:
                yield b"\n".join(lines) + b"\n\n"
                lines = []
        buf = buf[start:]
    if buf == b"\r" and lines:  # (the stream ended on a CR: a line end after all)
        yield b"\n".join(lines) + b"\n\n"


def event_data(event: bytes) -> bytes | None:
    """An event's data: its ``data`` lines' values (one space after the colon dropped) joined by
    LF; None for an event without any (a comment, or only other fields)."""
    data = [
        value[1:] if value.startswith(b" ") else value
        for field, _, value in (line.partition(b":") for line in event.splitlines())
        if field == b"data"
    ]
    return b"\n".join(data) if data else None


def is_done(event: bytes) -> bool:
    """Whether ``event`` is the stream's end, ``data: [DONE]``."""
    return event_data(event) == b"[DONE]"


ENVELOPE = ("id", "object", "created", "model", "adapter_version")


def is_token(event: bytes, last: dict[str, object], chat: bool) -> bool:
    """Whether an SSE event carries generated text; remembers in ``last`` the envelope fields it
    has (an event without them, such as a bare ``{"error": …}``, keeps those remembered), its
    ``error`` object (once one came, it stays), its finish reason and a usage chunk's
    ``completion_tokens``."""
    data = event_data(event)
    if data is None:
        return False
    try:
        payload = json.loads(data)
    except ValueError:
        return False
    if not isinstance(payload, dict):
        return False
    last.update({k: payload[k] for k in ENVELOPE if k in payload})
    if payload.get("error") is not None:
        last["error"] = payload["error"]
    usage = payload.get("usage")  # (the last chunk, when the client asked for include_usage)
    if isinstance(usage, dict) and isinstance(n := usage.get("completion_tokens"), int):
        last["completion_tokens"] = n
    choices = payload.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return False
    last["finish_reason"] = choices[0].get("finish_reason")
    part = choices[0].get("delta", {}) if chat else choices[0]
    return isinstance(part, dict) and bool(part.get("content" if chat else "text"))


def replica_failed(last: dict[str, object]) -> bool:
    """Whether the events ``last`` remembers include the replica's own report of a failure: an
    ``error`` object, or ``finish_reason: "error"``."""
    return last.get("error") is not None or last.get("finish_reason") == "error"


def error_chunk(
    last: dict[str, object], chat: bool, message: str, code: str = "replica_failed"
) -> bytes:
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
            "code": code,
        },
    }
    return f"data: {json.dumps(payload)}\n\n".encode()
