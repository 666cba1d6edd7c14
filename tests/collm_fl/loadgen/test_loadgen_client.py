"""Request building and open-loop replay against a real (fake-model) OpenAI streaming server."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from collm_fl.errors import DataFormatError
from collm_fl.loadgen import run_load_cli
from collm_fl.loadgen.client import (
    FillerPrompts,
    ReplayProgress,
    RequestResult,
    RequestSpec,
    build_requests,
    read_results_jsonl,
    replay,
    write_results_jsonl,
)
from collm_fl.loadgen.goodput import SLOSpec, summarize_results
from collm_fl.loadgen.trace import TraceRow, write_sample_trace

MODEL = "fake-model"
VERSION = 7
DELAY_S = 0.05  # the simulated model's time per token
RECEIVED = [0]  # requests the fake server has received


# --- a minimal OpenAI-style streaming server; the prompt's keywords pick its behaviour ---------


def _chunk(chat: bool, text: str | None, finish: str | None = None, **extra: object) -> str:
    choice: dict[str, object] = {"index": 0, "finish_reason": finish}
    if chat:
        choice["delta"] = {"content": text} if text else {}
    else:
        choice["text"] = text or ""
    payload = {"id": "x", "model": MODEL, "choices": [choice], "adapter_version": VERSION, **extra}
    return f"data: {json.dumps(payload)}\n\n"


async def _stream(
    chat: bool, prompt: str, n: int, request: Request, usage: bool
) -> AsyncIterator[str]:
    if chat:
        yield _chunk(chat, None, **{"role": "assistant"})  # no content: must not count as TTFT
    for i in range(n):
        await asyncio.sleep(DELAY_S)
        if "MIDERROR" in prompt and i == 1:
            yield 'data: {"error": {"message": "boom", "type": "server_error"}}\n\n'
            return
        if "STALL" in prompt and i == 1:
            while not await request.is_disconnected():
                await asyncio.sleep(0.05)
            return
        yield _chunk(chat, f" w{i}", "length" if i == n - 1 else None)
    if usage and "NOUSAGE" not in prompt:  # as OpenAI's API: only when the request asks for it
        hidden = 1 if "HIDDEN" in prompt else 0  # a token that decoded to no text: no chunk
        yield _chunk(chat, None, usage={"prompt_tokens": 11, "completion_tokens": n + hidden})
    if "NODONE" not in prompt:
        yield "data: [DONE]\n\n"


def _fake_app() -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    async def generate(request: Request, chat: bool) -> Response:
        RECEIVED[0] += 1
        body = await request.json()
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        if "OVERLOAD" in prompt:
            error = {"message": "server is overloaded", "type": "server_overloaded"}
            return JSONResponse({"error": error}, status_code=503, headers={"Retry-After": "1"})
        if "HANG" in prompt:  # never answers; stops when the client goes away
            while not await request.is_disconnected():
                await asyncio.sleep(0.05)
            return Response(status_code=499)
        if "WHOLE FAILED" in prompt:  # whole replies that are not answers
            return JSONResponse({"choices": [{"text": " w", "finish_reason": "error"}]})
        if "WHOLE EMPTY" in prompt:
            return JSONResponse({"detail": "upstream said nothing"})
        if "WHOLE" in prompt:  # a server that ignores "stream": one JSON reply
            await asyncio.sleep(DELAY_S * body["max_tokens"])
            text = " w" * body["max_tokens"]
            if "LONG" in prompt:  # more than an error body's cap
                text = " w" * 50_000
            choice = {"message": {"content": text}} if chat else {"text": text}
            usage_out = {"prompt_tokens": 11, "completion_tokens": body["max_tokens"]}
            return JSONResponse(
                {"choices": [{**choice, "finish_reason": "length"}], "usage": usage_out}
            )
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        n = body["max_tokens"]
        if "SHORT" in prompt and body.get("ignore_eos") is not True:  # the model's end comes soon
            n = min(n, 2)
        gen = _stream(chat, prompt, n, request, usage)
        return StreamingResponse(gen, media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await generate(request, chat=True)

    return app


def _free_socket() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    sock = _free_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    config = uvicorn.Config(_fake_app(), log_level="warning", lifespan="off", ws="none")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20.0
    while True:  # readiness: poll /health
        try:
            if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                break
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    yield url
    server.should_exit = True
    thread.join(timeout=10.0)
    sock.close()


def _replay(url: str, specs: list[RequestSpec], **kw: float) -> list[RequestResult]:
    return asyncio.run(replay(url, MODEL, specs, **kw))  # type: ignore[arg-type]


# --- request building ---------------------------------------------------------------------------


def test_filler_prompts_have_the_requested_word_count_and_differ() -> None:
    source = FillerPrompts()
    a, b = source(12), source(12)
    assert len(a.split()) == 12 and len(b.split()) == 12 and a != b
    assert len(source(5000).split()) == 5000  # wraps around the text


def test_filler_prompts_take_any_text() -> None:
    source = FillerPrompts("alpha beta gamma")
    assert source(4) == "[0] alpha beta gamma"
    assert source(2) == "[1] alpha"
    assert source(1) == "[2]"
    assert FillerPrompts("alpha beta", tag="3fa1")(3) == "[3fa1-0] alpha beta"


def test_no_two_filler_prompts_share_a_prefix_however_many() -> None:
    """The filler text is 219 words: prompts walking it came round to the same text every few
    dozen requests, which a prefix-caching server (vLLM, SGLang) would answer from its cache."""
    source = FillerPrompts()
    prompts = [source(48) for _ in range(2000)]
    assert len({p.split()[0] for p in prompts}) == 2000  # distinct from the first word on
    assert all(len(p.split()) == 48 for p in prompts)


def test_tokenizer_prompts_have_the_models_token_count_and_differ(tiny) -> None:
    """`collm load --tokenizer`: lengths in the served model's tokens, not words (~1.3 tokens
    each), from 1 token to past the filler text's length; no two share a first token."""
    from collm_fl.loadgen.client import TokenizerPrompts
    from collm_fl.models import load_tokenizer

    tokenizer = load_tokenizer("tiny")
    assert type(tokenizer) is type(tiny.tokenizer)
    source = TokenizerPrompts(tokenizer)
    lengths = [1, 2, 5, 17, 48, 300, 1000, *range(40, 60)]
    prompts = [source(n) for n in lengths]
    counts = [len(tokenizer.encode(p, add_special_tokens=False)) for p in prompts]
    assert all(0 < got <= n for got, n in zip(counts, lengths, strict=True))
    exact = sum(got == n for got, n in zip(counts, lengths, strict=True))
    assert exact >= len(lengths) - 2, list(zip(counts, lengths, strict=True))
    firsts = [p.split()[0] for p in prompts[2:]]  # (1 or 2 tokens are too short for a number)
    assert len(set(firsts)) == len(firsts)
    assert prompts[4].startswith("[4] ")
    # Each prompt's filler starts where the one before it ended.
    a, b = TokenizerPrompts(tokenizer), TokenizerPrompts(tokenizer)
    whole = a(201).split(" ", 1)[1]
    halves = b(101).split(" ", 1)[1], b(101).split(" ", 1)[1]
    assert whole.startswith(halves[0][:40]) and halves[1][-40:] in whole


