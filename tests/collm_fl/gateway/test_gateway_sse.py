"""Reading a replica's SSE stream: events framed by any of the line ends the format allows."""

from __future__ import annotations

import asyncio
import json

import httpx

from collm_fl.gateway.sse import error_chunk, event_data, is_done, is_token, sse_events


def events_of(*chunks: bytes) -> list[bytes]:
    async def body():
        for c in chunks:
            yield c

    async def read() -> list[bytes]:
        return [e async for e in sse_events(httpx.Response(200, content=body()))]

    return asyncio.run(read())


def test_events_end_at_a_blank_line_whatever_ends_the_lines():
    lf = events_of(b'data: {"a": 1}\n\n', b"data: [DONE]\n\n")
    crlf = events_of(b'data: {"a": 1}\r\n\r\n', b"data: [DONE]\r\n\r\n")
    cr = events_of(b'data: {"a": 1}\r\r', b"data: [DONE]\r\r")
    assert lf == crlf == cr == [b'data: {"a": 1}\n\n', b"data: [DONE]\n\n"]


def test_a_crlf_split_between_two_chunks_is_one_line_end():
    # A CR last in a chunk may be half a CRLF: read as two line ends it would end the event early.
    events = events_of(b"data: x\r", b"\ndata: y\r", b"\n\r", b"\n", b"data: [DONE]\r\n\r")
    assert events == [b"data: x\ndata: y\n\n", b"data: [DONE]\n\n"]
    assert event_data(events[0]) == b"x\ny"  # (data lines joined by LF, as the format says)


def test_a_trailing_partial_event_is_dropped():
    assert events_of(b"data: x\n\ndata: cut") == [b"data: x\n\n"]
    assert events_of(b"data: x\r\n\r\ndata: cut\r") == [b"data: x\n\n"]


def test_data_without_the_space_comments_and_other_fields_are_read_as_the_format_says():
    assert event_data(b"data:[DONE]\n\n") == b"[DONE]" and is_done(b"data:[DONE]\n\n")
    assert event_data(b": keep-alive\n\n") is None and not is_done(b": keep-alive\n\n")
    assert event_data(b"event: message\nid: 3\ndata:  two spaces\n\n") == b" two spaces"
    last: dict[str, object] = {}
    chunk = b'event: message\ndata:{"choices": [{"text": "hi", "finish_reason": null}]}\n\n'
    assert is_token(chunk, last, chat=False) and last["finish_reason"] is None
    assert not is_token(b": ping\n\n", last, chat=False)


def test_an_event_without_the_envelope_keeps_the_remembered_one():
    # A foreign replica's mid-stream {"error": …} has no id, model or adapter_version: read as
    # None, they wiped those of the stream, and the gateway's own final chunk lost them.
    token = {"id": "cmpl-1", "object": "text_completion", "created": 7, "model": "tiny",
             "adapter_version": 3,
             "choices": [{"index": 0, "text": "a", "finish_reason": None}]}  # fmt: skip
    failure = {"error": {"message": "boom", "type": "server_error", "param": None, "code": 500}}
    last: dict[str, object] = {}
    assert is_token(f"data: {json.dumps(token)}\n\n".encode(), last, chat=False)
    assert not is_token(f"data: {json.dumps(failure)}\n\n".encode(), last, chat=False)
    assert {k: last[k] for k in ("id", "created", "model", "adapter_version")} == {
        "id": "cmpl-1",
        "created": 7,
        "model": "tiny",
        "adapter_version": 3,
    }
    assert last["error"] == failure["error"]
    final = json.loads(error_chunk(last, chat=False, message="cut")[6:])
    assert (final["id"], final["model"], final["adapter_version"]) == ("cmpl-1", "tiny", 3)
