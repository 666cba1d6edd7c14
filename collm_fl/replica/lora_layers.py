"""Many unmerged LoRA adapters on one frozen base, chosen per thread and per batch row.

A replica serves requests through several adapter versions (serving *slots*) while another thread
trains the next adapter on the same module objects. PEFT cannot do that: its per-call
``adapter_names`` installs forward hooks that leak across threads and is refused in train mode.
Here every target ``nn.Linear`` is replaced by a :class:`MultiLoraLinear` whose adapter choice
comes from a thread-local context, so each thread says for itself what it is doing:

    with lora_context(serve(slot_ids)):   # slot_ids: (b,) one serving slot per batch row, -1 = none
        logits = model(input_ids).logits
    with lora_context(train()):           # the training adapter, with dropout and gradients
        loss = model(**batch).loss

Outside any context a layer is the plain base layer. Adapter tensors use PEFT's key names, so an
``adapter_model.safetensors`` state can be written into a slot as is.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from collm_fl.adapters import LORA_A_SUFFIX, LORA_B_SUFFIX, AdapterState, LoraSpec
from collm_fl.errors import AdapterValidationError, ConfigError

log = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."  # PeftModel's prefix in front of the base model's module path
NO_SLOT = -1  # a batch row that uses the base model only


@dataclass(frozen=True)
class LoraMode:
    """What the LoRA layers of the current thread do; build with :func:`serve` or :func:`train`."""

    training: bool
    slot_ids: torch.Tensor | None = None  # (b,) long, serve mode only
    uniform_slot: int | None = None  # every row uses this slot (NO_SLOT = base only): fast path
    gather_ids: torch.Tensor | None = None  # (b,) slot_ids with -1 clamped to 0, for the gather
    row_keep: torch.Tensor | None = None  # (b, 1, 1) float, 0 on rows with no adapter
    # Train mode: called by every LoRA layer in its forward and again in its backward; it may
    # raise to abandon the micro-step at a layer boundary (the co-execution trainer's deadline).
    checkpoint: Callable[[], None] | None = None


def serve(
    slot_ids: torch.Tensor | Sequence[int], device: torch.device | str | None = None
) -> LoraMode:
    """Serve mode: batch row i adds serving slot ``slot_ids[i]`` (``-1``: no adapter).

    ``device``: the model's device, where the per-row gather indices are put once per forward
    (default: CPU; a layer on another device copies them itself).
    """
    ids = torch.as_tensor(slot_ids, dtype=torch.long).reshape(-1).cpu()  # (b,)
    if ids.numel() == 0:
        raise ValueError("slot_ids must name one slot per batch row; got an empty list")
    first = int(ids[0])
    if bool((ids == first).all()):
        # Computed once per forward, not per layer: most batches run on one version.
        return LoraMode(training=False, slot_ids=ids, uniform_slot=first)
    keep = (ids >= 0).to(torch.float32).view(-1, 1, 1)  # (b, 1, 1)
    return LoraMode(
        training=False,
        slot_ids=ids,
        gather_ids=ids.clamp(min=0).to(device or "cpu"),
        row_keep=None if bool((ids >= 0).all()) else keep.to(device or "cpu"),
    )


def train(checkpoint: Callable[[], None] | None = None) -> LoraMode:
    """Train mode: every row adds the training adapter (with dropout; gradients flow to it).

    ``checkpoint`` runs at every LoRA layer, forward and backward: an exception it raises ends the
    forward pass or ``loss.backward()`` there (the optimizer has not stepped; zero the gradients).
    """
    return LoraMode(training=True, checkpoint=checkpoint)


class _BackwardCheckpoint(torch.autograd.Function):
    """Identity whose backward calls the train mode's checkpoint first."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, fn: object
    ) -> torch.Tensor:
        ctx.fn = fn  # type: ignore[attr-defined]
        return x.view_as(x)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor, None]:
        ctx.fn()  # type: ignore[attr-defined]
        return grad, None


_local = threading.local()


def current_mode() -> LoraMode | None:
    """The calling thread's LoRA mode (None: base model only)."""
    mode: LoraMode | None = getattr(_local, "mode", None)
    return mode


@contextmanager
def lora_context(mode: LoraMode | None) -> Iterator[None]:
    """Set the calling thread's LoRA mode for the block; the previous mode comes back on exit."""
    previous = current_mode()
    _local.mode = mode
    try:
        yield
    finally:
        _local.mode = previous


