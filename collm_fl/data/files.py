"""User-supplied training data: read JSON / JSONL / text files into records, and format them.

Supported files:

* ``.json`` — a list of records; ``.jsonl`` — one record per line (blank lines are skipped);
* ``.txt`` / ``.md`` — plain text, split on paragraph boundaries into samples of about
  ``TEXT_SAMPLE_CHARS`` characters.

A record is one of

* instruction style ``{"instruction": str, "input": str (optional), "output": str}``;
* chat style ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`` whose
  last message is the assistant's answer;
* plain text ``{"text": str}``.

Reading and formatting are split because formatting a conversation needs the model's tokenizer
(its chat template): `load_records` returns `ChatRecord`s, `format_records` turns them into
`TextSample`s whose ``prompt`` (not trained on) is everything up to the final answer.
Every problem raises `DataFormatError` naming the file and, for JSONL, the line (for JSON, the
record index is in the reason).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from collm_fl.data.types import ROLES, ChatRecord, Record, TextSample
from collm_fl.errors import ChatTemplateError, DataFormatError

if TYPE_CHECKING:  # transformers is heavy; only the type is needed here
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

SUFFIXES = (".json", ".jsonl", ".txt", ".md")
TEXT_SAMPLE_CHARS = 1000  # target size of a plain-text sample
# Used when the tokenizer has no chat template: one "### Role:" header per turn, then the header
# the model should answer under.
FALLBACK_HEADERS = {
    "system": "### System:\n",
    "user": "### User:\n",
    "assistant": "### Assistant:\n",
}

_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


def pack_text(pieces: list[str], min_chars: int, max_chars: int, sep: str = "\n") -> list[str]:
    """Group consecutive pieces (paragraphs, speeches) into texts of about min..max characters.

    A text is closed once it reaches ``min_chars`` or when the next piece would push it past
    ``max_chars``; a piece longer than ``max_chars`` is first cut at whitespace, so no text is
    much longer than ``max_chars`` (a single word can be).
    """
    texts: list[str] = []
    current = ""
    for piece in (part for p in pieces for part in cut_text(p, max_chars)):
        if current and len(current) + len(sep) + len(piece) > max_chars:
            texts.append(current)
            current = ""
        current = f"{current}{sep}{piece}" if current else piece
        if len(current) >= min_chars:
            texts.append(current)
            current = ""
    if current:
        texts.append(current)
    return texts


def cut_text(piece: str, max_chars: int) -> list[str]:
    """Cut a text longer than ``max_chars`` at spaces into parts of at most ``max_chars``; a
    stretch with no space that is longer still (Chinese, Japanese or Thai text; a long URL) is
    cut at its line breaks, then every ``max_chars`` characters."""
    if len(piece) <= max_chars:
        return [piece]
    parts: list[str] = []
    current = ""
    for word in (c for w in piece.split(" ") for c in _hard_cut(w, max_chars)):
        if current and len(current) + 1 + len(word) > max_chars:
            parts.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    if current:
        parts.append(current)
    return parts


def load_records(path: str | Path) -> list[Record]:
    """Read one ``.json``/``.jsonl``/``.txt``/``.md`` file into records, validating every one."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(str(path), "no such file")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataFormatError(
            str(path), f"unsupported file type '{suffix}'; expected one of {', '.join(SUFFIXES)}"
        )
    text = _read_utf8(path)
    if suffix == ".json":
        records = _parse_json(text, path)
    elif suffix == ".jsonl":
        records = _parse_jsonl(text, path)
    else:
        paragraphs = [p.strip() for p in _PARAGRAPH_BREAK.split(text) if p.strip()]
        records = [
            TextSample(text=t)
            for t in pack_text(
                paragraphs, int(TEXT_SAMPLE_CHARS * 0.8), int(TEXT_SAMPLE_CHARS * 1.2), "\n\n"
            )
        ]
    if not records:
        raise DataFormatError(str(path), "no records found (the file is empty)")
    logger.debug("%s: %d records", path, len(records))
    return records


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        # -sig: a byte-order mark (Notepad's and Excel's exports) is not part of the text.
        return data.decode("utf-8-sig").replace("\r\n", "\n")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataFormatError(
            str(path), f"not valid UTF-8 (byte {e.start}: {e.reason})", line=line
        ) from e


def _parse_json(text: str, path: Path) -> list[Record]:
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise _invalid_json(e, path, getattr(e, "lineno", None)) from e
    if not isinstance(data, list):
        raise DataFormatError(str(path), f"expected a JSON list of records, got {_kind(data)}")
    records: list[Record] = []
    for index, item in enumerate(data):
        try:
            records.append(parse_record(item))
        except ValueError as e:
            raise DataFormatError(str(path), f"record {index}: {e}", record=index) from e
    return records


def _parse_jsonl(text: str, path: Path) -> list[Record]:
    records: list[Record] = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise _invalid_json(e, path, number) from e
        try:
            records.append(parse_record(item))
        except ValueError as e:
            raise DataFormatError(str(path), str(e), line=number) from e
    return records


