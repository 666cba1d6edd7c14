"""The engine's running batch: the rows decoding together, their text, and their shared KV cache.

The running rows share one ``DynamicCache``, left-padded to a common length; each row carries an
attention mask (0 on pads) and its true position ids, so padding never shifts RoPE and a row's
tokens equal its tokens when run alone. Newly prefilled rows are appended (the shorter side
left-padded), finished rows dropped, and columns that are padding in every row trimmed. Only the
engine thread changes a batch; other threads may read ``rows``, which is replaced, never mutated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

from collm_fl.errors import ConfigError
from collm_fl.replica.requests import FINISH_LENGTH, FINISH_STOP, RequestHandle
from collm_fl.replica.sampling import SamplingParams, emittable_length, find_stop

_DECODE = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}


@dataclass(eq=False)
class Row:
    """One running request as the engine sees it."""

    handle: RequestHandle
    slot: int
    generator: torch.Generator | None
    generated: list[int]
    sent: int = 0  # characters of the generated text already emitted
    # Incremental detokenization (as vLLM's): the text of generated[:read] is settled; each step
    # decodes only generated[prefix:] against generated[prefix:read] (the few tokens before the
    # new ones, so merges and leading spaces come out as in a whole decode). Decoding the whole
    # output at every step grows quadratically with its length.
    settled: str = ""
    prefix: int = 0
    read: int = 0

    @property
    def params(self) -> SamplingParams:
        return self.handle.request.params

    @property
    def next_position(self) -> int:
        """The true position of the last sampled token, which the next decode step feeds."""
        return self.handle.num_prompt_tokens + len(self.generated) - 1

    def text(self, tokenizer: PreTrainedTokenizerBase) -> str:
        """The generated text so far; a trailing U+FFFD is a character whose bytes are not all
        sampled yet (it is not settled, so the next tokens can complete it)."""
        window = self.generated[self.prefix :]
        before = str(tokenizer.decode(self.generated[self.prefix : self.read], **_DECODE))
        after = str(tokenizer.decode(window, **_DECODE))
        new = after[len(before) :] if after.startswith(before) else None
        if new is None:  # the window's decode disagrees with its own prefix: settle from scratch
            whole = str(tokenizer.decode(self.generated, **_DECODE))
            if whole.endswith("\ufffd"):
                return whole
            self.settled, self.prefix = whole, max(0, len(self.generated) - 1)
            self.read = len(self.generated)
            return whole
        if new and not new.endswith("\ufffd"):
            self.settled += new
            self.prefix, self.read = self.read, len(self.generated)
            return self.settled
        return self.settled + new

    def append(
        self, token: int, tokenizer: PreTrainedTokenizerBase, eos_ids: frozenset[int]
    ) -> tuple[str, str | None]:
        """Record a sampled token: the text it adds that is safe to send (never a part of a stop
        string still forming) and the finish reason it brings, if any."""
        self.generated.append(token)
        params = self.params
        finish = FINISH_STOP if token in eos_ids and not params.ignore_eos else None
        text = self.text(tokenizer)
        cut = find_stop(text, params.stop, self.sent)
        if cut is not None:
            text, finish = text[:cut], FINISH_STOP
        elif finish is None and len(self.generated) >= params.max_tokens:
            finish = FINISH_LENGTH
        upto = len(text) if finish else emittable_length(text, params.stop, self.sent)
        delta = text[self.sent : upto]
        self.sent = max(self.sent, upto)
        return delta, finish


class RunningBatch:
    """The rows decoding together, their shared left-padded KV cache and attention mask."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=device)  # (B, T) 1 = real

    def __len__(self) -> int:
        return len(self.rows)

    def reset(self) -> None:
        self.rows, self.cache = [], None
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)

    def extend_mask(self) -> torch.Tensor:
        """One more real column for every row (the token a decode step feeds): (B, T+1)."""
        self.mask = F.pad(self.mask, (0, 1), value=1)
        return self.mask

    def keep(self, keep: list[int]) -> None:
        """Drop every other row from the batch and the cache, then trim all-pad columns."""
        if not keep:
            self.reset()
            return
        assert self.cache is not None
        self.rows = [self.rows[i] for i in keep]
        cache_layers_select(self.cache, keep)
        self.mask = self.mask[keep]  # (B', T)
        self._trim()

    def add(self, rows: list[Row], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Append prefilled rows (left-pad the shorter side to one length)."""
        if self.cache is None:
            self.rows, self.cache, self.mask = rows, cache, mask
        else:
            width = max(self.mask.shape[1], mask.shape[1])
            pairs = zip(dynamic_layers(self.cache), dynamic_layers(cache), strict=True)
            for run, new in pairs:
                assert run.keys is not None and run.values is not None
                assert new.keys is not None and new.values is not None
                run.keys = torch.cat([_left_pad(run.keys, width), _left_pad(new.keys, width)])
                run.values = torch.cat([_left_pad(run.values, width), _left_pad(new.values, width)])
            self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(mask, width)])
            self.rows = self.rows + rows
        self._trim()

    def _trim(self) -> None:
        """Drop leading columns that are padding in every row (they only cost attention time)."""
        assert self.cache is not None
        first = int(self.mask.any(dim=0).int().argmax())
        if first > 0:
            self.mask = self.mask[:, first:]
            for layer in dynamic_layers(self.cache):
                layer.keys = layer.keys[:, :, first:]  # type: ignore[index]
                layer.values = layer.values[:, :, first:]  # type: ignore[index]


def cache_layers_select(cache: DynamicCache, rows: list[int]) -> None:
    """Keep only batch ``rows`` of every layer of ``cache`` (in that order)."""
    index = torch.tensor(rows, dtype=torch.long)
    for layer in dynamic_layers(cache):
        assert layer.keys is not None and layer.values is not None
        index = index.to(layer.keys.device)  # copied once, to the cache's device
        layer.keys = layer.keys.index_select(0, index)  # (B', H, T, D)
        layer.values = layer.values.index_select(0, index)


def dynamic_layers(cache: DynamicCache, initialized: bool = True) -> list[DynamicLayer]:
    """The cache's layers, checked to be full-attention ones this batching can pad and cut."""
    layers = []
    for layer in cache.layers:
        # Sliding-window or linear-attention layers keep state the left-padding logic can't move.
        if type(layer) is not DynamicLayer or (initialized and not layer.is_initialized):
            raise ConfigError(f"continuous batching needs full-attention layers, got {layer!r}")
        layers.append(layer)
    return layers


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad the sequence dim (-2 for (B, H, T, D) keys, -1 for a (B, T) mask) to ``width``."""
    if t.dim() == 2:
        return F.pad(t, (width - t.shape[1], 0))  # (B, width)
    return F.pad(t, (0, 0, width - t.shape[2], 0))  # (B, H, width, D)
