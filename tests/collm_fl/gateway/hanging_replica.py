"""A replica that hangs: an in-process stand-in (a threaded HTTP server) that sends what the prompt
says, then blocks until :meth:`HangingReplica.stop`, so each case is a hang unless the gateway
ends it."""

from __future__ import annotations

import contextlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FIRST_EVENT = {
    "id": "cmpl-stall",
    "object": "text_completion",
    "created": 0,
    "model": "tiny",
    "choices": [{"index": 0, "text": "a", "logprobs": None, "finish_reason": None}],
}
# A foreign (vLLM-style) replica's mid-stream failure: an error object, no envelope, no choices.
ERROR_EVENT = {"error": {"message": "boom", "type": "server_error", "param": None, "code": 500}}


class HangingReplica:
    """Answers /health while ``health_ok`` (``/v1/models`` blocks); a completion whose prompt is
    ``"after"`` streams one event first, ``"fails"`` one event then its own error chunk and
    ``[DONE]`` (``"fails, cut"``: without ``[DONE]``), ``"error event"`` one event then a bare
    OpenAI-style error event and ``[DONE]``, ``"finished, cut"`` one event and its finish chunk,
    then closes without ``[DONE]``, ``"done only"`` just ``[DONE]``; every other completion blocks
    until :meth:`stop` (``received`` is set by the first, ``blocked`` counts them)."""

    def __init__(self) -> None:
        self.health_ok = True
        self.health_status = 500  # /health's status while not ok
        self.received = threading.Event()  # a completion request has arrived
        self.blocked = 0  # completions that blocked
        self.released = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: object) -> None:
                pass

            def do_GET(self) -> None:
                if self.path == "/v1/models":
                    fake.released.wait()
                    return
                with contextlib.suppress(ConnectionError):  # the gateway hung up as it stopped
                    self.send_response(200 if fake.health_ok else fake.health_status)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(b"{}")

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["prompt"]
                if body.get("stream"):
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.end_headers()
                    first = ("after", "fails", "fails, cut", "finished, cut", "error event")
                    if prompt in first:
                        self.wfile.write(f"data: {json.dumps(FIRST_EVENT)}\n\n".encode())
                        self.wfile.flush()
                    if prompt == "done only":  # an empty answer
                        self.wfile.write(b"data: [DONE]\n\n")
                        return
                    if prompt == "finished, cut":  # its finish chunk, then no [DONE]
                        choice = {"index": 0, "text": "b", "finish_reason": "stop"}
                        self.wfile.write(
                            f"data: {json.dumps({**FIRST_EVENT, 'choices': [choice]})}\n\n".encode()
                        )
                        return
                    if prompt in ("fails", "fails, cut"):
                        choice = {"index": 0, "text": "", "finish_reason": "error"}
                        failed = {**FIRST_EVENT, "choices": [choice]}
                        done = "" if prompt == "fails, cut" else "data: [DONE]\n\n"
                        self.wfile.write(f"data: {json.dumps(failed)}\n\n{done}".encode())
                        return
                    if prompt == "error event":
                        failure = f"data: {json.dumps(ERROR_EVENT)}\n\n"
                        self.wfile.write(f"{failure}data: [DONE]\n\n".encode())
                        return
                with fake.lock:
                    fake.blocked += 1
                fake.received.set()
                fake.released.wait()

        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()
