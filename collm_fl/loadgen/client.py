"""Open-loop replay of a request schedule against an OpenAI-compatible endpoint.

Open loop: every request is sent at its scheduled offset whether or not earlier ones have finished
(closed-loop clients slow down with the server and hide its queueing). Requests stream, so the time
to first token is taken at the first content chunk. The run is bounded by construction: at most
``max_in_flight`` requests are open (a request that finds the bound full is recorded as ``dropped``
and not sent), and each one is cut off after ``timeout_s``, so a replay ends by its last offset plus
``timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from collm_fl.api.streams import drain
from collm_fl.errors import ConfigError, DataFormatError
from collm_fl.loadgen.trace import TraceRow
from collm_fl.reports import write_text_atomic

log = logging.getLogger(__name__)

STATUS_OK = "ok"
STATUS_ERROR = "error"  # transport failure, malformed stream, or an error reported mid-stream
STATUS_TIMEOUT = "timeout"
# not sent: max_in_flight requests were already open, or the load was stopped after it was due
STATUS_DROPPED = "dropped"
STATUS_ABANDONED = "abandoned"  # sent, then given up on when the replay was abandoned
STOPPED_DUE = "not sent: the load was stopped after it was due (the generator was behind)"
MAX_ERROR_BODY_BYTES = 65_536
MAX_WHOLE_REPLY_BYTES = 64 * 1024 * 1024  # a whole (not streamed) answer: long, never unbounded

# Original filler in an Elizabethan manner (not from any play), cut into prompts by FillerPrompts.
FILLER_TEXT = """
Good morrow to the patient clerk who counts the hours by candle and by bell, for he shall hear
of ships that sail from Tyre with spices, silk and letters sealed in wax. The steward swears the
granary is full, yet mice make merry in the loft above the stair, and every groom that saddles
the grey mare says the road to Mantua is mired past the knee. What news, good cousin, from the
court? The duke is pleased to hunt at dawn and sup at dusk; the duchess reads her almanac and
frowns at every comet. Fair Rosalind hath writ a sonnet to the moon, which rhymes but little and
scans less, yet all the pages learn it by the heart. Come, fill the cup and mend the fire; the
wind is sharp upon the battlements tonight, and the watch hath seen a lantern on the marsh that
no honest traveller would carry. Let the players in, and bid them speak the speech as it was
taught them, trippingly, and not saw the air too much with their hands. Tomorrow we ride for
Verona with the merchant's bond, three hundred ducats and a ring of gold, and if the bridge be
down we shall cross by the mill where the miller's daughter sings of lovers lost at sea.
"""


@dataclass(frozen=True)
class RequestSpec:
    """One request of a schedule."""

    offset_s: float  # send time, seconds after the replay starts
    prompt: str
    max_tokens: int
    chat: bool = False  # /v1/chat/completions with one user message, else /v1/completions
    prompt_tokens: int | None = None  # the length the prompt was built for (an estimate)


@dataclass(frozen=True)
class RequestResult:
    """What happened to one request. Times are seconds; latencies exist where they were observed."""

    index: int  # position in the replayed request list
    sent_at: float | None  # seconds after the replay start it was sent (dropped: when it was due)
    ttft_s: float | None  # until the first content chunk
    tpot_s: float | None  # (e2e − ttft) / (output_tokens − 1), ok requests with > 1 token
    e2e_s: float | None  # until [DONE] (failed requests: until the failure was seen)
    status: str  # "ok" | "http_<code>" | "error" | "timeout" | "dropped" | "abandoned"
    http_status: int | None
    adapter_version: int | None  # the version that served it (None: the base model)
    prompt_tokens: int | None  # from `usage` if the server sent it, else the built-for estimate
    output_tokens: int  # from `usage` if sent, else the number of content chunks
    error: str | None
    # How far behind its scheduled offset it was sent (the load generator's own lag; latencies
    # count from the actual send, so a lagging generator would hide queueing from them).
    late_s: float = 0.0


class _NumberedPrompts:
    """What both prompt sources share: each prompt's lead, ``[k]`` or ``[<tag>-k]``."""

    def __init__(self, tag: str) -> None:
        self._count = 0
        self._tag = f"{tag}-" if tag else ""

    def _lead(self, n: int) -> str:
        """The next prompt's number, for a prompt of ``n`` tokens (checked)."""
        if n < 1:
            raise ConfigError(f"prompt_tokens: must be >= 1, got {n}")
        lead, self._count = f"[{self._tag}{self._count}]", self._count + 1
        return lead


