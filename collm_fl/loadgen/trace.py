"""Request traces in the Azure LLM inference trace format: load, rescale, and write a sample.

The format (Azure Public Dataset, ``AzureLLMInferenceTrace_{code,conv}.csv``) is a CSV with the
header ``TIMESTAMP,ContextTokens,GeneratedTokens``; a timestamp looks like
``2023-11-16 18:15:46.6805900`` (seconds with up to 7 fractional digits, i.e. 100 ns ticks). Plain
float seconds are accepted too, so a trace can also be written by hand. Offsets are kept relative
to the earliest request.

The sample trace is *generated* (bursty gamma gaps, log-normal lengths in the range of the published
conversation trace); it is not a copy of the Azure data.
"""

from __future__ import annotations

import csv
import logging
import math
import re
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, overload

import numpy as np

from collm_fl.errors import ConfigError, DataFormatError

if TYPE_CHECKING:
    from _csv import Reader

log = logging.getLogger(__name__)

HEADER: tuple[str, str, str] = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
PROGRESS_ROWS = 500_000  # a progress line every this many requests read
_COUNT_RE = re.compile(r"-?[0-9]{1,18}")  # a token count as the trace writes it (int64 at most)

_DATETIME_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[ T](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"(Z|[+-]\d{2}:?\d{2})?$"
)
_FLOAT_RE = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_INT64_MAX = 2**63 - 1  # the columns' counts (and a plain-seconds timestamp's whole seconds)


@dataclass(frozen=True, slots=True)
class TraceRow:
    """One request of a trace: when it arrives and how long its prompt and its answer are."""

    offset_s: float  # seconds after the trace's first request
    context_tokens: int  # prompt length
    generated_tokens: int  # answer length


_ITER_CHUNK = 65_536  # rows made at a time when a Trace is iterated


class Trace(Sequence[TraceRow]):
    """A trace's requests as three columns (offsets, prompt and answer lengths): 24 bytes a
    request, where a list of TraceRow objects takes about 170 (a week-long trace is tens of
    millions of requests). Indexing and iteration give TraceRow values; a slice is a Trace.

    Traces compare equal when their columns are equal; a Trace is not equal to a list of the
    same rows (as a tuple is not equal to a list): compare ``list(trace)``.
    """

    __slots__ = ("context", "generated", "offsets")

    def __init__(
        self,
        offsets: np.ndarray | Sequence[float],
        context: np.ndarray | Sequence[int],
        generated: np.ndarray | Sequence[int],
    ) -> None:
        self.offsets = np.asarray(offsets, dtype=np.float64)
        self.context = np.asarray(context, dtype=np.int64)
        self.generated = np.asarray(generated, dtype=np.int64)
        n = {len(self.offsets), len(self.context), len(self.generated)}
        if self.offsets.ndim != 1 or len(n) != 1:
            raise ValueError("a Trace's three columns must be 1-D and of one length")
        for column in (self.offsets, self.context, self.generated):
            column.flags.writeable = False  # (a slice shares its parent's memory)

    @classmethod
    def from_rows(cls, rows: Sequence[TraceRow]) -> Trace:
        """A Trace of the rows, in their order (a Trace is returned as it is)."""
        if isinstance(rows, Trace):
            return rows
        return cls(
            [r.offset_s for r in rows],
            [r.context_tokens for r in rows],
            [r.generated_tokens for r in rows],
        )

    def __len__(self) -> int:
        return len(self.offsets)

    @overload
    def __getitem__(self, index: int) -> TraceRow: ...

    @overload
    def __getitem__(self, index: slice) -> Trace: ...

    def __getitem__(self, index: int | slice) -> TraceRow | Trace:
        if isinstance(index, slice):
            return Trace(self.offsets[index], self.context[index], self.generated[index])
        i = range(len(self))[index]  # (IndexError for one out of range, negatives from the end)
        return TraceRow(float(self.offsets[i]), int(self.context[i]), int(self.generated[i]))

    def __iter__(self) -> Iterator[TraceRow]:
        for start in range(0, len(self), _ITER_CHUNK):
            end = start + _ITER_CHUNK
            yield from map(
                TraceRow,
                self.offsets[start:end].tolist(),
                self.context[start:end].tolist(),
                self.generated[start:end].tolist(),
            )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Trace):
            return NotImplemented
        return (
            np.array_equal(self.offsets, other.offsets)
            and np.array_equal(self.context, other.context)
            and np.array_equal(self.generated, other.generated)
        )

    __hash__ = None  # type: ignore[assignment]  # (compared by value, over arrays: as a list)

    def __repr__(self) -> str:
        span = f", {self.offsets[-1] - self.offsets[0]:.1f}s" if len(self) else ""
        return f"Trace({len(self)} requests{span})"

    def before(self, offset_s: float) -> Trace:
        """The requests sent before ``offset_s`` (the rows must be sorted by offset)."""
        return self[: int(np.searchsorted(self.offsets, offset_s, side="left"))]