def test_requests_from_arrivals_have_fixed_lengths_and_are_sorted() -> None:
    asked: list[int] = []

    def source(n: int) -> str:
        asked.append(n)
        return "x " * n

    specs = build_requests([0.5, 0.1, 0.3], 8, 16, source, chat=True)
    assert [s.offset_s for s in specs] == [0.1, 0.3, 0.5]
    assert all(s.max_tokens == 16 and s.chat and s.prompt_tokens == 8 for s in specs)
    assert asked == [8, 8, 8]


def test_requests_from_trace_rows_keep_their_lengths() -> None:
    rows = [TraceRow(0.0, 30, 5), TraceRow(1.0, 0, 0)]
    specs = build_requests(rows, 8, 16)
    assert [(s.prompt_tokens, s.max_tokens) for s in specs] == [(30, 5), (1, 1)]
    assert len(specs[0].prompt.split()) == 30


# --- replay -------------------------------------------------------------------------------------


def test_replay_measures_ttft_and_tpot_from_the_stream(server_url: str) -> None:
    specs = [
        RequestSpec(0.0, "hello NOUSAGE", 5, prompt_tokens=3),
        RequestSpec(0.0, "hi NOUSAGE", 5, chat=True),
    ]
    results = _replay(server_url, specs, timeout_s=10.0)
    for r in results:
        assert r.status == "ok" and r.http_status == 200 and r.error is None
        assert r.adapter_version == VERSION
        assert r.output_tokens == 5  # counted chunks: no usage came
        assert r.ttft_s is not None and r.tpot_s is not None and r.e2e_s is not None
        assert DELAY_S * 0.8 <= r.ttft_s < DELAY_S * 10  # the chat role chunk is not a token
        assert DELAY_S * 0.8 <= r.tpot_s < DELAY_S * 4
        assert r.tpot_s == pytest.approx((r.e2e_s - r.ttft_s) / 4)
    assert results[0].prompt_tokens == 3 and [r.index for r in results] == [0, 1]


