"""Samples to fixed-length token rows for causal-LM training, and an endless batch iterator.

Plain text (``prompt == ""``) is packed: samples are concatenated with an eos token between them
and cut into full rows of ``seq_len`` tokens, so no compute is spent on padding (only the last,
partial row is padded). Instruction samples keep one row each, so a prompt is never separated from
its answer; their prompt tokens are masked out of the loss. Labels are the input ids (the model
shifts them itself) with ``IGNORE_INDEX`` on padding and prompt positions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from collm_fl.data.types import TextSample
from collm_fl.errors import ConfigError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label value torch's cross-entropy (and HF models) skip


@dataclass
class TokenizedBlocks:
    """Token rows ready for a causal LM: all three tensors are ``(N, L)`` and ``torch.long``."""

    input_ids: torch.Tensor  # (N, L) token ids, right-padded with the pad id
    labels: torch.Tensor  # (N, L) = input_ids, IGNORE_INDEX on padding and prompt tokens
    attention_mask: torch.Tensor  # (N, L) 1 on real tokens, 0 on padding

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # No special tokens: a chat template already writes its own, and packed text gets eos only.
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [int(i) for i in ids]


def _answer_ids(
    tokenizer: PreTrainedTokenizerBase, sample: TextSample, prompt_ids: list[int]
) -> list[int]:
    """The answer's tokens as they follow the prompt's at serving time.

    The whole text is tokenized, and the answer is what follows the prompt's own tokens: a
    SentencePiece ("Metaspace") tokenizer marks the start of any text it is given with a word
    boundary, so an answer tokenized alone after a prompt ending in a newline began with a space
    the model would then learn to write. Where the whole text's tokens do not begin with the
    prompt's (a merge across the boundary), the answer is tokenized alone: the prompt's tokens are
    what serving feeds the model, whatever the answer's merge would have been.
    """
    whole = _ids(tokenizer, sample.text)
    if whole[: len(prompt_ids)] == prompt_ids:
        return whole[len(prompt_ids) :]
    return _ids(tokenizer, sample.text[len(sample.prompt) :])


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    """(eos id, pad id); pad falls back to eos, which is harmless since padding is masked."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no eos token; cannot separate packed samples")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return int(eos), int(pad)


def tokenize_samples(
    samples: list[TextSample], tokenizer: PreTrainedTokenizerBase, seq_len: int
) -> TokenizedBlocks:
    """Tokenize samples into ``(N, seq_len)`` rows: packed plain-text rows first, then one row per
    instruction sample (truncated to ``seq_len``, prompt masked, right-padded).

    Rows with nothing to learn (a plain remainder of one token, a prompt that fills the whole row)
    are dropped; no samples give ``N == 0``.
    """
    if seq_len < 2:
        raise ConfigError(f"seq_len must be at least 2; got {seq_len}")
    eos, pad = _special_ids(tokenizer)
    rows: list[tuple[list[int], int]] = []  # (ids, number of leading prompt tokens)

    stream: list[int] = []
    for sample in samples:
        if not sample.prompt:
            stream.extend(_ids(tokenizer, sample.text))
            stream.append(eos)
    rows.extend((stream[i : i + seq_len], 0) for i in range(0, len(stream), seq_len))

    skipped = cut = 0
    for sample in samples:
        if not sample.prompt:
            continue
        prompt_ids = _ids(tokenizer, sample.prompt)
        answer_ids = _answer_ids(tokenizer, sample, prompt_ids)
        if not answer_ids or answer_ids[-1] != eos:
            answer_ids.append(eos)
        if len(prompt_ids) >= seq_len:
            skipped += 1  # the answer would start after the row ends
            continue
        cut += len(prompt_ids) + len(answer_ids) > seq_len
        rows.append(((prompt_ids + answer_ids)[:seq_len], len(prompt_ids)))
    if skipped:
        logger.warning(
            "%d instruction samples dropped: prompt fills seq_len=%d tokens", skipped, seq_len
        )
    if cut:
        logger.warning(
            "%d instruction samples' answers cut at seq_len=%d tokens (their ends, eos included, "
            "are not learned)",
            cut,
            seq_len,
        )

    rows = [(ids, n_prompt) for ids, n_prompt in rows if n_prompt or len(ids) >= 2]
    input_ids = torch.full((len(rows), seq_len), pad, dtype=torch.long)  # (N, L)
    labels = torch.full((len(rows), seq_len), IGNORE_INDEX, dtype=torch.long)  # (N, L)
    attention_mask = torch.zeros((len(rows), seq_len), dtype=torch.long)  # (N, L)
    for r, (ids, n_prompt) in enumerate(rows):
        row = torch.tensor(ids, dtype=torch.long)  # (len,)
        input_ids[r, : len(ids)] = row
        labels[r, n_prompt : len(ids)] = row[n_prompt:]
        attention_mask[r, : len(ids)] = 1
    if not rows:
        logger.warning("no token rows from %d samples (seq_len=%d)", len(samples), seq_len)
    logger.debug("%d samples -> %d rows of %d tokens", len(samples), len(rows), seq_len)
    return TokenizedBlocks(input_ids=input_ids, labels=labels, attention_mask=attention_mask)


def iterate_batches(
    blocks: TokenizedBlocks, batch_size: int, seed: int, epoch_cycle: bool = True
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield shuffled batches ``{"input_ids", "labels", "attention_mask"}`` of ``(batch_size, L)``.

    With ``epoch_cycle`` (the default) it never ends: each pass over the rows is reshuffled and a
    batch may span two passes, so every batch is full and a trainer can take exactly N steps, even
    with fewer rows than ``batch_size``. Without it, one shuffled pass; the last batch may be short.
    Deterministic given ``seed``.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1; got {batch_size}")
    n_rows = len(blocks)
    if n_rows == 0:
        raise ConfigError("no token rows to train on (the client's data is empty)")
    generator = torch.Generator().manual_seed(seed)
    pending = torch.empty(0, dtype=torch.long)
    while True:
        pending = torch.cat([pending, torch.randperm(n_rows, generator=generator)])
        while len(pending) >= batch_size or (not epoch_cycle and len(pending)):
            index, pending = pending[:batch_size], pending[batch_size:]
            yield {
                "input_ids": blocks.input_ids[index],  # (B, L)
                "labels": blocks.labels[index],  # (B, L)
                "attention_mask": blocks.attention_mask[index],  # (B, L)
            }
        if not epoch_cycle:
            return


def batch_to(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's tensors on ``device`` (the model's); no copy for tensors already there."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
