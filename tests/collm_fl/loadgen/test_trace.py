"""Azure-format traces: parsing (7-digit fractions), every bad-row case, scaling, the sample."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from collm_fl.errors import ConfigError, DataFormatError
from collm_fl.loadgen.trace import (
    Trace,
    TraceRow,
    load_azure_trace,
    mean_rate,
    scale_trace,
    trace_duration,
    write_sample_trace,
)

HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens"


def _write(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "trace.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_azure_timestamps_with_seven_fractional_digits_become_offsets(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        HEADER,
        "2023-11-16 18:15:46.6805900,374,44",
        "2023-11-16 18:15:47.0000001,396,109",
        "2023-11-16 18:16:46.6805900,879,0",
        "",
    )
    rows = load_azure_trace(path)
    assert [r.context_tokens for r in rows] == [374, 396, 879]
    assert [r.generated_tokens for r in rows] == [44, 109, 0]
    assert rows[0].offset_s == 0.0
    assert rows[1].offset_s == pytest.approx(0.3194101, abs=1e-9)
    assert rows[2].offset_s == pytest.approx(60.0, abs=1e-9)


def test_rows_are_sorted_and_offsets_start_at_the_earliest(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        HEADER,
        "2023-11-16 18:15:50,1,1",
        "2023-11-16 18:15:46.5,2,2",
        "2023-11-16T18:15:48,3,3",
    )
    rows = load_azure_trace(path)
    assert [(r.offset_s, r.context_tokens) for r in rows] == [(0.0, 2), (1.5, 3), (3.5, 1)]


def test_time_zones_put_every_row_on_one_time_line_and_a_bom_is_no_header_change(
    tmp_path: Path,
) -> None:
    path = tmp_path / "trace.csv"
    rows = [
        "2023-11-16 18:00:00Z,1,1",
        "2023-11-16 19:00:01+01:00,2,2",  # 18:00:01 UTC
        "2023-11-16T10:00:03-0800,3,3",  # 18:00:03 UTC
        "2023-11-16 18:00:02+00:00,4,4",
    ]
    path.write_text("\ufeff" + "\n".join([HEADER, *rows]) + "\n", encoding="utf-8")
    got = load_azure_trace(path)
    assert [(r.offset_s, r.context_tokens) for r in got] == [(0.0, 1), (1.0, 2), (2.0, 4), (3.0, 3)]


def test_a_count_too_long_for_an_integer_is_a_format_error_not_a_traceback(
    tmp_path: Path,
) -> None:
    # (int() of 4300+ digits raises ValueError: it was an exit 1 with a traceback)
    path = _write(tmp_path, HEADER, "1.0," + "9" * 5000 + ",1")
    with pytest.raises(DataFormatError, match=r"at most 18 digits: '9{40}\.\.\. \(5000 char"):
        load_azure_trace(path)
    with pytest.raises(DataFormatError, match="invalid time zone offset"):
        load_azure_trace(_write(tmp_path, HEADER, "2023-11-16 18:00:00+25:00,1,1"))
    with pytest.raises(DataFormatError, match="invalid timestamp"):  # (shifted out of range)
        load_azure_trace(_write(tmp_path, HEADER, "0001-01-01 00:00:00+01:00,1,1"))


def test_plain_float_seconds_are_accepted(tmp_path: Path) -> None:
    rows = load_azure_trace(_write(tmp_path, HEADER, "10.25,5,6", "12.5,7,8"))
    assert list(rows) == [TraceRow(0.0, 5, 6), TraceRow(2.25, 7, 8)]


@pytest.mark.parametrize(
    ("lines", "line", "reason"),
    [
        (["TIMESTAMP,Context,Generated", "1.0,1,1"], 1, "expected the header"),
        ([HEADER, "1.0,1,1", "2023-11-16 18:15:46.1,10"], 3, "expected 3 columns"),
        ([HEADER, "1.0,1,1,9"], 2, "expected 3 columns"),
        ([HEADER, "1.0,1,1", "2.0,abc,5"], 3, "ContextTokens is not an integer"),
        ([HEADER, "1.0,1,1", "2.0,5,"], 3, "GeneratedTokens is not an integer"),
        ([HEADER, "1.0,-1,5"], 2, "ContextTokens is negative"),
        ([HEADER, "1.0,1,1", "2.0,1,1", "yesterday,1,2"], 4, "unparseable timestamp"),
        ([HEADER, "2023-13-45 18:15:46.1,1,1"], 2, "invalid timestamp"),
        ([HEADER, "2023-11-16 18:15:46.1234567890,1,1"], 2, "unparseable timestamp"),
        ([HEADER, "-3.0,1,1"], 2, "unparseable timestamp"),
        ([HEADER, "2023-11-16 18:15:46.1,1,1", "5.0,1,1"], 3, "seconds timestamp"),
        ([HEADER, "1.0,1_000,1"], 2, "ContextTokens is not an integer"),
        ([HEADER, "1.0,1,1", ",,"], 3, "timestamp"),  # a row of empty cells is no blank line
        ([HEADER, "1.0,1,1", " , , "], 3, "timestamp"),
        ([HEADER, '1.0,"1\n2",1'], 3, "ContextTokens is not an integer"),  # a quoted break
        ([HEADER, "1.0,1,1\u2028", "2.0,x,1"], 3, "ContextTokens is not an integer"),
        # a quote left open swallows the rest of the file: blamed where it began
        ([HEADER, "1.0,1,1", '2.0,"2,1', "3.0,1,1", "4.0,1,1"], 3, "an unclosed quote?"),
        ([HEADER, "1.0,1,1", '2.0,"' + "x" * 200_000], 3, "not a readable CSV row"),
    ],
)
def test_bad_rows_are_data_format_errors_with_the_line(
    tmp_path: Path, lines: list[str], line: int, reason: str
) -> None:
    path = _write(tmp_path, *lines)
    with pytest.raises(DataFormatError, match=re.escape(reason)) as info:
        load_azure_trace(path)
    assert info.value.line == line
    assert info.value.path == str(path)


def test_a_trace_without_requests_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="no requests"):
        load_azure_trace(_write(tmp_path, HEADER))
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataFormatError, match="no requests"):
        load_azure_trace(empty)


def test_a_missing_file_is_a_data_format_error(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="no such file"):
        load_azure_trace(tmp_path / "absent.csv")


def test_the_sample_trace_has_the_azure_format_and_loads(tmp_path: Path) -> None:
    path = write_sample_trace(tmp_path / "sample.csv", n=300, seed=0)
    lines = path.read_text().splitlines()
    assert lines[0] == HEADER and len(lines) == 301
    pattern = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{7},\d+,\d+$")
    assert all(pattern.match(line) for line in lines[1:])
    rows = load_azure_trace(path)
    assert len(rows) == 300 and rows[0].offset_s == 0.0
    assert all(r.context_tokens >= 1 and r.generated_tokens >= 1 for r in rows)
    assert path.read_text() == write_sample_trace(tmp_path / "again.csv", 300, 0).read_text()


def test_scaling_hits_the_target_rate(tmp_path: Path) -> None:
    rows = load_azure_trace(write_sample_trace(tmp_path / "s.csv", n=400, seed=1))
    scaled = scale_trace(rows, 3.0, None, 100_000, 100_000)
    assert len(scaled) == 400
    assert mean_rate(scaled) == pytest.approx(3.0, rel=1e-9)
    # time is stretched uniformly: the burst structure (gap ratios) is kept
    assert scaled[10].offset_s / scaled[200].offset_s == pytest.approx(
        rows[10].offset_s / rows[200].offset_s
    )


def test_scaling_cuts_to_the_duration_and_clips_lengths(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rows = load_azure_trace(write_sample_trace(tmp_path / "s.csv", n=400, seed=2))
    with caplog.at_level(logging.INFO, logger="collm_fl.loadgen.trace"):
        scaled = scale_trace(rows, 4.0, 30.0, 512, 64)
    assert scaled and all(r.offset_s < 30.0 for r in scaled)
    assert len(scaled) == pytest.approx(4.0 * 30.0, rel=0.5)  # bursty: loose
    assert max(r.context_tokens for r in scaled) == 512
    assert max(r.generated_tokens for r in scaled) == 64
    n_ctx = sum(r.context_tokens > 512 for r in rows[: len(scaled)])
    assert f"clipped {n_ctx} of {len(scaled)} prompts" in caplog.text


def test_scaling_without_target_keeps_the_recorded_timing() -> None:
    rows = [TraceRow(0.0, 1, 1), TraceRow(1.0, 2, 2), TraceRow(5.0, 3, 3)]
    assert list(scale_trace(rows, None, 2.0, 10, 10)) == rows[:2]
    # Unsorted rows are replayed in arrival order (ties in their given order).
    shuffled = [TraceRow(5.0, 3, 3), TraceRow(1.0, 2, 2), TraceRow(0.0, 1, 1), TraceRow(1.0, 4, 4)]
    assert [r.context_tokens for r in scale_trace(shuffled, None, None, 10, 10)] == [1, 2, 4, 3]


@pytest.mark.parametrize(
    ("rows", "kwargs", "param"),
    [
        ([], {}, "rows"),
        ([TraceRow(0.0, 1, 1)], {"target_rate": 2.0}, "target_rate"),
        ([TraceRow(0.0, 1, 1), TraceRow(1.0, 1, 1)], {"target_rate": -1.0}, "target_rate"),
        ([TraceRow(0.0, 1, 1)], {"duration_s": 0.0}, "duration_s"),
        ([TraceRow(0.0, 1, 1)], {"max_context_tokens": 0}, "max_context_tokens"),
        ([TraceRow(0.0, 1, 1)], {"max_generated_tokens": 0}, "max_generated_tokens"),
    ],
)
def test_invalid_scaling_is_a_config_error_naming_the_parameter(
    rows: list[TraceRow], kwargs: dict[str, float], param: str
) -> None:
    args: dict[str, float | None] = {
        "target_rate": None,
        "duration_s": None,
        "max_context_tokens": 10,
        "max_generated_tokens": 10,
    }
    args.update(kwargs)
    with pytest.raises(ConfigError, match=f"^{param}"):
        scale_trace(rows, **args)  # type: ignore[arg-type]


def test_a_trace_that_ends_before_the_duration_stands_for_the_time_it_ran() -> None:
    rows = [TraceRow(0.0, 1, 1), TraceRow(1.0, 1, 1), TraceRow(2.0, 1, 1)]  # 1 req/s
    assert trace_duration(rows, 60.0) == pytest.approx(3.0)  # last arrival + one mean gap
    assert trace_duration(rows, 2.5) == 2.5
    assert trace_duration([TraceRow(0.0, 1, 1)], 60.0) == 60.0  # no rate to go by


def test_a_long_trace_is_read_as_it_is_parsed_and_says_how_far_it_got(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Read line by line (not into one string first), with a progress line every PROGRESS_ROWS
    requests: a week-long trace takes minutes; and a bad byte half-way is a clear error."""
    from collm_fl.loadgen import trace

    monkeypatch.setattr(trace, "PROGRESS_ROWS", 2)
    path = _write(tmp_path, HEADER, *(f"{i}.5,{i + 1},{i + 2}" for i in range(5)))
    with caplog.at_level(logging.INFO, logger="collm_fl.loadgen.trace"):
        rows = load_azure_trace(path)
    assert [r.context_tokens for r in rows] == [1, 2, 3, 4, 5]
    progress = [m for m in caplog.messages if "requests read" in m]
    assert progress == [f"{path}: 2 requests read (line 3)", f"{path}: 4 requests read (line 5)"]
    path.write_bytes(path.read_bytes() + b"7.5,1,\xff\n")
    with pytest.raises(DataFormatError, match="not UTF-8") as bad:
        load_azure_trace(path)
    assert bad.value.line is not None and bad.value.line <= 7  # (the bad byte's line, or before)