class FillerPrompts(_NumberedPrompts):
    """A prompt source: about ``n`` tokens of text per call, counted as words.

    Words approximate tokens (BPE tokenizers give ~1.3 tokens per English word, so prompts come out
    somewhat longer); :class:`TokenizerPrompts` (``collm load --tokenizer``) counts the served
    model's tokens. Each prompt opens with its own number, ``[k]`` (``[<tag>-k]`` given a
    ``tag``: ``collm load`` draws one per run), then filler from where the previous one ended
    (wrapping around): no two prompts share a prefix, so a server that caches prefixes (vLLM's,
    SGLang's) serves them none from its cache, nor, with a tag, a later run's.
    """

    def __init__(self, text: str = FILLER_TEXT, tag: str = "") -> None:
        super().__init__(tag)
        self._words = text.split()
        if not self._words:
            raise ConfigError("text: the filler text has no words")
        self._cursor = 0

    def __call__(self, n: int) -> str:
        lead = self._lead(n)
        words, start = self._words, self._cursor
        self._cursor = (start + n - 1) % len(words)
        return " ".join([lead, *(words[(start + i) % len(words)] for i in range(n - 1))])


class TokenizerPrompts(_NumberedPrompts):
    """A prompt source of ``n`` tokens per call as ``tokenizer`` (the served model's) encodes the
    text without special tokens (a server adding a BOS token, or a chat template around it, counts
    those besides): exactly ``n``, or where no cut of the text re-encodes to ``n`` (merges across
    its joins), the closest count below. Each prompt opens with its own number, as FillerPrompts';
    one shorter than its number's tokens is the number cut short (so not always unique).
    """

    def __init__(self, tokenizer: Any, text: str = FILLER_TEXT, tag: str = "") -> None:
        super().__init__(tag)
        self._tokenizer = tokenizer
        self._ids: list[int] = self._encode(" ".join(text.split()))
        if not self._ids:
            raise ConfigError("text: the filler text encodes to no tokens")
        self._cursor = 0

    def _encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def _body(self, start: int, length: int) -> str:
        ids = self._ids
        return str(self._tokenizer.decode([ids[(start + i) % len(ids)] for i in range(length)]))

    def __call__(self, n: int) -> str:
        lead = self._lead(n)
        start = self._cursor
        # The text re-encodes to about its tokens' count (merges across the joins): the body is
        # cut or lengthened by the difference until it re-encodes to n, or the closest below.
        body = max(0, n - len(self._encode(lead + " x")) + 1)
        best: tuple[str, int, int] | None = None  # (text, tokens, body length)
        for _ in range(8):
            text = f"{lead} {self._body(start, body).strip()}" if body else lead
            got = len(self._encode(text))
            if got <= n and (best is None or got > best[1]):
                best = (text, got, body)
            step = max(0, body + n - got)
            if got == n or step == body:
                break
            body = step
        if best is None:  # the number alone is more than n tokens: cut short
            ids = self._encode(lead)[:n]
            best = (str(self._tokenizer.decode(ids)), n, 0)
        self._cursor = (start + best[2]) % len(self._ids)
        return best[0]


def build_requests(
    schedule: Sequence[float] | Sequence[TraceRow] | np.ndarray,
    prompt_tokens: int,
    output_tokens: int,
    prompt_source: Callable[[int], str] | None = None,
    chat: bool = False,
) -> list[RequestSpec]:
    """Requests for arrival offsets (fixed lengths) or trace rows (their own lengths), by offset.

    ``prompt_source(n)`` returns text of about ``n`` tokens (default: FillerPrompts()). Trace rows
    with zero-length prompts or answers are raised to one token (the API needs at least one).
    """
    if prompt_tokens < 1:
        raise ConfigError(f"prompt_tokens: must be >= 1, got {prompt_tokens}")
    if output_tokens < 1:
        raise ConfigError(f"output_tokens: must be >= 1, got {output_tokens}")
    source = prompt_source if prompt_source is not None else FillerPrompts()
    specs: list[RequestSpec] = []
    for item in schedule:
        if isinstance(item, TraceRow):
            offset, n_in, n_out = item.offset_s, item.context_tokens, item.generated_tokens
        else:
            offset, n_in, n_out = float(item), prompt_tokens, output_tokens
        if not (math.isfinite(offset) and offset >= 0):
            raise ConfigError(f"schedule: offsets must be finite and >= 0, got {offset}")
        n_in, n_out = max(1, n_in), max(1, n_out)
        specs.append(RequestSpec(offset, source(n_in), n_out, chat, n_in))
    specs.sort(key=lambda s: s.offset_s)
    return specs


