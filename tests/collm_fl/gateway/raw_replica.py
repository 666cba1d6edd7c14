"""A scripted replica on a raw asyncio socket server (in a thread): it answers ``GET /health`` as
a healthy replica and every other request with the bytes its handler writes, and counts the TCP
connections that carried a request other than ``/health``. For what ``fake_replica``'s HTTP server
cannot be made to do: a body cut short of its length, keep-alive with chunked streams."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable

from collm_fl.launch import free_port

Handler = Callable[[asyncio.StreamWriter], Awaitable[bool]]  # False: close the connection


def sse(obj: object) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"


def token(text: str, finish: str | None = None) -> bytes:
    choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    return sse({"id": "x", "object": "text_completion", "created": 1, "model": "m",
                "choices": [choice], "adapter_version": 1})  # fmt: skip


def chunked_stream(*events: bytes) -> bytes:
    """A whole chunked SSE response: 200, each event a chunk, the terminator."""
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    body = b"".join(b"%x\r\n" % len(e) + e + b"\r\n" for e in events)
    return head + body + b"0\r\n\r\n"


async def good_stream(writer: asyncio.StreamWriter) -> bool:
    writer.write(chunked_stream(token("hi"), token(" there", "stop"), sse(b"[DONE]")))
    await writer.drain()
    return True


class RawReplica:
    def __init__(self, handler: Handler) -> None:
        self.handler, self.port = handler, free_port()
        self.request_connections = 0
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self.thread.start()
        started.wait(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._connection, "127.0.0.1", self.port)
        )
        started.set()
        self.loop.run_forever()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        counted = False
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                path = lines[0].split(" ")[1]
                headers = {
                    k.strip().lower(): v.strip()
                    for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)
                }
                await reader.readexactly(int(headers.get("content-length", 0)))
                if path == "/health":
                    body = json.dumps(
                        {
                            "status": "ok",
                            "model": "m",
                            "queue_depth": 0,
                            "running": 0,
                            "max_batch_size": 8,
                            "adapter_version": 1,
                        }
                    ).encode()
                    writer.write(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                        b"content-length: %d\r\n\r\n" % len(body) + body
                    )
                    await writer.drain()
                    continue
                if not counted:
                    self.request_connections, counted = self.request_connections + 1, True
                if not await self.handler(writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def stop(self) -> None:
        async def close() -> None:
            self.server.close()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