def test_a_loaded_trace_holds_three_columns_of_24_bytes_a_request_and_reads_as_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A million-request trace held as TraceRow objects took 174 MB (tracemalloc); as columns,
    8 bytes each for the offset and the two lengths. Indexing, slicing and iteration (made in
    chunks) give the same rows."""
    from collm_fl.loadgen import trace as trace_module

    rows = load_azure_trace(write_sample_trace(tmp_path / "s.csv", n=1000, seed=3))
    assert isinstance(rows, Trace) and len(rows) == 1000
    assert rows.offsets.nbytes + rows.context.nbytes + rows.generated.nbytes == 24 * 1000
    monkeypatch.setattr(trace_module, "_ITER_CHUNK", 7)  # (chunks end inside the trace)
    as_list = list(rows)
    assert len(as_list) == 1000 and all(isinstance(r, TraceRow) for r in as_list)
    assert as_list[-1] == rows[-1] == rows[999] and as_list[123] == rows[123]
    assert isinstance(rows[123].context_tokens, int) and isinstance(rows[0].offset_s, float)
    assert list(rows[10:20]) == as_list[10:20] and isinstance(rows[10:20], Trace)
    with pytest.raises(IndexError):
        rows[1000]
    assert rows == Trace.from_rows(as_list) and rows != as_list  # (as a tuple is not a list)
    assert rows[:500] != rows[500:]
    cut = rows.before(rows[400].offset_s)
    assert len(cut) == 400 and all(r.offset_s < rows[400].offset_s for r in cut)
    with pytest.raises(ValueError, match="one length"):
        Trace([0.0, 1.0], [1], [1, 2])
    with pytest.raises(ValueError, match="read-only"):
        rows.offsets[0] = 5.0  # (a slice shares its parent's memory: none can change it)


def test_plain_seconds_beyond_a_64_bit_count_are_a_format_error(tmp_path: Path) -> None:
    # Epoch nanoseconds (above 2**53, below 2**63) are a trace rescaling puts right: kept.
    rows = load_azure_trace(
        _write(tmp_path, HEADER, "1700000000000000000,1,1", "1700000000500000000,2,2")
    )
    assert [r.offset_s for r in rows] == [0.0, 500000000.0]
    path = _write(tmp_path, HEADER, "0.5,1,1", "1e300,1,1")
    with pytest.raises(DataFormatError, match="beyond 2\\*\\*63 seconds") as bad:
        load_azure_trace(path)
    assert bad.value.line == 3


def test_a_length_cap_beyond_int64_caps_nothing() -> None:
    rows = [TraceRow(0.0, 5, 6), TraceRow(1.0, 7, 8)]
    assert list(scale_trace(rows, None, None, 10**19, 10**30)) == rows