@dataclass(frozen=True)
class ReplayProgress:
    """A snapshot during a replay, for progress reports."""

    elapsed_s: float
    sent: int
    in_flight: int
    dropped: int
    completed: tuple[RequestResult, ...]  # finished requests (dropped ones excluded)


async def replay(
    base_url: str,
    model: str,
    requests: Sequence[RequestSpec],
    api_key: str | None = None,
    timeout_s: float = 120.0,
    max_in_flight: int = 256,
    progress: Callable[[ReplayProgress], None] | None = None,
    progress_every_s: float = 10.0,
    stop: asyncio.Event | None = None,
    route: Callable[[int], str] | None = None,
    abandon: asyncio.Event | None = None,
    ignore_eos: bool = False,
    on_start: Callable[[float], None] | None = None,
) -> list[RequestResult]:
    """Send every request at its offset (open loop) and return one result per request, in order.

    Once ``stop`` is set no further request is sent; those in flight finish (each within
    ``timeout_s``) and the result holds the requests sent or dropped until then. Once
    ``abandon`` is set too, those still in flight are cancelled and recorded as abandoned
    (``STATUS_ABANDONED``): the replay returns at once with what it measured. ``route``, if
    given, names the base URL of request ``i`` when it is due (a load balancer whose set of
    servers changes during the replay); else every request goes to ``base_url``.
    ``ignore_eos`` asks for every request's whole ``max_tokens`` (vLLM's ``ignore_eos``, which
    ``collm replica`` takes too; OpenAI's API refuses it), so a trace's output lengths are the
    lengths served, not caps a model's end-of-sequence cuts short. ``on_start``, if given, is
    called with the event-loop time the offsets count from once the replay has set up (its
    clients built), so a caller times a stop on the schedule's clock, not from before the setup.
    """
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise ConfigError(f"timeout_s: must be a finite number > 0, got {timeout_s}")
    if max_in_flight < 1:
        raise ConfigError(f"max_in_flight: must be >= 1, got {max_in_flight}")
    if progress_every_s <= 0:
        raise ConfigError(f"progress_every_s: must be > 0, got {progress_every_s}")
    results: list[RequestResult | None] = [None] * len(requests)
    completed: list[RequestResult] = []
    order = sorted(range(len(requests)), key=lambda i: requests[i].offset_s)
    loop = asyncio.get_running_loop()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max_in_flight, max_keepalive_connections=max_in_flight)
    in_flight = sent = dropped = 0

    async with contextlib.AsyncExitStack() as clients:
        by_url: dict[str, httpx.AsyncClient] = {}

        def client_for(url: str) -> httpx.AsyncClient:
            url = url.rstrip("/")
            if url not in by_url:  # (an AsyncClient opens nothing until its first request)
                by_url[url] = httpx.AsyncClient(
                    base_url=url, headers=headers, limits=limits, timeout=timeout_s
                )
                clients.push_async_callback(by_url[url].aclose)
            return by_url[url]

        client_for(base_url)
        start = loop.time()
        if on_start is not None:
            on_start(start)

        async def run_one(i: int, client: httpx.AsyncClient) -> None:
            nonlocal in_flight
            sent_at = loop.time() - start
            try:
                result = await _send(client, model, requests[i], i, start, timeout_s, ignore_eos)
                results[i] = result
                completed.append(result)
            except asyncio.CancelledError:
                if abandon is not None and abandon.is_set():
                    results[i] = _abandoned(i, sent_at, loop.time() - start, requests[i])
                raise
            finally:
                in_flight -= 1

        async def report() -> None:
            while True:
                await asyncio.sleep(progress_every_s)
                if progress is not None:
                    snap = ReplayProgress(
                        loop.time() - start, sent, in_flight, dropped, tuple(completed)
                    )
                    progress(snap)

        async with asyncio.TaskGroup() as tg:
            reporter = tg.create_task(report()) if progress is not None else None
            tasks: list[asyncio.Task[None]] = []
            for pos, i in enumerate(order):
                delay = start + requests[i].offset_s - loop.time()
                if delay > 0:
                    await _sleep_unless(stop, delay)
                if stop is not None and stop.is_set():
                    due_by = loop.time() - start
                    unsent = [j for j in order[pos:] if requests[j].offset_s < due_by]
                    for j in unsent:  # (a lagging generator had not sent them yet)
                        results[j] = _dropped(j, requests[j].offset_s, requests[j], STOPPED_DUE)
                    if unsent:
                        log.warning(
                            "%d requests were due but not sent when the load was stopped: "
                            "counted as not meeting the SLO",
                            len(unsent),
                        )
                    break
                if in_flight >= max_in_flight:
                    dropped += 1
                    results[i] = _dropped(i, loop.time() - start, requests[i])
                    continue
                in_flight += 1
                sent += 1
                client = client_for(base_url if route is None else route(i))
                tasks.append(tg.create_task(run_one(i, client)))
            await _finish(tasks, abandon)
            if reporter is not None:
                reporter.cancel()
    if dropped:
        log.warning(
            "%d of %d requests dropped at max_in_flight=%d", dropped, len(requests), max_in_flight
        )
    return [r for r in results if r is not None]


