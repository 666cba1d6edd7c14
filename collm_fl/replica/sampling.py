"""Per-request sampling: greedy, temperature and nucleus (top-p), reproducible per request;
and the stop-string rules that decide how much generated text may be sent.

Each request owns a ``torch.Generator`` seeded from its ``seed`` and draws exactly one uniform
number per sampled token, so its tokens do not depend on which other requests share the batch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

GREEDY_BELOW = 1e-5  # a temperature this small samples the argmax token (SamplingParams.greedy)


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens (OpenAI field meanings)."""

    max_tokens: int = 16  # tokens to generate at most (finish_reason "length")
    temperature: float = 1.0  # 0 (or below GREEDY_BELOW) = greedy
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    stop: tuple[str, ...] = ()  # generation ends before the first occurrence of any of these
    seed: int | None = None  # None: a fresh random seed per request
    ignore_eos: bool = False  # the end-of-sequence token ends nothing (stop strings still do)

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            raise ValueError(f"max_tokens must be an integer, got {self.max_tokens!r}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not isinstance(self.temperature, int | float) or not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be a finite number, got {self.temperature!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not isinstance(self.top_p, int | float) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) for s in self.stop):
            raise ValueError(f"stop must be a tuple of strings, got {self.stop!r}")
        if any(s == "" for s in self.stop):
            raise ValueError("stop must not contain an empty string")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int | None):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        # Below GREEDY_BELOW the logits / temperature overflow float32 (to inf, then NaN in the
        # softmax); that close to 0 sampling is greedy anyway.
        return self.temperature < GREEDY_BELOW


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """The request's own random stream (None for greedy requests, which never draw)."""
    if params.greedy:
        return None
    seed = params.seed if params.seed is not None else random.SystemRandom().getrandbits(63)
    gen = torch.Generator()
    gen.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)  # negative seeds are valid OpenAI input
    return gen


def sample_next(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """The next token of every row: logits (b, V) -> token ids (b,) long."""
    if logits.dim() != 2 or logits.shape[0] != len(params) or len(params) != len(generators):
        raise ValueError(
            f"logits {tuple(logits.shape)}, {len(params)} params, {len(generators)} generators"
        )
    out = logits.argmax(dim=-1)  # (b,) greedy rows are done
    for i, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if p.greedy:
            continue
        if gen is None:
            raise ValueError(f"row {i} samples (temperature {p.temperature}) but has no generator")
        out[i] = _sample_row(logits[i], p, gen)
    return out


def _sample_row(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
    """One token from logits (V,) with temperature and top-p, by inverse CDF on one uniform draw."""
    probs = torch.softmax(logits.float() / p.temperature, dim=-1)  # (V,)
    sorted_p, order = probs.sort(descending=True)  # (V,), (V,)
    cum = sorted_p.cumsum(0)  # (V,)
    if p.top_p < 1.0:
        # Keep a token if the mass before it is below top_p: the first token is always kept.
        keep = (cum - sorted_p) < p.top_p  # (V,)
        sorted_p = sorted_p * keep
        cum = sorted_p.cumsum(0)
    u = torch.rand((), generator=gen) * cum[-1]  # one draw per token: reproducible streams
    idx = int(torch.searchsorted(cum, u.reshape(1), right=True).clamp(max=cum.numel() - 1))
    return int(order[idx])


def find_stop(text: str, stops: tuple[str, ...], sent: int) -> int | None:
    """Where the first stop string starts in ``text`` (only new text can contain one)."""
    if not stops:
        return None
    start = max(0, sent - max(len(s) for s in stops))
    hits = [i for s in stops if (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None


def emittable_length(text: str, stops: tuple[str, ...], sent: int) -> int:
    """How much of ``text`` may go out now: hold back an incomplete UTF-8 character (U+FFFD) and
    any tail that could still grow into a stop string (stop strings are never sent)."""
    upto = len(text)
    while upto > sent and text[upto - 1] == "\ufffd":
        upto -= 1
    longest = max((len(s) for s in stops), default=0)
    for k in range(min(longest - 1, upto - sent), 0, -1):
        if any(s.startswith(text[upto - k : upto]) for s in stops):
            return upto - k
    return upto