class MultiLoraLinear(nn.Module):
    """A frozen ``nn.Linear`` plus S serving slots and one trainable adapter, all unmerged.

    ``y = base(x) + scaling * (x @ A.T) @ B.T`` where (A, B) is the row's serving slot in serve
    mode or the training adapter in train mode. Keeping adapters unmerged is what lets rows of one
    batch use different versions and lets training run on the very same base weights.
    """

    slot_a: torch.Tensor  # buffers, declared for the type checker
    slot_b: torch.Tensor

    def __init__(self, base: nn.Linear, rank: int, scaling: float, num_slots: int, dropout: float):
        super().__init__()
        if num_slots < 1:
            raise ConfigError(f"num_slots must be >= 1, got {num_slots}")
        self.base = base
        self.base.requires_grad_(False)
        self.rank = rank
        self.scaling = scaling
        self.num_slots = num_slots
        self.dropout_p = dropout
        # bitsandbytes Linear4bit / Linear8bitLt subclass nn.Linear and keep in/out_features
        # (their packed weight's shape is not (d_out, d_in)); the adapters live beside it in fp32.
        d_in, d_out = base.in_features, base.out_features
        dev = base.weight.device
        # Buffers, not parameters: serving slots are never trained, and copying into them in place
        # keeps every reference (and the memory) stable while versions come and go.
        self.register_buffer(
            "slot_a", torch.zeros(num_slots, rank, d_in, device=dev), persistent=False
        )  # (S, r, d_in)
        self.register_buffer(
            "slot_b", torch.zeros(num_slots, d_out, rank, device=dev), persistent=False
        )  # (S, d_out, r)
        self.train_a = nn.Parameter(torch.empty(rank, d_in, device=dev))  # (r, d_in)
        self.train_b = nn.Parameter(torch.zeros(d_out, rank, device=dev))  # (d_out, r)
        # PEFT's default init: A kaiming-uniform, B zero, so a fresh adapter starts as the base.
        nn.init.kaiming_uniform_(self.train_a, a=math.sqrt(5))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (b, ..., d_out)
        mode = current_mode()
        if mode is None:
            return y
        if mode.training:
            if mode.checkpoint is not None:
                mode.checkpoint()
            # Functional dropout: the module's .training flag is shared with the serving thread.
            h = F.dropout(x, self.dropout_p, training=True) if self.dropout_p > 0 else x
            # The adapter stays fp32 (QLoRA): a bf16/fp16 activation is lifted to it, and the
            # delta goes back to the base output's dtype (no-ops for an fp32 model).
            h = h.to(self.train_a.dtype)
            delta = (h @ self.train_a.T) @ self.train_b.T  # (b, ..., d_out)
            if mode.checkpoint is not None:
                delta = _BackwardCheckpoint.apply(delta, mode.checkpoint)
            return y + (self.scaling * delta).to(y.dtype)
        served = self._serve_delta(x, mode)
        return y + (served.to(y.dtype) if isinstance(served, torch.Tensor) else served)

    def _serve_delta(self, x: torch.Tensor, mode: LoraMode) -> torch.Tensor | float:
        assert mode.slot_ids is not None  # serve() always sets it
        b = x.shape[0]
        if mode.slot_ids.shape[0] != b:
            raise ValueError(f"serve() got {mode.slot_ids.shape[0]} slot ids for a batch of {b}")
        if mode.uniform_slot is not None:
            if mode.uniform_slot == NO_SLOT:
                return 0.0
            a = self.slot_a[mode.uniform_slot].to(x.dtype)  # (r, d_in)
            bm = self.slot_b[mode.uniform_slot].to(x.dtype)  # (d_out, r)
            return self.scaling * ((x @ a.T) @ bm.T)  # (b, ..., d_out)
        assert mode.gather_ids is not None
        xs = x.reshape(b, -1, x.shape[-1])  # (b, L, d_in)
        gather = mode.gather_ids.to(self.slot_a.device)  # no copy when serve() got the device
        a = self.slot_a.index_select(0, gather).to(x.dtype)  # (b, r, d_in)
        bm = self.slot_b.index_select(0, gather).to(x.dtype)  # (b, d_out, r)
        h = torch.bmm(xs, a.transpose(1, 2))  # (b, L, r)
        if mode.row_keep is not None:
            h = h * mode.row_keep.to(h.device, h.dtype)  # rows with slot -1 add nothing
        delta = torch.bmm(h, bm.transpose(1, 2))  # (b, L, d_out)
        return self.scaling * delta.reshape(*x.shape[:-1], -1)  # (b, ..., d_out)


