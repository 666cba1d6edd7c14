"""Shared pieces of the replica benchmarks: a minimal decode loop, adapters, threads, statistics.

:class:`GreedyDecoder` is the *baseline* serving loop the replica is compared with: one fixed
batch, a left-padded prefill, then greedy decode steps over a shared ``DynamicCache`` (no
continuous batching, no per-row adapters). It runs any causal LM: a PEFT model, a merged model,
or the replica's own model under ``lora_context``. :class:`StepGate` lets another thread stop the
world between two of its steps, the way a serving stack without shadow slots must pause to change
its adapter.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import TypedDict, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, PreTrainedTokenizerBase

from collm_fl.adapters import AdapterState, LoraSpec
from collm_fl.models import materialize_model
from collm_fl.replica.lora_layers import inject_multi_lora

log = logging.getLogger(__name__)

T = TypeVar("T")

# Prompts of a few lengths; the same list feeds every method of a measurement.
PROMPTS = (
    "ROMEO: But soft, what light through yonder window breaks?",
    "The history of the English language begins",
    "Once upon a time, in a small village by the sea, there lived",
    "KING LEAR: Blow, winds, and crack your cheeks!",
    "Explain in simple words how a bicycle stays upright:",
    "To be, or not to be, that is the question:",
    "The recipe for a good loaf of bread starts with",
    "HAMLET: O, that this too too solid flesh would melt,",
)
ADAPTER_SCALE = 0.02  # random adapters: small enough to keep text fluent, large enough to matter
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1}


class LatencyStats(TypedDict):
    count: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float


def latency_stats(seconds: Sequence[float]) -> LatencyStats:
    """Percentiles of latencies given in seconds, in milliseconds (zeros when empty)."""
    if not seconds:
        return LatencyStats(count=0, p50_ms=0.0, p99_ms=0.0, max_ms=0.0, mean_ms=0.0)
    ms = 1e3 * np.asarray(seconds, dtype=np.float64)
    return LatencyStats(
        count=len(seconds),
        p50_ms=float(np.percentile(ms, 50)),
        p99_ms=float(np.percentile(ms, 99)),
        max_ms=float(ms.max()),
        mean_ms=float(ms.mean()),
    )


def random_adapter_state(
    shapes: Mapping[str, tuple[int, int]], seed: int, scale: float = ADAPTER_SCALE
) -> AdapterState:
    """A random LoRA state with the given PEFT keys and shapes (A and B both non-zero)."""
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in shapes.items()}


def adapter_shapes(model: str, spec: LoraSpec) -> dict[str, tuple[int, int]]:
    """The PEFT keys and shapes of an adapter for ``model``, without loading its weights."""
    config = AutoConfig.from_pretrained(materialize_model(model))
    with torch.device("meta"):  # shapes only: no memory, no init time
        skeleton = AutoModelForCausalLM.from_config(config)
    return inject_multi_lora(skeleton, spec, num_slots=1).expected_shapes()


def checkpoint_parameters(model: str) -> tuple[int, int]:
    """(parameter count, bytes) of ``model``'s checkpoint, read from the safetensors headers."""
    count, nbytes = 0, 0
    for path in sorted(Path(materialize_model(model)).glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                piece = f.get_slice(key)
                n = int(np.prod(piece.get_shape()))
                count += n
                nbytes += n * _DTYPE_BYTES.get(piece.get_dtype(), 4)
    return count, nbytes


def prompt_ids(tokenizer: PreTrainedTokenizerBase, n: int) -> list[list[int]]:
    """``n`` tokenized prompts (cycling through :data:`PROMPTS`)."""
    return [list(tokenizer(PROMPTS[i % len(PROMPTS)]).input_ids) for i in range(n)]


def run_in_thread(fn: Callable[[], T], threads: int, name: str) -> T:
    """Run ``fn`` in a new thread that uses ``threads`` torch threads; return or re-raise.

    ``torch.set_num_threads`` is per thread here (see ``replica/engine.py``), so a measurement
    fixes its own thread count without touching the caller's.
    """
    box: dict[str, T] = {}
    error: list[BaseException] = []

    def body() -> None:
        torch.set_num_threads(threads)
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller below
            error.append(e)

    thread = threading.Thread(target=body, name=name, daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return box["value"]


class StepGate:
    """Stop-the-world between decode steps: while anyone holds the gate, no step starts.

    ``hold()`` waits for the step in flight to end and keeps the decoder out until released; a
    plain lock would let the decode loop re-acquire it forever (CPython locks are not fair).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._holders = 0
        self._stepping = False

    @contextmanager
    def step(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: self._holders == 0)
            self._stepping = True
        try:
            yield
        finally:
            with self._cond:
                self._stepping = False
                self._cond.notify_all()

    @contextmanager
    def hold(self) -> Iterator[None]:
        with self._cond:
            self._holders += 1
            self._cond.wait_for(lambda: not self._stepping)
        try:
            yield
        finally:
            with self._cond:
                self._holders -= 1
                self._cond.notify_all()


class GreedyDecoder:
    """One fixed batch of prompts decoded greedily, one token per row per :meth:`step`.

    ``forward_context`` wraps every forward (e.g. ``lambda: lora_context(serve(slots))``).
    """

    def __init__(
        self,
        model: nn.Module,
        prompts: Sequence[Sequence[int]],
        pad_id: int,
        forward_context: Callable[[], AbstractContextManager[None]] | None = None,
    ) -> None:
        if not prompts or not all(prompts):
            raise ValueError("GreedyDecoder needs at least one non-empty prompt")
        self.model = model
        self.config = getattr(model, "config", None)
        self.forward_context = forward_context or nullcontext
        width = max(len(p) for p in prompts)
        self._ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (b, L)
        self._mask = torch.zeros(len(prompts), width, dtype=torch.long)  # (b, L) 1 = real token
        for i, p in enumerate(prompts):
            self._ids[i, width - len(p) :] = torch.tensor(list(p))
            self._mask[i, width - len(p) :] = 1
        self._next_pos = torch.tensor([[len(p)] for p in prompts])  # (b, 1) true positions
        self._cache = DynamicCache(config=self.config)
        self._last: torch.Tensor | None = None  # (b,) the tokens the next step feeds

    @property
    def batch_size(self) -> int:
        return int(self._ids.shape[0])

    def prefill(self) -> torch.Tensor:
        """Run the prompts; returns each row's first generated token, shape (b,)."""
        positions = (self._mask.cumsum(-1) - 1).clamp(min=0)  # (b, L) pads at 0, RoPE unshifted
        with self.forward_context():
            out = self.model(
                input_ids=self._ids,
                attention_mask=self._mask,
                position_ids=positions,
                cache=self._cache,
                use_cache=True,
                logits_to_keep=1,
            )
        self._last = out.logits[:, -1].argmax(-1)  # (b,)
        return self._last

    def step(self) -> torch.Tensor:
        """One batched decode step; returns each row's next token, shape (b,)."""
        if self._last is None:
            raise RuntimeError("prefill() must run before step()")
        self._mask = F.pad(self._mask, (0, 1), value=1)  # (b, T+1)
        with self.forward_context():
            out = self.model(
                input_ids=self._last[:, None],  # (b, 1)
                attention_mask=self._mask,
                position_ids=self._next_pos,
                cache=self._cache,
                use_cache=True,
            )
        self._next_pos = self._next_pos + 1
        self._last = out.logits[:, -1].argmax(-1)  # (b,)
        return self._last