async def _sleep_unless(stop: asyncio.Event | None, seconds: float) -> None:
    """Sleep ``seconds``, or less if ``stop`` is set meanwhile."""
    if stop is None:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def _finish(tasks: Sequence[asyncio.Task[None]], abandon: asyncio.Event | None) -> None:
    """Wait for every task, or until ``abandon`` is set: then cancel those left."""
    if abandon is None:
        await asyncio.gather(*tasks)  # (as before abandoning existed: a task's error raises here)
        return
    if not tasks:
        return
    everything = asyncio.gather(*tasks, return_exceptions=True)
    abandoned = asyncio.ensure_future(abandon.wait())
    either: list[asyncio.Future[Any]] = [everything, abandoned]
    try:
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    finally:
        abandoned.cancel()
    if not everything.done():
        for task in tasks:
            task.cancel()
    for outcome in await everything:  # (cancelled ones come back as CancelledError)
        if isinstance(outcome, Exception):
            raise outcome


def _abandoned(index: int, sent_at: float, now: float, spec: RequestSpec) -> RequestResult:
    return RequestResult(
        index,
        sent_at,
        None,
        None,
        now - sent_at,
        STATUS_ABANDONED,
        None,
        None,
        spec.prompt_tokens,
        0,
        "abandoned: the load was stopped before it finished",
        late_s=max(0.0, sent_at - spec.offset_s),  # (it was sent: its lag counts as any other's)
    )


def _dropped(
    index: int, due_at: float, spec: RequestSpec, error: str | None = None
) -> RequestResult:
    return RequestResult(
        index, due_at, None, None, None, STATUS_DROPPED, None, None, spec.prompt_tokens, 0, error
    )