def test_replay_asks_for_usage_and_prefers_it_to_counting_chunks(server_url: str) -> None:
    # A token that decodes to no text sends no chunk: counting chunks undercounts.
    (r,) = _replay(server_url, [RequestSpec(0.0, "hello HIDDEN", 3)], timeout_s=10.0)
    assert r.status == "ok" and r.output_tokens == 4 and r.prompt_tokens == 11


def test_replay_records_a_503_as_http_503(server_url: str) -> None:
    (r,) = _replay(server_url, [RequestSpec(0.0, "OVERLOAD", 5)], timeout_s=10.0)
    assert (r.status, r.http_status, r.ttft_s, r.output_tokens) == ("http_503", 503, None, 0)
    assert r.error is not None and "overloaded" in r.error


def test_replay_times_out_a_hanging_request(server_url: str) -> None:
    (r,) = _replay(server_url, [RequestSpec(0.0, "HANG", 5)], timeout_s=0.5)
    # (HANG never answers: a "timeout" is the client's own, not cut before it)
    assert r.status == "timeout" and r.e2e_s is not None and r.e2e_s >= 0.5


def test_a_stalled_stream_times_out_keeping_its_first_token(server_url: str) -> None:
    (r,) = _replay(server_url, [RequestSpec(0.0, "STALL", 5)], timeout_s=0.5)
    assert r.status == "timeout" and r.ttft_s is not None and r.ttft_s < 0.5
    assert r.output_tokens == 1 and r.tpot_s is None


@pytest.mark.parametrize("prompt", ["MIDERROR", "NODONE"])
def test_broken_streams_are_errors(server_url: str, prompt: str) -> None:
    (r,) = _replay(server_url, [RequestSpec(0.0, prompt, 4)], timeout_s=10.0)
    assert r.status == "error" and r.http_status == 200 and r.error


def test_an_unreachable_server_is_an_error() -> None:
    sock = _free_socket()  # bound, never listening: connections are refused
    try:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        (r,) = _replay(url, [RequestSpec(0.0, "hi", 2)], timeout_s=5.0)
    finally:
        sock.close()
    assert r.status == "error" and r.http_status is None and "Connect" in (r.error or "")


def test_a_route_picks_each_requests_server_when_it_is_due(server_url: str) -> None:
    sock = _free_socket()  # bound, never listening: connections are refused
    refused = f"http://127.0.0.1:{sock.getsockname()[1]}"
    asked: list[int] = []

    def route(i: int) -> str:
        asked.append(i)
        return server_url if i % 2 == 0 else refused

    specs = [RequestSpec(0.01 * k, "hi", 2) for k in range(4)]
    try:
        results = asyncio.run(replay(refused, MODEL, specs, timeout_s=5.0, route=route))
    finally:
        sock.close()
    assert asked == [0, 1, 2, 3]
    assert [r.status for r in results] == ["ok", "error", "ok", "error"]


def test_replay_is_open_loop(server_url: str) -> None:
    # each request takes ~10 × 50 ms; the next ones go out on schedule, not after it finishes
    specs = [RequestSpec(t, "x", 10) for t in (0.0, 0.1, 0.2)]
    results = _replay(server_url, specs, timeout_s=10.0)
    assert all(r.status == "ok" for r in results)
    for spec, r in zip(specs, results, strict=True):
        assert r.sent_at is not None and spec.offset_s <= r.sent_at < spec.offset_s + 0.1
        assert r.late_s == pytest.approx(r.sent_at - spec.offset_s)  # its lag behind schedule
    first = results[0]
    assert first.sent_at is not None and first.e2e_s is not None
    assert results[2].sent_at is not None and results[2].sent_at < first.sent_at + first.e2e_s


