"""Adapters on the wire between a ClientApp and its replica: one safetensors blob.

The tensors travel as safetensors (no pickle, bounded parsing); the PEFT config, the version and
any scalar metrics travel in its string metadata.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from collm_fl.adapters import AdapterState
from collm_fl.errors import AdapterValidationError


def encode_adapter(
    state: Mapping[str, np.ndarray],
    peft_config: Mapping[str, object] | None = None,
    version: int | None = None,
    metrics: Mapping[str, float] | None = None,
) -> bytes:
    meta = {
        "peft_config": json.dumps(dict(peft_config or {})),
        "version": "" if version is None else str(version),
        "metrics": json.dumps(dict(metrics or {})),
    }
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}
    return st_save(tensors, metadata=meta)


def decode_adapter(
    blob: bytes,
) -> tuple[AdapterState, dict[str, object], int | None, dict[str, float]]:
    """(state, peft_config, version, metrics); AdapterValidationError on a malformed blob."""
    try:
        state = st_load(blob)
        meta = _metadata(blob)
        if not meta.get("peft_config"):  # e.g. a stored adapter_model.safetensors, as PEFT saves it
            raise ValueError(
                "no 'peft_config' in the safetensors metadata: the control API takes the "
                "adapter with its PEFT config in the header (collm_fl.replica.wire.encode_adapter; "
                "see docs/replica.md), not a bare adapter_model.safetensors"
            )
        config = json.loads(meta["peft_config"], parse_constant=_not_json)
        metrics = json.loads(meta.get("metrics") or "{}")
        version = int(meta["version"]) if meta.get("version") else None
        if not isinstance(config, dict) or not isinstance(metrics, dict):
            raise ValueError("metadata must be JSON objects")
        numbers = {str(k): float(v) for k, v in metrics.items()}
    except (SafetensorError, ValueError, KeyError, TypeError) as e:
        raise AdapterValidationError([f"malformed adapter payload: {e}"]) from e
    return dict(state), config, version, numbers


def _not_json(constant: str) -> object:
    """``NaN`` and ``Infinity``, which Python's json reads but JSON has not: a config holding one
    could never be stored (the store writes strict JSON)."""
    raise ValueError(f"the PEFT config holds {constant}, which is not JSON")


def _metadata(blob: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (its JSON header)."""
    if len(blob) < 8:
        raise ValueError("payload shorter than a safetensors header")
    n = int.from_bytes(blob[:8], "little")
    if n <= 0 or 8 + n > len(blob):
        raise ValueError("bad safetensors header length")
    header = json.loads(blob[8 : 8 + n])
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}
