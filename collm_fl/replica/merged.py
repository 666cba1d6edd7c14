"""The merged-weights baseline on a replica: at most one version merged into the base weights.

`collm bench goodput`'s "merged" system serves like a merged-weights server that updates in
place: a new version unmerges the previous one and merges itself with serving paused, and new
requests get it on slot ``-1`` (no LoRA cost per token); requests in flight go on with the new
weights. CoLLM-FL itself never merges: it serves unmerged slots and swaps through a shadow slot.
Every method that changes the base weights runs with serving paused by the caller.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from torch import nn

from collm_fl.adapters import AdapterState
from collm_fl.errors import AdapterValidationError, VersionConflictError
from collm_fl.replica.lora_layers import NO_SLOT, MultiLoraModules, lora_context, serve
from collm_fl.replica.slots import AdapterSlots

log = logging.getLogger(__name__)


class MergedVersion:
    """Which version, if any, is merged into the replica's base weights, and its state."""

    def __init__(
        self, model: nn.Module, modules: MultiLoraModules, slots: AdapterSlots, canary: torch.Tensor
    ) -> None:
        self.model, self.modules, self.slots = model, modules, slots
        self.canary_ids = canary  # (1, 4) a tiny forward that must stay finite after a merge
        self.current: tuple[int, AdapterState] | None = None  # (version, float32 state)

    @property
    def state(self) -> AdapterState | None:
        return None if self.current is None else self.current[1]

    def replace(self, state: Mapping[str, np.ndarray], version: int) -> int | None:
        """Unmerge the merged version (if any) and merge ``version`` (already validated).

        A merge that would make a weight non-finite, or a canary forward with non-finite logits,
        raises ``AdapterValidationError``; on that or any other failure the previous version is
        merged back before the error propagates. Returns the version served before.
        """
        if self.slots.pinned():
            raise VersionConflictError(
                f"{self.slots.pinned()} running requests use an unmerged slot: merging now "
                "would change their weights mid-answer; push with mode='merge' from the start"
            )
        new = {k: np.array(v, dtype=np.float32) for k, v in state.items()}
        old = self.current
        self.clear()
        merged = False
        try:
            self.modules.merge_into_base(new)  # all or nothing
            merged = True
            self._check_canary()
        except Exception:  # whatever failed, the weights must go back to what was served
            if merged:
                self.modules.unmerge_from_base(new)
            if old is not None:
                self.modules.merge_into_base(old[1])
                self.current = old
                self.slots.set_merged(old[0])
            raise
        self.current = (version, new)
        return self.slots.set_merged(version)

    def clear(self) -> None:
        """Restore the plain base weights if a version is merged."""
        if self.current is not None:
            self.modules.unmerge_from_base(self.current[1])
            self.current = None
            self.slots.clear_merged()

    @contextlib.contextmanager
    def lifted(self) -> Iterator[None]:
        """The plain base weights for the block (training needs them), merged back after; the
        slots keep labelling new requests with the merged version."""
        merged = self.current
        if merged is not None:
            self.modules.unmerge_from_base(merged[1])
        try:
            yield
        finally:
            if merged is not None:
                self.modules.merge_into_base(merged[1])

    def _check_canary(self) -> None:
        slots = [NO_SLOT] * self.canary_ids.shape[0]
        with torch.inference_mode(), lora_context(serve(slots, self.canary_ids.device)):
            logits = self.model(input_ids=self.canary_ids).logits  # (1, 4, V)
        if not bool(torch.isfinite(logits).all()):
            bad = int((~torch.isfinite(logits)).sum())
            raise AdapterValidationError([f"canary forward produced {bad} non-finite logits"])