def test_requests_beyond_max_in_flight_are_dropped(server_url: str) -> None:
    specs = [RequestSpec(0.0, "x", 10), RequestSpec(0.05, "y", 2)]
    first, second = _replay(server_url, specs, timeout_s=10.0, max_in_flight=1)
    assert first.status == "ok"
    assert second.status == "dropped" and second.sent_at is not None and second.sent_at >= 0.05
    assert second.http_status is None and second.output_tokens == 0


def test_a_stopped_replay_sends_nothing_more_and_lets_requests_in_flight_finish(
    server_url: str,
) -> None:
    # A long schedule (one request now, the next in an hour), stopped while the first runs.
    specs = [RequestSpec(0.0, "x", 10), RequestSpec(3600.0, "x", 2)]

    async def run() -> list[RequestResult]:
        stop = asyncio.Event()

        def stop_once_sent(p: ReplayProgress) -> None:  # the first request is out
            if p.sent >= 1:
                stop.set()

        stopped = replay(
            server_url,
            MODEL,
            specs,
            timeout_s=10.0,
            progress=stop_once_sent,
            progress_every_s=0.01,
            stop=stop,
        )
        return await asyncio.wait_for(stopped, timeout=30.0)  # not an hour

    results = asyncio.run(run())
    assert [(r.index, r.status) for r in results] == [(0, "ok")]
    assert results[0].output_tokens == 10


def test_requests_due_but_not_sent_when_the_load_stops_count_as_misses(server_url: str) -> None:
    """A generator behind its schedule when Ctrl-C came had requests due it never sent: they are
    recorded as dropped (not meeting the SLO), not left out of the attainment's denominator.
    Requests not yet due are not recorded (the run is measured up to the stop)."""
    specs = [RequestSpec(0.0, "x", 2), RequestSpec(0.0, "x", 2), RequestSpec(3600.0, "x", 2)]

    async def run() -> list[RequestResult]:
        stop = asyncio.Event()
        stop.set()  # (the stop came before the replay sent its first due request)
        return await asyncio.wait_for(replay(server_url, MODEL, specs, stop=stop), timeout=30.0)

    results = asyncio.run(run())
    assert [(r.index, r.status) for r in results] == [(0, "dropped"), (1, "dropped")]
    assert all(r.error is not None and "stopped after it was due" in r.error for r in results)
    summary = summarize_results(results, SLOSpec(1.0, 1.0), 1.0)
    assert summary.requests == 2 and summary.slo_met == 0


def _replay_until_abandoned(
    server_url: str,
    specs: list[RequestSpec],
    give_up: Callable[[ReplayProgress], bool],
    route: Callable[[int], str] | None = None,
) -> list[RequestResult]:
    """Replay ``specs``, then stop and abandon it (a second Ctrl-C) once ``give_up`` says so."""

    async def run() -> list[RequestResult]:
        stop, abandon = asyncio.Event(), asyncio.Event()

        def progress(p: ReplayProgress) -> None:
            if give_up(p):
                stop.set()
                abandon.set()

        abandoned = replay(
            server_url,
            MODEL,
            specs,
            timeout_s=600.0,
            progress=progress,
            progress_every_s=0.01,
            stop=stop,
            abandon=abandon,
            route=route,
        )
        return await asyncio.wait_for(abandoned, timeout=30.0)  # not the 600-s timeout

    return asyncio.run(run())


def test_an_abandoned_replay_returns_at_once_with_its_requests_in_flight_marked(
    server_url: str,
) -> None:
    # A second Ctrl-C: what finished is kept, what is still in flight is recorded as abandoned.
    specs = [RequestSpec(0.0, "x", 2), RequestSpec(0.0, "HANG", 5), RequestSpec(3600.0, "x", 2)]
    # (the quick one is done, the hanging one is in flight)
    results = _replay_until_abandoned(server_url, specs, lambda p: bool(p.completed))
    assert [(r.index, r.status) for r in results] == [(0, "ok"), (1, "abandoned")]
    assert results[1].e2e_s is not None and results[1].error.startswith("abandoned")