class _StreamReader:
    """Accumulates an SSE completion stream: timings, token count, version, errors."""

    def __init__(self, chat: bool) -> None:
        self.chat = chat
        self.first_content_s: float | None = None
        self.whole = False  # the answer came as one JSON reply, not a stream
        self.chunks = 0
        self.usage_out: int | None = None
        self.usage_in: int | None = None
        self.version: int | None = None
        self.done = False
        self.error: str | None = None

    def feed(self, line: str, now: float) -> bool:
        """Take one SSE line seen at ``now``; True when the stream is over ([DONE] or an error)."""
        if not line.startswith("data:"):
            return False  # blank separators, comments (":"), event/id/retry fields
        payload = line[5:].strip()
        if payload == "[DONE]":
            self.done = True
            return True
        try:
            obj = json.loads(payload)
        except json.JSONDecodeError:
            self.error = f"malformed chunk: {payload[:200]!r}"
            return True
        if not isinstance(obj, dict):
            self.error = f"malformed chunk: {payload[:200]!r}"
            return True
        if "error" in obj:
            self.error = _error_message(obj)
            return True
        self.absorb(obj, now)
        return False

    def absorb(self, obj: dict[str, object], now: float) -> None:
        """Take one chunk (or a whole non-streamed reply)."""
        version = obj.get("adapter_version")
        if isinstance(version, int):
            if self.version is not None and version != self.version:
                log.warning("adapter_version changed mid-request: %s -> %s", self.version, version)
            else:
                self.version = version
        usage = obj.get("usage")
        if isinstance(usage, dict):
            out, inp = usage.get("completion_tokens"), usage.get("prompt_tokens")
            self.usage_out = out if isinstance(out, int) else self.usage_out
            self.usage_in = inp if isinstance(inp, int) else self.usage_in
        choices = obj.get("choices")
        if not (isinstance(choices, list) and choices and isinstance(choices[0], dict)):
            return
        choice = choices[0]
        if self.chat:  # streamed chunks carry a delta, a whole reply a message
            part = choice.get("delta") or choice.get("message")
            # The first token is the first one the server streamed, answer or not: a reasoning
            # model's thinking (vLLM's reasoning_content, others' reasoning) and a tool call
            # count, else TPOT would divide the time after them by tokens decoded before it.
            shown = isinstance(part, dict) and (
                any(isinstance(part.get(k), str) and part.get(k) for k in _CHAT_TEXT_KEYS)
                or bool(part.get("tool_calls"))
            )
        else:
            text = choice.get("text")
            shown = isinstance(text, str) and bool(text)
        if shown:
            self.chunks += 1
            if self.first_content_s is None:
                self.first_content_s = now
        if choice.get("finish_reason") == "error":
            self.error = "the server reported a generation error"


_CHAT_TEXT_KEYS = ("content", "reasoning_content", "reasoning")