def load_azure_trace(path: str | Path) -> Trace:
    """The rows of an Azure-format trace CSV, sorted by arrival, offsets from the first arrival.

    Every malformed row (wrong column count, non-integer or negative length, unparseable timestamp),
    a wrong header, or a trace without rows is a DataFormatError naming the file and the line.
    """
    where = str(path)
    try:  # read as it is parsed, not whole: a week-long trace is millions of lines
        with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: a BOM from Excel
            return _load(csv.reader(f), where)
    except FileNotFoundError as e:
        raise DataFormatError(where, "no such file") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DataFormatError(where, f"cannot read the trace: {e}") from e


def _load(reader: Reader, where: str) -> Trace:
    # Columns as they are read, 32 bytes a request: whole seconds and their fraction apart (a float
    # epoch loses the 100 ns ticks), then the two lengths.
    whole, fraction, context, generated = array("q"), array("d"), array("q"), array("q")
    kind: str | None = None  # "datetime" or "seconds", fixed by the first row
    header_seen = False
    ended = 0  # the line the previous row ended on
    for fields in _rows(reader, where):
        number = reader.line_num  # the physical line a row ends on (quoted breaks count)
        begun, ended = ended + 1, number
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            continue  # blank lines (a trailing newline, hand-written files); not ",," rows
        if number - begun > 1 and any(len(f.splitlines()) > 2 for f in fields):
            # A quote left open swallows every line after it into one field: name where it began.
            raise DataFormatError(
                where, f"a quoted field runs from here to line {number}: an unclosed quote?", begun
            )
        cells = [f.strip() for f in fields]
        if not header_seen:
            if tuple(c.lower() for c in cells) != tuple(h.lower() for h in HEADER):
                raise DataFormatError(
                    where, f"expected the header {','.join(HEADER)}, got {','.join(cells)}", number
                )
            header_seen = True
            continue
        if len(cells) != 3:
            raise DataFormatError(where, f"expected 3 columns, got {len(cells)}", number)
        stamp, row_kind = _parse_timestamp(cells[0], where, number)
        if kind is not None and row_kind != kind:
            raise DataFormatError(where, f"a {row_kind} timestamp in a trace of {kind}", number)
        kind = row_kind
        ctx = _parse_count(cells[1], HEADER[1], where, number)
        gen = _parse_count(cells[2], HEADER[2], where, number)
        whole.append(stamp[0])
        fraction.append(stamp[1])
        context.append(ctx)
        generated.append(gen)
        if len(whole) % PROGRESS_ROWS == 0:  # (a long trace takes a minute or more to read)
            log.info("%s: %d requests read (line %d)", where, len(whole), number)
    if not whole:
        raise DataFormatError(where, "the trace has no requests")
    seconds = np.frombuffer(whole, dtype=np.int64)
    ticks = np.frombuffer(fraction, dtype=np.float64)
    first = np.lexsort((ticks, seconds))[0]  # the earliest: by whole seconds, then fraction
    offsets = (seconds - seconds[first]).astype(np.float64) + (ticks - ticks[first])
    order = np.argsort(offsets, kind="stable")  # (ties keep the file's order)
    rows = Trace(
        offsets[order],
        np.frombuffer(context, dtype=np.int64)[order],
        np.frombuffer(generated, dtype=np.int64)[order],
    )
    log.info("loaded %d requests spanning %.1fs from %s", len(rows), rows.offsets[-1], where)
    return rows


