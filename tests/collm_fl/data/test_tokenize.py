"""Tokenization into fixed-length rows with loss masks, and the endless batch iterator."""

from __future__ import annotations

import itertools

import pytest
import torch
from tokenizers import ByteLevelBPETokenizer, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from collm_fl.data.tokenize import (
    IGNORE_INDEX,
    TokenizedBlocks,
    iterate_batches,
    tokenize_samples,
)
from collm_fl.data.types import TextSample
from collm_fl.errors import ConfigError

CORPUS = (
    "Who's there? Nay, answer me: stand, and unfold yourself. Long live the king! "
    "You come most carefully upon your hour. 'Tis now struck twelve; get thee to bed. "
    "For this relief much thanks: 'tis bitter cold, and I am sick at heart. "
)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([CORPUS * 20], vocab_size=500, special_tokens=["<eos>", "<pad>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<pad>")


def _ids(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_plain_samples_are_packed_with_eos_into_seq_len_rows(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    samples = [TextSample(text=CORPUS), TextSample(text="Long live the king!")]
    blocks = tokenize_samples(samples, tokenizer, seq_len=16)
    eos = tokenizer.eos_token_id
    stream = [*_ids(tokenizer, CORPUS), eos, *_ids(tokenizer, "Long live the king!"), eos]
    n_rows = -(-len(stream) // 16)
    assert blocks.input_ids.shape == blocks.labels.shape == blocks.attention_mask.shape
    assert blocks.input_ids.shape == (n_rows, 16)
    assert blocks.input_ids.dtype == torch.long
    real = blocks.attention_mask.bool()
    assert blocks.input_ids[real].tolist() == stream
    assert bool(real[:-1].all())  # only the last row is padded


def test_padding_is_masked_in_labels_and_attention(tokenizer: PreTrainedTokenizerFast) -> None:
    blocks = tokenize_samples([TextSample(text="Long live the king!")], tokenizer, seq_len=32)
    pad = blocks.attention_mask == 0
    assert bool(pad.any())
    assert bool((blocks.labels[pad] == IGNORE_INDEX).all())
    assert bool((blocks.input_ids[pad] == tokenizer.pad_token_id).all())
    real = ~pad
    assert torch.equal(blocks.labels[real], blocks.input_ids[real])


def test_instruction_prompt_tokens_are_masked(tokenizer: PreTrainedTokenizerFast) -> None:
    prompt = "### User:\nWho's there?\n\n### Assistant:\n"
    sample = TextSample(text=prompt + "Long live the king!<eos>", prompt=prompt)
    blocks = tokenize_samples([sample], tokenizer, seq_len=64)
    n_prompt = len(_ids(tokenizer, prompt))
    answer = [*_ids(tokenizer, "Long live the king!"), tokenizer.eos_token_id]
    assert blocks.input_ids.shape == (1, 64)
    assert bool((blocks.labels[0, :n_prompt] == IGNORE_INDEX).all())
    assert blocks.labels[0, n_prompt : n_prompt + len(answer)].tolist() == answer
    assert bool((blocks.labels[0, n_prompt + len(answer) :] == IGNORE_INDEX).all())
    assert int(blocks.attention_mask[0].sum()) == n_prompt + len(answer)


def test_an_answer_is_tokenized_as_it_follows_its_prompt_with_a_sentencepiece_tokenizer() -> None:
    """A Metaspace tokenizer (Llama 2, Mistral, TinyLlama) marks the start of any text with a word
    boundary: an answer tokenized alone after a prompt ending in a newline began with "▁", and the
    model learned to answer with a leading space."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", "isolated"),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
        ]
    )
    bpe.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    bpe.train_from_iterator(
        [CORPUS.replace(". ", ".\n")] * 20,
        trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "</s>", "<pad>"]),
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", pad_token="<pad>")
    prompt, answer = "Who's there?\n", "Long live the king!"
    assert _ids(tok, answer)[0] == tok.convert_tokens_to_ids("▁")  # alone: a leading boundary
    blocks = tokenize_samples([TextSample(text=prompt + answer, prompt=prompt)], tok, seq_len=32)
    row = blocks.input_ids[0][blocks.attention_mask[0].bool()].tolist()
    assert row == [*_ids(tok, prompt + answer), tok.eos_token_id]
    assert tok.decode(row, skip_special_tokens=True) == prompt + answer
    learned = blocks.labels[0][blocks.labels[0] != IGNORE_INDEX].tolist()
    assert tok.decode(learned, skip_special_tokens=True) == answer


def test_an_answer_cut_at_seq_len_is_logged(
    tokenizer: PreTrainedTokenizerFast, caplog: pytest.LogCaptureFixture
) -> None:
    prompt = "Q: "
    fits = TextSample(text="Q: hi", prompt=prompt)
    with caplog.at_level("WARNING", logger="collm_fl.data.tokenize"):
        tokenize_samples([fits], tokenizer, seq_len=12)
    assert "cut" not in caplog.text
    with caplog.at_level("WARNING", logger="collm_fl.data.tokenize"):
        tokenize_samples([fits, TextSample(text=prompt + CORPUS, prompt=prompt)], tokenizer, 12)
    assert "1 instruction samples' answers cut at seq_len=12" in caplog.text


def test_instruction_samples_get_one_row_each_truncated_to_seq_len(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    prompt = "Q: "
    samples = [
        TextSample(text=prompt + CORPUS, prompt=prompt),
        TextSample(text="Q: hi", prompt=prompt),
    ]
    blocks = tokenize_samples(samples, tokenizer, seq_len=12)
    assert blocks.input_ids.shape == (2, 12)
    assert bool(blocks.attention_mask[0].all())  # truncated, no padding
    assert blocks.input_ids[0].tolist() == (_ids(tokenizer, prompt) + _ids(tokenizer, CORPUS))[:12]


def test_an_answer_whose_first_token_ends_the_row_is_still_learned(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    """A prompt of seq_len - 1 tokens leaves the answer's first token the row's last: its label
    is predicted from the position before it. Only a prompt that fills the row is dropped."""
    prompt = "Q: " + CORPUS
    n_prompt = len(_ids(tokenizer, prompt))
    sample = TextSample(text=prompt + " Long live the king!", prompt=prompt)
    blocks = tokenize_samples([sample], tokenizer, seq_len=n_prompt + 1)
    assert blocks.input_ids.shape == (1, n_prompt + 1)
    learned = blocks.labels[0][blocks.labels[0] != IGNORE_INDEX].tolist()
    assert learned == [blocks.input_ids[0, n_prompt].item()]
    assert tokenize_samples([sample], tokenizer, seq_len=n_prompt).input_ids.shape == (0, n_prompt)


def test_no_samples_give_zero_rows(tokenizer: PreTrainedTokenizerFast) -> None:
    assert tokenize_samples([], tokenizer, seq_len=8).input_ids.shape == (0, 8)


def _blocks(n_rows: int, seq_len: int = 4) -> TokenizedBlocks:
    ids = torch.arange(n_rows).repeat_interleave(seq_len).view(n_rows, seq_len)  # row r is all r
    return TokenizedBlocks(input_ids=ids, labels=ids.clone(), attention_mask=torch.ones_like(ids))


def test_iterate_batches_yields_batch_size_rows() -> None:
    batch = next(iterate_batches(_blocks(10), batch_size=3, seed=0))
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert all(t.shape == (3, 4) for t in batch.values())


def test_iterate_batches_cycles_and_reshuffles_every_pass() -> None:
    batches = iterate_batches(_blocks(6), batch_size=2, seed=1)
    rows = [r for b in itertools.islice(batches, 9) for r in b["input_ids"][:, 0].tolist()]
    passes = [rows[0:6], rows[6:12], rows[12:18]]
    assert all(sorted(p) == list(range(6)) for p in passes)  # every pass covers every row once
    assert len({tuple(p) for p in passes}) > 1  # in a new order


def test_iterate_batches_fills_batches_with_fewer_rows_than_batch_size() -> None:
    batch = next(iterate_batches(_blocks(2), batch_size=5, seed=0))
    assert batch["input_ids"].shape == (5, 4)


def test_iterate_batches_without_cycle_makes_one_pass() -> None:
    batches = list(iterate_batches(_blocks(5), 2, seed=0, epoch_cycle=False))
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]


def test_iterate_batches_is_deterministic_given_seed() -> None:
    def first_rows(seed: int) -> list[int]:
        batches = iterate_batches(_blocks(8), batch_size=4, seed=seed)
        return [r for b in itertools.islice(batches, 4) for r in b["input_ids"][:, 0].tolist()]

    assert first_rows(3) == first_rows(3)
    assert first_rows(3) != first_rows(4)


def test_iterate_batches_rejects_empty_blocks() -> None:
    with pytest.raises(ConfigError, match="no token rows"):
        next(iterate_batches(_blocks(0), batch_size=2, seed=0))