def test_an_abandoned_request_keeps_how_late_it_was_sent(server_url: str) -> None:
    # A router slow to answer (0.2 s) makes the generator send the request late; abandoned in
    # flight, it still counts that lag (else send_late_p99/max would read 0 for it).
    specs = [RequestSpec(0.0, "HANG", 5), RequestSpec(3600.0, "x", 2)]
    before = RECEIVED[0]

    def slow_route(i: int) -> str:
        time.sleep(0.2)  # (the lag under test, not a wait for anything)
        return server_url

    results = _replay_until_abandoned(
        server_url, specs, lambda _: RECEIVED[0] > before, route=slow_route
    )
    assert [(r.index, r.status) for r in results] == [(0, "abandoned")]
    lag = results[0]
    assert lag.sent_at is not None and lag.late_s == lag.sent_at - specs[0].offset_s
    assert lag.late_s >= 0.2
    summary = summarize_results(results, SLOSpec(1.0, 1.0), 1.0)
    assert summary.send_late_max_s == lag.late_s


def test_results_round_trip_through_jsonl(tmp_path: Path) -> None:
    results = [
        RequestResult(0, 0.0, 0.1, 0.02, 0.3, "ok", 200, 3, 12, 11, None),
        RequestResult(1, 0.5, None, None, None, "dropped", None, None, 12, 0, None),
    ]
    path = write_results_jsonl(results, tmp_path / "r.jsonl")
    assert read_results_jsonl(path) == results


def test_a_malformed_results_line_is_a_data_format_error(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    good = RequestResult(0, 0.0, 0.1, 0.02, 0.3, "ok", 200, 3, 12, 11, None)
    write_results_jsonl([good], path)
    path.write_text(path.read_text() + '{"index": 1}\n')
    with pytest.raises(DataFormatError, match="expected the fields") as info:
        read_results_jsonl(path)
    assert info.value.line == 2


@pytest.mark.parametrize(
    ("field", "value"),
    [("ttft_s", "0.5"), ("output_tokens", 1.5), ("status", None), ("late_s", True)],
)
def test_a_results_line_with_a_wrongly_typed_field_names_it(tmp_path: Path, field, value) -> None:
    import dataclasses
    import json

    good = RequestResult(0, 0.0, 0.1, 0.02, 0.3, "ok", 200, 3, 12, 11, None)
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({**dataclasses.asdict(good), field: value}) + "\n")
    with pytest.raises(DataFormatError, match=f"{field} must be") as info:
        read_results_jsonl(path)
    assert info.value.line == 1


# --- the CLI driver -----------------------------------------------------------------------------