def _invalid_json(e: ValueError | RecursionError, path: Path, line: int | None) -> DataFormatError:
    """What JSON the parser refused: a syntax error, and also what ``json`` raises otherwise (a
    number of more digits than Python converts, a nesting too deep to decode)."""
    if isinstance(e, json.JSONDecodeError):
        why = e.msg
    elif isinstance(e, RecursionError):
        why = "nested too deeply"
    else:
        why = str(e).split(";")[0]  # (the digits limit: its advice is for programs, not files)
    return DataFormatError(str(path), f"invalid JSON: {why}", line=line)


def _kind(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    names |= {int: "a number", float: "a number"}
    return names.get(type(value), "null" if value is None else f"a {type(value).__name__}")


def _check_encodable(value: str, what: str) -> None:
    """JSON's "\\ud800" escapes decode to lone surrogates, which no tokenizer can encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{what} holds an invalid character (a lone surrogate, {value[e.start]!r}) at "
            f"position {e.start}"
        ) from None


def _text_field(record: dict[str, object], key: str, required: bool = True) -> str:
    if key not in record:
        if required:
            raise ValueError(f"missing key '{key}'")
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise ValueError(f"'{key}' must be a string, got {_kind(value)}")
    _check_encodable(value, f"'{key}'")
    if required and not value.strip():
        raise ValueError(f"'{key}' is empty")
    return value


def parse_record(item: object) -> Record:
    """Validate one decoded JSON record; raises ``ValueError`` saying what is wrong with it."""
    if not isinstance(item, dict):
        raise ValueError(f"expected a JSON object, got {_kind(item)}")
    if "messages" in item:
        return _parse_chat(item["messages"])
    if "instruction" in item or "output" in item:
        instruction = _text_field(item, "instruction")
        extra = _text_field(item, "input", required=False)
        output = _text_field(item, "output")
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return ChatRecord(messages=(("user", user), ("assistant", output)))
    if "text" in item:
        return TextSample(text=_text_field(item, "text"))
    raise ValueError(
        "unknown record: expected keys 'instruction'/'output', 'messages' or 'text'; "
        f"got {sorted(item)}"
    )


def _parse_chat(messages: object) -> ChatRecord:
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    pairs: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be an object, got {_kind(message)}")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}; got {role!r}")
        content = message.get("content")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string, got {_kind(content)}")
        _check_encodable(content, f"messages[{i}].content")
        pairs.append((role, content))
    if pairs[-1][0] != "assistant":
        raise ValueError(f"the last message must be from the assistant, not {pairs[-1][0]!r}")
    if not pairs[-1][1].strip():
        raise ValueError("the last (assistant) message is empty")
    if not any(role == "user" for role, _ in pairs[:-1]):
        raise ValueError("no user message before the assistant's answer")
    return ChatRecord(messages=tuple(pairs))


def _hard_cut(word: str, max_chars: int) -> list[str]:
    if len(word) <= max_chars:
        return [word]
    return [
        line[i : i + max_chars]
        for line in word.split("\n")
        for i in range(0, len(line), max_chars)
        if line[i : i + max_chars].strip()
    ]


def format_records(
    records: list[Record], tokenizer: PreTrainedTokenizerBase | None = None, source: str = ""
) -> list[TextSample]:
    """Turn records into samples: a chat's prompt via the tokenizer's chat template.

    The prompt is ``apply_chat_template(messages[:-1], add_generation_prompt=True)``; the text is
    that prompt, the final answer and the tokenizer's eos token. Without a tokenizer or without a
    chat template the `FALLBACK_HEADERS` template is used:
    ``"### User:\\n{user}\\n\\n### Assistant:\\n{answer}"``.
    Plain `TextSample`s pass through unchanged. A conversation the chat template refuses is a
    `DataFormatError` naming ``source`` (the file) and the record's number in it.
    """
    eos = (tokenizer.eos_token or "") if tokenizer is not None else ""
    samples: list[TextSample] = []
    for number, record in enumerate(records, 1):
        if isinstance(record, TextSample):
            samples.append(record)
            continue
        history, answer = record.messages[:-1], record.messages[-1][1]
        try:
            prompt = chat_prompt(history, tokenizer)
        except ChatTemplateError as e:
            raise DataFormatError(
                source or "<records>", f"record {number}: {e}", record=number
            ) from e
        samples.append(TextSample(text=f"{prompt}{answer}{eos}", prompt=prompt))
    return samples


def chat_prompt(
    messages: Sequence[tuple[str, str]], tokenizer: PreTrainedTokenizerBase | None
) -> str:
    """The prompt text that asks the model for the next assistant turn after ``messages``.

    Training (`format_records`) and serving (the replica's chat endpoint) both use this, so a
    model is served with exactly the template it was fine-tuned with.
    """
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if tokenizer is not None and template:
        from jinja2 import TemplateError

        try:
            prompt = tokenizer.apply_chat_template(
                [{"role": role, "content": content} for role, content in messages],
                add_generation_prompt=True,
                tokenize=False,
            )
        except (TemplateError, ValueError, TypeError) as e:  # (raise_exception in the template)
            raise ChatTemplateError(f"the model's chat template refused the messages: {e}") from e
        if not isinstance(prompt, str):
            raise TypeError(f"apply_chat_template returned {type(prompt).__name__}, not str")
        return prompt
    text = "".join(f"{FALLBACK_HEADERS[role]}{content}\n\n" for role, content in messages)
    return text + FALLBACK_HEADERS["assistant"]
