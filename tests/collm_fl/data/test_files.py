"""User data files: JSON / JSONL / text records, their validation errors, and chat formatting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast

from collm_fl.data.files import format_records, load_records
from collm_fl.data.types import ChatRecord, TextSample
from collm_fl.errors import DataFormatError

EOS = "<|endoftext|>"
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        ["What is the answer? The answer is forty-two. " * 20],
        vocab_size=300,
        special_tokens=[EOS, "<|pad|>"],
    )
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token="<|pad|>")


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = json.dumps({"instruction": "Add", "input": "2 and 2", "output": "4"})


def test_jsonl_instruction_record_becomes_user_turn_and_answer(tmp_path: Path) -> None:
    records = load_records(_write_jsonl(tmp_path / "d.jsonl", [GOOD, ""]))
    assert records == [ChatRecord(messages=(("user", "Add\n\n2 and 2"), ("assistant", "4")))]


def test_a_byte_order_mark_before_the_first_record_is_not_an_error(tmp_path: Path) -> None:
    path = tmp_path / "excel.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode() + b"\r\n")
    assert load_records(path) == load_records(_write_jsonl(tmp_path / "plain.jsonl", [GOOD]))


def test_jsonl_bad_line_reports_its_line_number(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, '{"instruction": "x", "output": '])
    with pytest.raises(DataFormatError) as info:
        load_records(path)
    assert info.value.line == 3
    assert str(info.value).startswith(f"{path}:3: invalid JSON")


@pytest.mark.parametrize(
    ("line", "why"),
    [("[" * 100_000 + "]" * 100_000, "nested too deeply"), ("1" * 5_000, "Exceeds the limit")],
)
def test_json_the_parser_refuses_otherwise_is_a_format_error_with_its_line(
    tmp_path: Path, line: str, why: str
) -> None:
    # json.loads raises RecursionError on deep nesting and a plain ValueError on a number of
    # more than 4300 digits (Python 3.11+): both reached the caller bare, without the file.
    path = _write_jsonl(tmp_path / "d.jsonl", [GOOD, line])
    with pytest.raises(DataFormatError, match=rf"d\.jsonl:2: invalid JSON: {why}"):
        load_records(path)
    whole = tmp_path / "d.json"
    whole.write_text(line)
    with pytest.raises(DataFormatError, match=rf"d\.json(:1)?: invalid JSON: {why}"):
        load_records(whole)


def test_jsonl_wrong_type_reports_line_and_key(tmp_path: Path) -> None:
    bad = json.dumps({"instruction": "x", "output": 5})
    path = _write_jsonl(tmp_path / "d.jsonl", [GOOD, bad])
    with pytest.raises(DataFormatError, match="'output' must be a string, got a number") as info:
        load_records(path)
    assert info.value.line == 2


def test_json_record_missing_output_names_the_record_index(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps([json.loads(GOOD), {"instruction": "no answer"}]))
    with pytest.raises(DataFormatError, match=r"record 1: missing key 'output'") as info:
        load_records(path)
    assert info.value.path == str(path)


def test_empty_output_is_rejected(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [json.dumps({"instruction": "x", "output": " "})])
    with pytest.raises(DataFormatError, match="'output' is empty"):
        load_records(path)


def test_json_top_level_must_be_a_list(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(GOOD)
    with pytest.raises(DataFormatError, match="expected a JSON list of records, got an object"):
        load_records(path)


def test_invalid_utf8_is_reported_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + b'{"instruction": "\xff"}\n')
    with pytest.raises(DataFormatError, match="not valid UTF-8") as info:
        load_records(path)
    assert info.value.line == 2


def test_chat_record_must_end_with_the_assistant(tmp_path: Path) -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "?"}]}
    path = _write_jsonl(tmp_path / "d.jsonl", [json.dumps(chat)])
    with pytest.raises(DataFormatError, match="last message must be from the assistant"):
        load_records(path)


def test_chat_record_rejects_unknown_role(tmp_path: Path) -> None:
    chat = {"messages": [{"role": "bot", "content": "hi"}]}
    path = _write_jsonl(tmp_path / "d.jsonl", [json.dumps(chat)])
    with pytest.raises(DataFormatError, match=r"messages\[0\]\.role must be one of"):
        load_records(path)


def test_unsupported_suffix_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("a,b\n")
    with pytest.raises(DataFormatError, match=r"unsupported file type '\.csv'"):
        load_records(path)


def test_text_file_is_split_on_paragraphs_into_about_1000_chars(tmp_path: Path) -> None:
    paragraphs = [f"Paragraph {i}. " + "word " * 60 for i in range(20)]  # ~315 chars each
    path = tmp_path / "notes.md"
    path.write_text("\n\n".join(paragraphs))
    records = load_records(path)
    assert all(isinstance(r, TextSample) and r.prompt == "" for r in records)
    texts = [r.text for r in records if isinstance(r, TextSample)]
    assert all(700 <= len(t) <= 1300 for t in texts[:-1])
    assert sum(t.count("Paragraph ") for t in texts) == 20
    assert all(t.startswith("Paragraph ") for t in texts)


CHAT = ChatRecord(messages=(("system", "Be brief."), ("user", "What is it?"), ("assistant", "42")))


def test_format_records_uses_the_tokenizer_chat_template(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    tokenizer.chat_template = TEMPLATE
    try:
        (sample,) = format_records([CHAT], tokenizer)
    finally:
        tokenizer.chat_template = None
    assert sample.prompt == "<|system|>Be brief.\n<|user|>What is it?\n<|assistant|>"
    assert sample.text == sample.prompt + "42" + EOS


def test_format_records_falls_back_without_a_chat_template(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    (sample,) = format_records([CHAT], tokenizer)
    assert sample.prompt == ("### System:\nBe brief.\n\n### User:\nWhat is it?\n\n### Assistant:\n")
    assert sample.text == sample.prompt + "42" + EOS


def test_format_records_passes_plain_text_through() -> None:
    plain = TextSample(text="Once upon a time.")
    assert format_records([plain]) == [plain]


def test_a_lone_surrogate_is_an_error_naming_the_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"text": "fine"}\n{"messages": [{"role": "user", "content": "hi"}, '
        '{"role": "assistant", "content": "broken \\ud800 here"}]}\n'
    )
    with pytest.raises(DataFormatError, match=r"bad.jsonl:2: messages\[1\].content .*surrogate"):
        load_records(path)


def test_a_conversation_the_chat_template_refuses_names_the_file_and_record(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}"
        "{% endfor %}"
    )
    user_only = ChatRecord(messages=(("user", "hi"), ("assistant", "hello")))
    try:
        with pytest.raises(DataFormatError, match=r"chats\.jsonl: record 2: .*System role"):
            format_records([user_only, CHAT], tokenizer, "chats.jsonl")
    finally:
        tokenizer.chat_template = None


def test_text_without_spaces_is_cut_into_samples_not_kept_as_one(tmp_path: Path) -> None:
    line = "天下大势分久必合合久必分" * 10  # 120 characters, no space
    path = tmp_path / "novel.txt"
    path.write_text("\n".join([line] * 100), encoding="utf-8")  # no blank line anywhere
    records = load_records(path)
    assert len(records) >= 10
    assert all(isinstance(r, TextSample) and len(r.text) <= 1200 for r in records)
    assert sum(len(r.text.replace("\n", "").replace(" ", "")) for r in records) == 120 * 100