async def _send(
    client: httpx.AsyncClient,
    model: str,
    spec: RequestSpec,
    index: int,
    start: float,
    timeout_s: float,
    ignore_eos: bool = False,
) -> RequestResult:
    loop = asyncio.get_running_loop()
    sent = loop.time()
    body: dict[str, object] = {
        "model": model,
        "max_tokens": spec.max_tokens,
        "stream": True,
        # The served token counts: a token that decodes to no text sends no chunk to count.
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        body["ignore_eos"] = True
    if spec.chat:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": spec.prompt}]
    else:
        path, body["prompt"] = "/v1/completions", spec.prompt
    reader = _StreamReader(spec.chat)
    http_status: int | None = None
    status = STATUS_OK
    finished: float | None = None  # seconds after the send when [DONE] arrived
    try:
        async with asyncio.timeout(timeout_s):
            async with client.stream("POST", path, json=body) as resp:
                http_status = resp.status_code
                if resp.status_code != 200:
                    status = f"http_{resp.status_code}"
                    reader.error = _error_message(await _read_json(resp))
                elif resp.headers.get("content-type", "").startswith("text/event-stream"):
                    lines = resp.aiter_lines()
                    async for line in lines:
                        if reader.feed(line, loop.time() - sent):
                            finished = loop.time() - sent  # (before the body's last bytes)
                            await drain(lines)  # (the connection goes back to the pool)
                            break
                else:  # the server ignored "stream": one JSON reply, first token = last token
                    reader.whole = True
                    reply = await _read_json(resp, MAX_WHOLE_REPLY_BYTES)
                    if "error" in reply:
                        reader.error = _error_message(reply)
                    else:
                        reader.absorb(reply, loop.time() - sent)  # (may find a failed choice)
                        choices = reply.get("choices")
                        if reader.error is None and not (isinstance(choices, list) and choices):
                            reader.error = f"a reply without choices: {str(reply)[:200]}"
                    reader.done = reader.error is None
    except (TimeoutError, httpx.TimeoutException):
        if finished is None:  # (else the timeout came while reading past [DONE]: it is whole)
            status, reader.error = STATUS_TIMEOUT, f"no complete answer within {timeout_s}s"
    except httpx.HTTPError as e:
        status, reader.error = STATUS_ERROR, f"{type(e).__name__}: {e}"
    e2e = loop.time() - sent if finished is None else finished
    if status == STATUS_OK and (reader.error or not reader.done):
        status = STATUS_ERROR
        reader.error = reader.error or "the stream ended before data: [DONE]"
    out = reader.usage_out if reader.usage_out is not None else reader.chunks
    ttft = reader.first_content_s
    streamed = ttft is not None and not reader.whole
    if status == STATUS_OK and ttft is None:
        ttft = e2e  # no visible text (e.g. an immediate stop): the answer came whole at the end
    # Per output token only over a stream that showed when its tokens came: an answer that came
    # whole has no TPOT to measure (not 0, which would pull the percentiles down).
    tpot = None
    if status == STATUS_OK and streamed and ttft is not None and out > 1:
        tpot = (e2e - ttft) / (out - 1)
    if reader.error and status != STATUS_TIMEOUT:
        log.debug("request %d: %s: %s", index, status, reader.error)
    return RequestResult(
        index=index,
        sent_at=sent - start,
        late_s=max(0.0, sent - start - spec.offset_s),
        ttft_s=ttft,
        tpot_s=tpot,
        e2e_s=e2e,
        status=status,
        http_status=http_status,
        adapter_version=reader.version,
        prompt_tokens=reader.usage_in if reader.usage_in is not None else spec.prompt_tokens,
        output_tokens=out,
        error=reader.error,
    )


async def _read_json(resp: httpx.Response, limit: int = MAX_ERROR_BODY_BYTES) -> dict[str, object]:
    """A reply body as a JSON object (at most ``limit`` bytes; else a stand-in error)."""
    raw = bytearray()
    async for chunk in resp.aiter_bytes():
        raw += chunk
        if len(raw) > limit:
            head = raw[:200].decode("utf-8", "replace")
            what = f"a reply of more than {limit} bytes (HTTP {resp.status_code}): {head}"
            return {"error": {"message": what}}
    text = raw.decode("utf-8", "replace")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return {"error": {"message": text[:200] or f"empty reply with HTTP {resp.status_code}"}}
    return obj if isinstance(obj, dict) else {"error": {"message": text[:200]}}


def _error_message(obj: dict[str, object]) -> str:
    err = obj.get("error")
    if isinstance(err, dict):
        kind, message = err.get("type"), err.get("message")
        return f"{kind}: {message}" if kind else str(message)
    return str(err if err is not None else obj)[:200]


def write_results_jsonl(results: Sequence[RequestResult], path: str | Path) -> Path:
    """Write one JSON object per result (the RequestResult fields), by a rename of a complete
    file (a crash leaves the old file or none, never half a log)."""
    out = Path(path)
    write_text_atomic(out, "".join(json.dumps(asdict(r)) + "\n" for r in results))
    return out


def read_results_jsonl(path: str | Path) -> list[RequestResult]:
    """Results written by write_results_jsonl; a malformed line is a DataFormatError naming it."""
    where = str(path)
    names = {f.name for f in fields(RequestResult)}
    # Fields added later have defaults: files written before them still read.
    required = {
        f.name
        for f in fields(RequestResult)
        if f.default is MISSING and f.default_factory is MISSING
    }
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as e:
        raise DataFormatError(where, "no such file") from e
    out: list[RequestResult] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(where, f"invalid JSON: {e.msg}", number) from e
        if not isinstance(obj, dict) or not required <= set(obj) <= names:
            got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise DataFormatError(
                where,
                f"expected the fields {sorted(names)} (of which {sorted(names - required)} may "
                f"be missing), got {got}",
                number,
            )
        for name, value in obj.items():
            if not _is_kind(value, _RESULT_KINDS[name]):
                raise DataFormatError(
                    where, f"{name} must be {_RESULT_KINDS[name]}, got {value!r}", number
                )
        out.append(RequestResult(**obj))
    return out


# What each field of a results line may hold (read_results_jsonl checks every one).
_RESULT_KINDS = {
    "index": "an integer",
    "sent_at": "a number or null",
    "ttft_s": "a number or null",
    "tpot_s": "a number or null",
    "e2e_s": "a number or null",
    "status": "a string",
    "http_status": "an integer or null",
    "adapter_version": "an integer or null",
    "prompt_tokens": "an integer or null",
    "output_tokens": "an integer",
    "error": "a string or null",
    "late_s": "a number",
}


def _is_kind(value: object, kind: str) -> bool:
    if value is None:
        return kind.endswith("or null")
    if isinstance(value, bool):
        return False
    if kind.startswith("an integer"):
        return isinstance(value, int)
    if kind.startswith("a number"):
        return isinstance(value, int | float) and math.isfinite(value)
    return isinstance(value, str)
