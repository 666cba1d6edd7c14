"""Incremental detokenization: each step decodes a short window, and the text it yields is the
whole output's decode at every step (the whole decode at each step is quadratic in length)."""

from __future__ import annotations

import numpy as np
import pytest

from collm_fl.replica.batch import Row
from collm_fl.replica.requests import GenerationRequest, RequestHandle
from collm_fl.replica.sampling import SamplingParams

WHOLE = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}


def _row(max_tokens: int, stop: tuple[str, ...] = ()) -> Row:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=stop)
    handle = RequestHandle(GenerationRequest(prompt_ids=[1], params=params, request_id="r"))
    return Row(handle=handle, slot=0, generator=None, generated=[])


class _Counting:
    """The tokenizer, counting how many token ids each decode call is given."""

    def __init__(self, tokenizer) -> None:  # type: ignore[no-untyped-def]
        self.tokenizer, self.decoded = tokenizer, 0

    def decode(self, ids, **kw):  # type: ignore[no-untyped-def]
        self.decoded += len(ids)
        return self.tokenizer.decode(ids, **kw)


@pytest.mark.parametrize("seed", range(4))
def test_incremental_text_equals_the_whole_decode_at_every_step(tiny, seed: int) -> None:
    tok = tiny.tokenizer
    text = "Hi é😀 ok — naïve 日本語 tail, then more words.\n" * 3
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    rng = np.random.default_rng(seed)
    ids += [int(i) for i in rng.integers(0, len(tok), size=60)]  # incl. lone UTF-8 bytes
    if tok.eos_token_id is not None:
        ids.insert(len(ids) // 2, tok.eos_token_id)  # a special token mid-output decodes to ""
    row, sent = _row(len(ids)), []
    for t in ids:
        delta, finish = row.append(t, tok, frozenset())
        sent.append(delta)
        whole = tok.decode(row.generated, **WHOLE)
        if not whole.endswith("\ufffd"):
            assert row.text(tok) == whole
    assert finish == "length"
    assert "".join(sent) == tok.decode(ids, **WHOLE)


def test_each_step_decodes_a_window_not_the_whole_output(tiny) -> None:
    tok = _Counting(tiny.tokenizer)
    ids = list(tiny.tokenizer("word " * 400, add_special_tokens=False)["input_ids"])
    row = _row(len(ids))
    for t in ids:
        row.append(t, tok, frozenset())  # type: ignore[arg-type]
    assert len(ids) >= 400
    assert tok.decoded < 8 * len(ids)  # the whole decode each step: len(ids)**2 / 2 ids


def test_a_stop_string_across_the_window_is_found(tiny) -> None:
    tok = tiny.tokenizer
    ids = list(tok("alpha beta gamma delta END omega", add_special_tokens=False)["input_ids"])
    row, out = _row(len(ids), stop=("delta END",)), ""
    for t in ids:
        delta, finish = row.append(t, tok, frozenset())
        out += delta
        if finish:
            break
    assert (out, finish) == ("alpha beta gamma ", "stop")