class MultiLoraModules:
    """The injected layers of one model, keyed by PEFT prefix (``base_model.model.<path>``)."""

    def __init__(self, layers: Mapping[str, MultiLoraLinear], spec: LoraSpec, num_slots: int):
        self.layers = dict(layers)
        self.spec = spec
        self.num_slots = num_slots

    def __len__(self) -> int:
        return len(self.layers)

    def expected_shapes(self) -> dict[str, tuple[int, int]]:
        """Every PEFT key of an adapter for this model -> shape (A: (r, d_in), B: (d_out, r))."""
        shapes: dict[str, tuple[int, int]] = {}
        for prefix, layer in self.layers.items():
            shapes[prefix + LORA_A_SUFFIX] = (layer.rank, layer.in_features)
            shapes[prefix + LORA_B_SUFFIX] = (layer.out_features, layer.rank)
        return shapes

    def training_parameters(self) -> list[nn.Parameter]:
        """The trainable tensors (every training A and B), for the optimizer."""
        params: list[nn.Parameter] = []
        for layer in self.layers.values():
            params += [layer.train_a, layer.train_b]
        return params

    def get_training_state(self) -> AdapterState:
        """A float32 numpy copy of the training adapter, keyed like adapter_model.safetensors."""
        return _to_state(self._training_tensors())

    def set_training_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Copy ``state`` into the training adapter in place (the optimizer's references stay)."""
        with torch.no_grad():
            _copy_into(self._training_tensors(), state, self.expected_shapes())

    def write_slot(self, slot: int, state: Mapping[str, np.ndarray]) -> None:
        """Copy ``state`` into serving slot ``slot`` in place (one ``_foreach_copy_``).

        The caller guarantees no request reads this slot meanwhile (see ``slots.AdapterSlots``).
        """
        self._check_slot(slot)
        with torch.no_grad():
            _copy_into(self._slot_tensors(slot), state, self.expected_shapes())

    def read_slot(self, slot: int) -> AdapterState:
        """A float32 numpy copy of serving slot ``slot``."""
        self._check_slot(slot)
        return _to_state(self._slot_tensors(slot))

    def merge_into_base(self, state: Mapping[str, np.ndarray]) -> None:
        """``W += scaling · B @ A`` in every layer's base weight, in place.

        For baselines that serve a merged adapter (no LoRA cost per token, one version for every
        request). The caller guarantees no forward runs meanwhile (the engine is paused). Every
        problem with ``state`` (keys, shapes, non-finite values) is raised before any weight
        changes, so a bad state never half-merges.
        """
        self._add_to_base(state, 1.0)

    def unmerge_from_base(self, state: Mapping[str, np.ndarray]) -> None:
        """``W -= scaling · B @ A``: undo :meth:`merge_into_base` of the same ``state``."""
        self._add_to_base(state, -1.0)

    def _add_to_base(self, state: Mapping[str, np.ndarray], sign: float) -> None:
        shapes = self.expected_shapes()
        problems = _state_problems(shapes, state)
        problems += [
            f"{k}: {int((~np.isfinite(state[k])).sum())} non-finite values"
            for k in sorted(set(shapes) & set(state))
            if tuple(state[k].shape) == shapes[k] and not np.isfinite(state[k]).all()
        ]
        if problems:
            raise AdapterValidationError(problems)
        quantized = [p for p, layer in self.layers.items() if not _plain_weight(layer.base)]
        if quantized:
            raise ConfigError(
                f"cannot merge an adapter into a quantized base ({quantized[0]} is "
                f"{type(self.layers[quantized[0]].base).__name__}): serve it unmerged"
            )
        done: list[str] = []
        with torch.no_grad():
            for prefix, layer in self.layers.items():
                weight = layer.base.weight  # (d_out, d_in)
                changed = weight.add(_delta(layer, state, prefix).to(weight.dtype), alpha=sign)
                if not bool(torch.isfinite(changed).all()):
                    # Finite factors can still overflow the weight: put back what changed.
                    for p in reversed(done):
                        undo = _delta(self.layers[p], state, p).to(weight.dtype)
                        self.layers[p].base.weight.add_(undo, alpha=-sign)
                    raise AdapterValidationError([f"{prefix}: the merged weight is not finite"])
                weight.copy_(changed)
                done.append(prefix)

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"slot must be in [0, {self.num_slots}), got {slot}")

    def _training_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for prefix, layer in self.layers.items():
            out[prefix + LORA_A_SUFFIX] = layer.train_a
            out[prefix + LORA_B_SUFFIX] = layer.train_b
        return out

    def _slot_tensors(self, slot: int) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for prefix, layer in self.layers.items():
            out[prefix + LORA_A_SUFFIX] = layer.slot_a[slot]
            out[prefix + LORA_B_SUFFIX] = layer.slot_b[slot]
        return out