def _rows(reader: Reader, where: str) -> Iterator[list[str]]:
    """The reader's rows; the csv module's own errors (a field over its size limit, a NUL) as a
    DataFormatError at the line it stopped on."""
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataFormatError(where, f"not a readable CSV row: {e}", reader.line_num) from e
        except UnicodeDecodeError as e:  # (read as it is parsed: near the line after the last)
            raise DataFormatError(
                where, f"not UTF-8 text ({e.reason}) at or after this line", reader.line_num + 1
            ) from e
        yield fields


def _parse_timestamp(cell: str, where: str, line: int) -> tuple[tuple[int, float], str]:
    m = _DATETIME_RE.match(cell)
    if m:
        year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
        try:
            dt = datetime(year, month, day, hour, minute, second, tzinfo=UTC)
        except ValueError as e:
            raise DataFormatError(where, f"invalid timestamp {cell!r}: {e}", line) from e
        frac = float("0." + m.group(7)) if m.group(7) else 0.0
        offset = m.group(8)
        if offset and offset != "Z":  # (a trace mixing zones stays in one time line)
            sign = -1 if offset[0] == "-" else 1
            hours, minutes = int(offset[1:3]), int(offset[-2:])
            if hours > 23 or minutes > 59:
                raise DataFormatError(where, f"invalid time zone offset in {cell!r}", line)
            try:
                dt -= sign * timedelta(hours=hours, minutes=minutes)
            except OverflowError as e:  # (year 1 or 9999 shifted out of range)
                raise DataFormatError(where, f"invalid timestamp {cell!r}: {e}", line) from e
        return (int((dt - _EPOCH).total_seconds()), frac), "datetime"
    if _FLOAT_RE.match(cell):
        value = float(cell)
        if math.isfinite(value) and value >= 0:
            if value > _INT64_MAX:
                raise DataFormatError(
                    where, f"timestamp {cell!r} is beyond 2**63 seconds (a 64-bit count)", line
                )
            whole = math.floor(value)
            return (whole, value - whole), "seconds"
    raise DataFormatError(
        where,
        f"unparseable timestamp {cell!r} (expected YYYY-MM-DD HH:MM:SS[.f][Z|±HH:MM] or seconds)",
        line,
    )


def _parse_count(cell: str, column: str, where: str, line: int) -> int:
    if not _COUNT_RE.fullmatch(cell):  # int() would take "1_000", " 7" or "+3" too
        shown = cell if len(cell) <= 40 else f"{cell[:40]}... ({len(cell)} characters)"
        raise DataFormatError(
            where, f"{column} is not an integer of at most 18 digits: {shown!r}", line
        )
    value = int(cell)
    if value < 0:
        raise DataFormatError(where, f"{column} is negative: {value}", line)
    return value


def mean_rate(rows: Sequence[TraceRow]) -> float:
    """Requests per second of a trace: the inverse of its mean gap between arrivals (0: none)."""
    span = rows[-1].offset_s - rows[0].offset_s if rows else 0.0
    return (len(rows) - 1) / span if span > 0 else 0.0


def trace_duration(rows: Sequence[TraceRow], duration_s: float) -> float:
    """The seconds a replayed (scaled, cut) trace stands for: ``duration_s``, or less when the
    trace ends before it — its last arrival plus one mean gap — so rates are per time it ran."""
    rate = mean_rate(rows)
    if not rows or rate <= 0:
        return duration_s
    played = rows[-1].offset_s - rows[0].offset_s + 1.0 / rate
    if played < duration_s:
        log.info(
            "the trace lasts %.1fs at this rate, less than %.0fs: rates are per %.1fs",
            played,
            duration_s,
            played,
        )
    return min(duration_s, played)