def test_run_load_cli_writes_requests_and_summary(
    server_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    code = run_load_cli(
        server_url, MODEL, "poisson", 8.0, 1.0, None, out, 1.0, 0.5, 4, 3, None, 0, False
    )
    assert code == 0
    results = read_results_jsonl(out / "requests.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    assert results and summary["requests"] == len(results) == summary["ok"]
    assert summary["adapter_versions"] == {str(VERSION): len(results)}
    assert summary["config"]["schedule"] == "poisson"
    assert "goodput" in capsys.readouterr().out
    # Each run's prompts carry a tag of its own (a prefix cache holds none of an earlier run's);
    # with --tokenizer the lengths are the named model's tokens.
    again = tmp_path / "again"
    code = run_load_cli(
        server_url, MODEL, "poisson", 8.0, 1.0, None, again, 1.0, 0.5, 4, 3, None, 0, False,
        tokenizer="tiny",
    )  # fmt: skip
    other = json.loads((again / "summary.json").read_text())["config"]
    assert code == 0 and other["tokenizer"] == "tiny"
    assert re.fullmatch("[0-9a-f]{4}", other["prompt_tag"])
    assert other["prompt_tag"] != summary["config"]["prompt_tag"]


def test_run_load_cli_replays_a_trace(server_url: str, tmp_path: Path) -> None:
    trace = write_sample_trace(tmp_path / "trace.csv", n=50, seed=3)
    out = tmp_path / "run"
    code = run_load_cli(
        server_url, MODEL, "poisson", 10.0, 1.0, str(trace), out, 1.0, 0.5, 16, 2, None, 0, True
    )
    assert code == 0
    results = read_results_jsonl(out / "requests.jsonl")
    assert results and all(r.status == "ok" and r.output_tokens <= 2 for r in results)
    assert all(r.prompt_tokens is not None and r.prompt_tokens <= 16 for r in results)


def test_a_trace_shorter_than_the_duration_is_measured_over_the_time_it_ran(
    server_url: str, tmp_path: Path
) -> None:
    trace = write_sample_trace(tmp_path / "trace.csv", n=10, seed=3)
    out = tmp_path / "run"
    code = run_load_cli(  # the target as OpenAI clients take it, with /v1
        server_url + "/v1",
        MODEL,
        "poisson",
        10.0,
        60.0,
        str(trace),
        out,
        1.0,
        0.5,
        16,
        2,
        None,
        0,
        False,
    )
    summary = json.loads((out / "summary.json").read_text())
    assert code == 0 and summary["ok"] == 10
    assert summary["duration_s"] == pytest.approx(1.0)  # 10 requests at 10 req/s, not 60 s
    assert summary["config"]["duration_s"] == 60.0


def test_replay_reports_progress_while_running(server_url: str) -> None:
    snapshots: list[ReplayProgress] = []
    specs = [RequestSpec(0.0, "x", 10), RequestSpec(0.0, "OVERLOAD", 1)]
    results = asyncio.run(
        replay(
            server_url,
            MODEL,
            specs,
            timeout_s=10.0,
            progress=snapshots.append,
            progress_every_s=0.1,
        )
    )
    assert [r.status for r in results] == ["ok", "http_503"]
    assert snapshots and all(s.sent == 2 and s.dropped == 0 for s in snapshots)
    # while the long request streams, the rejected one is already reported as completed
    assert any(
        s.in_flight == 1 and [r.status for r in s.completed] == ["http_503"] for s in snapshots
    )


@pytest.mark.parametrize("sig", ["SIGINT", "SIGHUP"])
def test_ctrl_c_stops_the_load_and_keeps_what_it_measured(
    server_url: str, tmp_path: Path, sig: str
) -> None:
    # A hang-up (the SSH session gone) as Ctrl-C: it raised out of the replay, and nothing that
    # was measured was written.
    import signal
    import subprocess
    import sys

    def hang_ups_not_ignored() -> None:  # (a test run under nohup would pass its SIG_IGN on)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)

    out = tmp_path / "out"
    collm = str(Path(sys.executable).with_name("collm"))
    before = RECEIVED[0]
    args = ["--rate", "5", "--duration", "120", "--output-tokens", "4", "--out", str(out)]
    proc = subprocess.Popen(
        [collm, "load", "--target", server_url, "--model", MODEL, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=hang_ups_not_ignored,
    )
    try:
        deadline = time.monotonic() + 60
        while RECEIVED[0] - before < 3:  # the load is under way (polling the fake server)
            assert proc.poll() is None and time.monotonic() < deadline, "the load did not start"
            time.sleep(0.05)
        proc.send_signal(getattr(signal, sig))
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    if sig == "SIGINT":  # (after a hang-up its output goes nowhere: the terminal is gone)
        assert "interrupted after" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["interrupted_at_s"] < 60  # not the whole 120-s schedule
    assert 3 <= summary["requests"] < 600 and summary["ok"] >= 3
    assert summary["duration_s"] == pytest.approx(summary["config"]["interrupted_at_s"])
    assert len(read_results_jsonl(out / "requests.jsonl")) == summary["requests"]


def test_an_interrupted_run_is_measured_from_when_its_schedule_started(
    server_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The time a stopped run is measured over counts from the replay's own start (offset 0),
    not from before it sorted the requests and built its clients: a setup slowed by 0.5 s is no
    part of it."""
    import os
    import signal

    from collm_fl.loadgen.arrivals import arrival_times

    rate, duration, seed = 0.05, 60.0, 1
    assert arrival_times("poisson", rate, duration, seed)[0] > 10  # nothing due before the stop
    built, built_at, signalled_at = threading.Event(), [], []

    class SlowToBuild(httpx.AsyncClient):
        def __init__(self, *args: object, **kwargs: object) -> None:
            time.sleep(0.5)  # (a slow setup, before the schedule's clock starts)
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            built_at.append(time.monotonic())  # (the clock asyncio's loop.time() reads)
            built.set()

    def interrupt() -> None:
        assert built.wait(30.0)
        time.sleep(1.0)  # (the stop comes a second into the schedule: the time under test)
        signalled_at.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(httpx, "AsyncClient", SlowToBuild)
    stopper = threading.Thread(target=interrupt, daemon=True)
    stopper.start()
    out = tmp_path / "run"
    code = run_load_cli(
        server_url, MODEL, "poisson", rate, duration, None, out, 1.0, 0.5, 4, 3, None, seed, False
    )
    returned_at = time.monotonic()
    stopper.join(timeout=10.0)
    summary = json.loads((out / "summary.json").read_text())
    stopped = summary["config"]["interrupted_at_s"]
    assert code == 130 and summary["requests"] == 0
    assert summary["duration_s"] == stopped
    # The schedule started once its client was built, and the signal was handled between its
    # sending and run_load_cli's return: a clock started before the setup reads 0.5 s more.
    assert signalled_at[0] - built_at[0] - 0.1 <= stopped <= returned_at - built_at[0]


def test_an_answer_that_came_whole_has_no_tpot(server_url: str) -> None:
    # A server that ignores "stream" shows no token timing: TTFT is the whole answer, TPOT unknown
    # (0 would pull the percentiles down).
    (r,) = _replay(server_url, [RequestSpec(0.0, "hello WHOLE", 5)])
    assert r.status == "ok" and r.output_tokens == 5
    assert r.tpot_s is None
    assert r.ttft_s is not None and r.e2e_s is not None and 5 * DELAY_S <= r.ttft_s <= r.e2e_s


def test_a_whole_reply_that_failed_or_has_no_answer_is_an_error_and_a_long_one_is_read(
    server_url: str,
) -> None:
    specs = [
        RequestSpec(0.0, "x WHOLE FAILED", 5),
        RequestSpec(0.0, "x WHOLE EMPTY", 5),
        RequestSpec(0.0, "x WHOLE LONG", 5),
    ]
    failed, empty, long = sorted(_replay(server_url, specs), key=lambda r: r.index)
    assert failed.status == "error" and failed.error == "the server reported a generation error"
    assert empty.status == "error" and "without choices" in (empty.error or "")
    assert long.status == "ok" and long.output_tokens == 5  # (the usage's count)


def test_a_trace_cut_by_the_duration_is_measured_over_the_duration(
    server_url: str, tmp_path: Path
) -> None:
    # Arrivals every 0.1 s for 4 s, a lull, then more from 7 s on: cut at 6 s, the replay stands
    # for 6 s (the trace goes on), not for "last kept arrival + one gap" (4.1 s).
    from datetime import datetime, timedelta

    t0 = datetime(2023, 11, 16, 18, 0, 0)
    offsets = [i / 10 for i in range(41)] + [7 + i / 10 for i in range(130)]
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    lines += [f"{(t0 + timedelta(seconds=o)).isoformat(sep=' ')},8,2" for o in offsets]
    trace = tmp_path / "gap.csv"
    trace.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    code = run_load_cli(
        server_url, MODEL, "poisson", 0.0, 6.0, str(trace), out, 1.0, 0.5, 16, 2, None, 0, False
    )
    summary = json.loads((out / "summary.json").read_text())
    assert code == 0 and summary["requests"] == 41
    assert summary["duration_s"] == pytest.approx(6.0)
    assert summary["goodput_rps"] == pytest.approx(summary["slo_met"] / 6.0)


def test_results_written_before_a_defaulted_field_existed_still_read(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    good = RequestResult(0, 0.0, 0.1, 0.02, 0.3, "ok", 200, 3, 12, 11, None)
    write_results_jsonl([good], path)
    old = json.loads(path.read_text())
    del old["late_s"]  # an older collm wrote no send lag
    path.write_text(json.dumps(old) + "\n")
    assert read_results_jsonl(path) == [good]
    path.write_text(json.dumps({**old, "surprise": 1}) + "\n")
    with pytest.raises(DataFormatError, match="expected the fields"):
        read_results_jsonl(path)


@pytest.mark.parametrize(
    "first",
    [
        {"reasoning_content": "Let me think"},
        {"reasoning": "Let me think"},
        {"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": ""}}]},
        {"content": "Hello"},
    ],
)
def test_the_first_token_is_the_first_streamed_answer_thought_or_tool_call(first) -> None:
    """TTFT at the first delta a chat stream shows, whatever it holds: a reasoning model's
    thinking counted as no token would make TPOT divide the answer's time by every token."""
    from collm_fl.loadgen.client import _StreamReader

    reader = _StreamReader(chat=True)

    def chunk(delta: dict) -> str:
        return "data: " + json.dumps({"choices": [{"index": 0, "delta": delta}]})

    assert not reader.feed(chunk({"role": "assistant"}), 0.1)  # (a role alone is no token)
    assert reader.first_content_s is None
    assert not reader.feed(chunk(first), 0.5)
    assert not reader.feed(chunk({"content": " world"}), 0.9)
    assert reader.first_content_s == 0.5 and reader.chunks == 2


def test_the_progress_line_counts_each_finished_request_once(capsys) -> None:
    from collm_fl.loadgen import _progress_printer
    from collm_fl.loadgen.client import ReplayProgress
    from collm_fl.loadgen.goodput import SLOSpec

    def result(i: int, status: str = "ok", ttft: float = 0.1) -> RequestResult:
        return RequestResult(i, 0.0, ttft, 0.01, ttft + 0.1, status, 200, 1, 8, 8, None)

    show = _progress_printer(SLOSpec(1.0, 0.5))
    done = [result(0), result(1, ttft=5.0)]
    show(ReplayProgress(10.0, 3, 1, 0, tuple(done)))
    done += [result(2, status="error"), result(3)]
    show(ReplayProgress(20.0, 4, 0, 0, tuple(done)))
    first, second = capsys.readouterr().err.splitlines()
    assert "done 2  errors 0" in first and "goodput 0.10 req/s" in first
    assert "done 4  errors 1" in second and "goodput 0.10 req/s" in second


def test_a_negative_rate_for_a_trace_is_refused(tmp_path: Path) -> None:
    from collm_fl.errors import ConfigError

    trace = write_sample_trace(tmp_path / "t.csv", n=20, seed=1)
    out = tmp_path / "o"
    args = ("poisson", -5.0, 10.0, str(trace), out, 1.0, 0.5, 16, 2, None, 0, False)
    with pytest.raises(ConfigError, match="--rate must be a finite number >= 0"):
        run_load_cli("http://127.0.0.1:9", MODEL, *args)
    assert not out.exists()


def test_a_replay_asked_to_ignore_eos_gets_every_requests_whole_length(server_url: str) -> None:
    # A trace's GeneratedTokens were caps only: a model's end-of-sequence cut answers short.
    specs = [RequestSpec(0.0, "hello SHORT", 5)]
    (short,) = _replay(server_url, specs, timeout_s=10.0)
    (whole,) = _replay(server_url, specs, timeout_s=10.0, ignore_eos=True)
    assert (short.status, short.output_tokens) == ("ok", 2)
    assert (whole.status, whole.output_tokens) == ("ok", 5)


def test_a_signal_while_the_results_are_written_leaves_both_files_of_the_run(
    server_url: str, tmp_path: Path, monkeypatch
) -> None:
    # (a Ctrl-C between requests.jsonl and summary.json left one run's requests beside another
    # run's summary)
    import os
    import signal

    import collm_fl.loadgen as loadgen

    write = loadgen.write_results_jsonl

    def interrupted_after(results, path):
        write(results, path)
        os.kill(os.getpid(), signal.SIGINT)  # (Python's default: KeyboardInterrupt)

    monkeypatch.setattr(loadgen, "write_results_jsonl", interrupted_after)
    out = tmp_path / "run"
    args = ("poisson", 50.0, 0.2, None, out, 1.0, 0.5, 4, 2, None, 0, False)
    # Ctrl-C as at a terminal (a test run in the background inherits SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_load_cli(server_url, MODEL, *args)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert (out / "requests.jsonl").is_file() and (out / "summary.json").is_file()


def test_signals_wait_while_the_results_are_written() -> None:
    # (a Ctrl-C between requests.jsonl and summary.json left one run's requests beside
    # another run's summary)
    import os
    import signal

    from collm_fl.loadgen import _signals_held

    got: list[str] = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: got.append("delivered"))
    try:
        with _signals_held([signal.SIGUSR1]):
            os.kill(os.getpid(), signal.SIGUSR1)
            got.append("written")
        assert got == ["written", "delivered"]
    finally:
        signal.signal(signal.SIGUSR1, previous)