def inject_multi_lora(model: nn.Module, spec: LoraSpec, num_slots: int = 4) -> MultiLoraModules:
    """Replace every ``nn.Linear`` named in ``spec.target_modules`` by a :class:`MultiLoraLinear`.

    All base parameters are frozen; only the training adapters require gradients. The model's own
    state-dict keys of a wrapped layer move under ``.base``.
    """
    targets = set(spec.target_modules)
    found: list[tuple[nn.Module, str, str, nn.Linear]] = []
    for path, module in model.named_modules():
        for name, child in module.named_children():
            if name in targets and isinstance(child, nn.Linear):
                full = f"{path}.{name}" if path else name
                found.append((module, name, full, child))
            elif name in targets and isinstance(child, MultiLoraLinear):
                raise ConfigError(f"{path}.{name} already has multi-LoRA layers injected")
    if not found:
        raise ConfigError(f"no nn.Linear named {sorted(targets)} in {type(model).__name__}")
    model.requires_grad_(False)
    layers: dict[str, MultiLoraLinear] = {}
    for parent, name, full, linear in found:
        layer = MultiLoraLinear(linear, spec.rank, spec.scaling, num_slots, spec.dropout)
        setattr(parent, name, layer)
        layers[PEFT_PREFIX + full] = layer
    log.info(
        "injected multi-LoRA (r=%d, %d slots) into %d modules", spec.rank, num_slots, len(layers)
    )
    return MultiLoraModules(layers, spec, num_slots)


def checkpoint_output_layer(model: nn.Module) -> None:
    """Call the train mode's checkpoint around the model's output layer too, forward and backward.

    The LM head and the loss over the vocabulary are the largest pieces of a small model's step
    outside its LoRA layers (SmolLM2: 49,152 × 576), so a step giving way at every LoRA layer
    would otherwise run them on in one piece. Register before other threads use the model (hooks
    are module state); outside a train mode with a checkpoint the hooks do nothing.
    """
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if not isinstance(head, nn.Module):
        return

    def before(module: nn.Module, args: tuple[object, ...]) -> None:
        mode = current_mode()
        if mode is not None and mode.checkpoint is not None:
            mode.checkpoint()

    def after(module: nn.Module, args: tuple[object, ...], out: torch.Tensor) -> torch.Tensor:
        mode = current_mode()
        if mode is None or mode.checkpoint is None or not out.requires_grad:
            return out
        mode.checkpoint()  # before the loss
        return _BackwardCheckpoint.apply(out, mode.checkpoint)  # type: ignore[no-any-return]

    head.register_forward_pre_hook(before)
    head.register_forward_hook(after)


def _to_state(tensors: Mapping[str, torch.Tensor]) -> AdapterState:
    return {k: t.detach().to("cpu", torch.float32).numpy().copy() for k, t in tensors.items()}


def _copy_into(
    dst: Mapping[str, torch.Tensor],
    state: Mapping[str, np.ndarray],
    shapes: Mapping[str, tuple[int, int]],
) -> None:
    problems = _state_problems({k: shapes[k] for k in dst}, state)
    if problems:
        raise AdapterValidationError(problems)
    keys = list(dst)
    src = [torch.from_numpy(np.ascontiguousarray(state[k], dtype=np.float32)) for k in keys]
    device = dst[keys[0]].device if keys else torch.device("cpu")
    if device.type != "cpu":  # one host-to-device copy per tensor, then the fused in-place copy
        src = [t.to(device) for t in src]
    torch._foreach_copy_([dst[k] for k in keys], src)


def _delta(layer: MultiLoraLinear, state: Mapping[str, np.ndarray], prefix: str) -> torch.Tensor:
    """``scaling · B @ A`` of ``prefix``'s factors in ``state``, fp32 on the layer's device."""
    device = layer.base.weight.device
    a = torch.from_numpy(np.ascontiguousarray(state[prefix + LORA_A_SUFFIX])).to(device)
    b = torch.from_numpy(np.ascontiguousarray(state[prefix + LORA_B_SUFFIX])).to(device)
    return (b.to(torch.float32) @ a.to(torch.float32)) * layer.scaling  # (d_out, d_in)


def _plain_weight(base: nn.Linear) -> bool:
    """Whether ``base.weight`` is a plain float matrix (not a bitsandbytes 4/8-bit one)."""
    return base.weight.is_floating_point()


def _state_problems(
    shapes: Mapping[str, tuple[int, int]], state: Mapping[str, np.ndarray]
) -> list[str]:
    """Missing, unexpected and wrongly shaped keys of ``state`` against ``shapes``."""
    problems = [f"missing key {k}" for k in sorted(set(shapes) - set(state))]
    problems += [f"unexpected key {k}" for k in sorted(set(state) - set(shapes))]
    problems += [
        f"{k}: shape {tuple(state[k].shape)}, expected {shapes[k]}"
        for k in sorted(set(shapes) & set(state))
        if tuple(state[k].shape) != shapes[k]
    ]
    return problems