def scale_trace(
    rows: Sequence[TraceRow],
    target_rate: float | None,
    duration_s: float | None,
    max_context_tokens: int,
    max_generated_tokens: int,
) -> Trace:
    """A trace replayable on a given replica: time-scaled, lengths clipped, cut to a duration.

    ``target_rate`` (requests/s) stretches or compresses time so that the mean inter-arrival gap is
    ``1 / target_rate`` (burst structure kept); None keeps the recorded timing. Lengths above the
    maxima are clipped (how many, logged). ``duration_s`` keeps the requests sent before it.
    """
    if not rows:
        raise ConfigError("rows: the trace is empty")
    for name, limit in (
        ("max_context_tokens", max_context_tokens),
        ("max_generated_tokens", max_generated_tokens),
    ):
        if limit < 1:
            raise ConfigError(f"{name}: must be >= 1, got {limit}")
    if duration_s is not None and not (math.isfinite(duration_s) and duration_s > 0):
        raise ConfigError(f"duration_s: must be a finite number > 0, got {duration_s!r}")
    ordered = Trace.from_rows(rows)
    if not np.all(ordered.offsets[1:] >= ordered.offsets[:-1]):
        order = np.argsort(ordered.offsets, kind="stable")
        ordered = Trace(ordered.offsets[order], ordered.context[order], ordered.generated[order])
    factor = 1.0
    if target_rate is not None:
        if not (math.isfinite(target_rate) and target_rate > 0):
            raise ConfigError(f"target_rate: must be a finite number > 0, got {target_rate!r}")
        recorded = mean_rate(ordered)
        if recorded <= 0:
            raise ConfigError("target_rate: the trace spans no time (one request?), cannot rescale")
        factor = recorded / target_rate
    offsets = (ordered.offsets - ordered.offsets[0]) * factor
    n = len(offsets)
    if duration_s is not None:  # (the first request is at 0 < duration_s: at least one is kept)
        n = int(np.searchsorted(offsets, duration_s, side="left"))
    ctx, gen = ordered.context[:n], ordered.generated[:n]
    # (a cap above int64's range caps nothing: NumPy refuses to compare with it)
    ctx_cap, gen_cap = min(max_context_tokens, _INT64_MAX), min(max_generated_tokens, _INT64_MAX)
    clipped_ctx = int(np.count_nonzero(ctx > ctx_cap))
    clipped_gen = int(np.count_nonzero(gen > gen_cap))
    out = Trace(offsets[:n], np.minimum(ctx, ctx_cap), np.minimum(gen, gen_cap))
    if clipped_ctx or clipped_gen:
        log.info(
            "clipped %d of %d prompts to %d tokens and %d answers to %d tokens",
            clipped_ctx,
            len(out),
            max_context_tokens,
            clipped_gen,
            max_generated_tokens,
        )
    log.info(
        "trace scaled by %.4g: %d requests in %.1fs (mean rate %.3f/s)",
        factor,
        len(out),
        out.offsets[-1],
        mean_rate(out),
    )
    return out


def write_sample_trace(path: str | Path, n: int, seed: int) -> Path:
    """Write a synthetic, realistic-looking bursty trace of ``n`` requests in the Azure format.

    Gaps are gamma with CV 3 around 0.5 s (bursts and lulls); prompt lengths are log-normal around
    ~1000 tokens and answer lengths around ~200, clipped to [1, 16000] and [1, 2000].
    """
    if n < 1:
        raise ConfigError(f"n: must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    cv, mean_gap = 3.0, 0.5
    k = 1.0 / cv**2
    ticks_per_s = 10_000_000  # the format's 7 fractional digits
    gaps = rng.gamma(k, mean_gap / k, n - 1) if n > 1 else np.zeros(0)
    ticks = np.concatenate([[0], np.cumsum(np.round(gaps * ticks_per_s).astype(np.int64))])
    start_ticks = int(rng.integers(0, ticks_per_s))  # a fractional first second, as recorded
    context = np.clip(np.round(rng.lognormal(np.log(1000), 0.9, n)), 1, 16000).astype(int)
    generated = np.clip(np.round(rng.lognormal(np.log(200), 0.8, n)), 1, 2000).astype(int)
    start = datetime(2023, 11, 16, 18, 15, 46)
    out = Path(path)
    with out.open("w", encoding="utf-8", newline="") as f:
        f.write(",".join(HEADER) + "\n")
        for t, ctx, gen in zip(ticks, context, generated, strict=True):
            whole, frac = divmod(start_ticks + int(t), ticks_per_s)
            stamp = (start + timedelta(seconds=whole)).strftime("%Y-%m-%d %H:%M:%S")
            f.write(f"{stamp}.{frac:07d},{ctx},{gen}\n")
    return out
