"""A scripted stand-in replica: a threaded stdlib HTTP server whose answers a test sets attribute by
attribute (a real replica cannot be told to queue, drain or fail on cue)."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKENS = ["a", "b", "c"]  # what a completion generates, unless a test sets ``tokens``


class ScriptedReplica:
    """``/health`` reports ``model`` (and hangs while ``health_hangs``); ``/v1/models`` lists it, or
    answers ``models_status`` with an OpenAI error. A completion (JSON or SSE, chat or not) waits
    ``queued_s`` before its response headers (a request queued for admission), then generates
    ``tokens``: a stream sends its first token, waits for ``hold`` (set unless a test clears it),
    then the rest and ``[DONE]`` (no tokens: one empty chunk that finishes it); a JSON reply waits
    for ``hold`` before it is sent. ``fault`` makes a stream fail right after the chat role chunk
    (before its first token): ``"drop"`` closes the connection, ``"error"`` sends the replica's
    error chunk and ``[DONE]``. A request for another model than ``model`` is a 404, as a replica's.
    With ``usage_tokens`` set, a stream that asked for ``include_usage`` ends with a usage chunk
    counting that many completion tokens (more than its events when text was held back).
    """

    def __init__(self, model: str = "tiny") -> None:
        self.model = model
        self.tokens = list(TOKENS)
        self.health_hangs = False
        self.models_status = 200
        self.queued_s = 0.0
        self.fault: str | None = None
        self.usage_tokens: int | None = None
        self.hold = threading.Event()
        self.hold.set()
        self.received = threading.Event()  # a completion request has arrived
        self._stopped = threading.Event()  # ends every wait at stop()
        self._listening = True
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: object) -> None:
                pass

            def do_GET(self) -> None:
                if self.path == "/health":
                    if fake.health_hangs:
                        fake._stopped.wait()
                        return
                    health = {"status": "ok", "model": fake.model, "max_batch_size": 8}
                    self._json(200, health)
                elif fake.models_status != 200:
                    error = {"message": "refused", "type": "x", "param": None, "code": None}
                    self._json(fake.models_status, {"error": error})
                else:
                    self._json(200, {"object": "list", "data": [{"id": fake.model}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.received.set()
                if body["model"] != fake.model:
                    error = {"message": f"this replica serves {fake.model!r}", "type": "x",
                             "param": "model", "code": "model_not_found"}  # fmt: skip
                    self._json(404, {"error": error})
                    return
                time.sleep(fake.queued_s)  # simulated wait for admission, not synchronization
                chat = self.path.endswith("/chat/completions")
                if not body.get("stream"):
                    fake.hold.wait()
                    self._json(200, fake.completion(chat))
                    return
                with contextlib.suppress(ConnectionError):  # the gateway hung up
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.end_headers()
                    if chat:
                        self._event(fake.chunk(chat, {"role": "assistant", "content": ""}))
                    if fake.fault == "drop":
                        return  # HTTP/1.0: the connection closes with the handler
                    if fake.fault == "error":
                        self._event(fake.chunk(chat, {} if chat else "", "error"))
                        self.wfile.write(b"data: [DONE]\n\n")
                        return
                    for i, token in enumerate(fake.tokens):
                        finish = "length" if i == len(fake.tokens) - 1 else None
                        self._event(fake.chunk(chat, {"content": token} if chat else token, finish))
                        if i == 0:
                            fake.hold.wait()
                    if not fake.tokens:
                        self._event(fake.chunk(chat, {} if chat else "", "stop"))
                    asked = (body.get("stream_options") or {}).get("include_usage")
                    if asked and fake.usage_tokens is not None:
                        n = fake.usage_tokens
                        usage = {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}
                        self._event({**fake.chunk(chat, ""), "choices": [], "usage": usage})
                    self.wfile.write(b"data: [DONE]\n\n")

            def _event(self, payload: dict) -> None:
                self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
                self.wfile.flush()

            def _json(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                with contextlib.suppress(ConnectionError):  # the gateway hung up as it stopped
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def name(self) -> str:
        return f"127.0.0.1:{self.port}"

    def chunk(self, chat: bool, delta: dict | str, finish: str | None = None) -> dict:
        choice: dict[str, object] = {"index": 0, "finish_reason": finish}
        if chat:
            choice["delta"] = delta
        else:
            choice.update(text=delta, logprobs=None)
        obj = "chat.completion.chunk" if chat else "text_completion"
        return {"id": "cmpl-fake", "object": obj, "created": 0, "model": self.model,
                "choices": [choice], "adapter_version": None}  # fmt: skip

    def completion(self, chat: bool) -> dict:
        text = "".join(self.tokens)
        choice: dict[str, object] = {"index": 0, "finish_reason": "length"}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice.update(text=text, logprobs=None)
        n = len(self.tokens)
        return {
            "id": "cmpl-fake",
            "object": "chat.completion" if chat else "text_completion",
            "created": 0,
            "model": self.model,
            "choices": [choice],
            "usage": {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1},
            "adapter_version": None,
        }

    def stop_listening(self) -> None:
        """Close the listening socket and accept nothing more, while the requests already here
        carry on: what a replica does on SIGTERM (uvicorn's graceful shutdown)."""
        if self._listening:
            self._listening = False
            self.server.shutdown()
            self.server.server_close()

    def stop(self) -> None:
        self.hold.set()
        self._stopped.set()
        self.stop_listening()
