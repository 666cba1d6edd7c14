"""PEFT adapter directories on disk: write atomically, read back with a checksum.

A stored version is a plain PEFT directory (``adapter_config.json`` + ``adapter_model.safetensors``)
so ``PeftModel.from_pretrained`` and vLLM load it as is. Writes go to a hidden temp directory beside
the destination and are renamed into place only once every byte is on disk, so a crash mid-write
leaves a ``.tmp-*`` directory (removed by :func:`cleanup_partial_dirs`) and never a half version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import safetensors.numpy as st_np
from safetensors import SafetensorError

from collm_fl.adapters import (
    LORA_A_SUFFIX,
    LORA_B_SUFFIX,
    AdapterState,
    LoraSpec,
    lora_module_names,
)
from collm_fl.errors import AdapterValidationError, ConfigError, StoreError
from collm_fl.reports import fsync_dir as _fsync_dir

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TEMP_PREFIX = ".tmp-"
_CHUNK = 1 << 20


def write_adapter_dir(dest: Path, state: AdapterState, peft_config: Mapping[str, object]) -> str:
    """Write ``state`` and ``peft_config`` as a PEFT directory at ``dest``, all or nothing.

    Returns the sha256 of ``adapter_model.safetensors``. Refuses to replace an existing ``dest``.
    """
    _validate_state(state, peft_config)
    if dest.exists():
        raise StoreError(f"{dest}: already exists; refusing to overwrite a stored adapter")
    tmp = dest.parent / f"{TEMP_PREFIX}{dest.name}-{uuid.uuid4().hex}"
    try:
        _make_dirs(dest.parent)
        tmp.mkdir()
        tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}
        weights = tmp / WEIGHTS_FILE
        # "format": "pt" is what PEFT writes; transformers' loaders look for it.
        st_np.save_file(tensors, weights, metadata={"format": "pt"})
        checksum = _fsync_and_hash(weights)
        config_text = json.dumps(dict(peft_config), indent=2, sort_keys=True, allow_nan=False)
        with open(tmp / CONFIG_FILE, "w", encoding="utf-8") as f:
            f.write(config_text + "\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if dest.exists():  # someone else got there while we were writing
            raise StoreError(f"{dest}: already exists; refusing to overwrite a stored adapter")
        os.rename(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError | SafetensorError):  # e.g. no space left on the device
            raise StoreError(f"{dest}: cannot write adapter: {e}") from e
        if isinstance(e, TypeError | ValueError):  # config not JSON-serialisable
            raise StoreError(f"{dest}: cannot serialise adapter: {e}") from e
        raise
    log.debug("wrote adapter %s (sha256 %s)", dest, checksum)
    return checksum


def _make_dirs(folder: Path) -> None:
    """``folder`` and its missing ancestors, each new one's name made durable in its parent: a
    run's first version's ``runs/<name>/`` lost to a power cut would leave the store's row for an
    adapter that has no folder."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for made in reversed(missing):
        made.mkdir(exist_ok=True)
        _fsync_dir(made.parent)


def read_adapter_dir(
    path: Path, verify_sha256: str | None = None
) -> tuple[AdapterState, dict[str, object]]:
    """Read a PEFT directory back as (state, adapter_config dict), checking the sha256 if given."""
    weights, config_path = path / WEIGHTS_FILE, path / CONFIG_FILE
    missing = [p.name for p in (weights, config_path) if not p.is_file()]
    if missing:
        raise StoreError(f"{path}: adapter directory is missing {', '.join(missing)}")
    try:
        data = weights.read_bytes()
        config_text = config_path.read_text(encoding="utf-8")
    except OSError as e:
        raise StoreError(f"{path}: cannot read adapter: {e}") from e
    if verify_sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != verify_sha256:
            raise StoreError(
                f"{weights}: checksum mismatch (stored {verify_sha256}, on disk {actual}); "
                "the file was modified or corrupted"
            )
    try:
        loaded = st_np.load(data)
    except Exception as e:  # safetensors raises its own SafetensorError on bad headers
        raise StoreError(f"{weights}: not a readable safetensors file: {e}") from e
    try:
        config = json.loads(config_text)
    except json.JSONDecodeError as e:
        raise StoreError(f"{config_path}: invalid JSON: {e}") from e
    if not isinstance(config, dict):
        raise StoreError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    with np.errstate(over="ignore"):  # (a float64 beyond float32's range: refused below)
        state: AdapterState = {k: np.asarray(v, dtype=np.float32) for k, v in loaded.items()}
    try:
        _validate_state(state, config)
    except (AdapterValidationError, ConfigError) as e:  # (a config LoraSpec refuses: r 0, ...)
        raise StoreError(f"{path}: not a valid stored adapter: {e}") from e
    return state, config


def remove_adapter_dir(path: Path) -> None:
    """Delete a stored adapter directory, all or nothing.

    It is first renamed to a ``.tmp-*`` name (atomic), so a crash mid-delete leaves a directory
    :func:`cleanup_partial_dirs` removes, never a half-deleted version that looks stored.
    """
    doomed = path.parent / f"{TEMP_PREFIX}rm-{path.name}-{uuid.uuid4().hex}"
    try:
        os.rename(path, doomed)
        _fsync_dir(path.parent)
    except OSError as e:
        raise StoreError(f"{path}: cannot remove adapter: {e}") from e
    shutil.rmtree(doomed, ignore_errors=True)


def cleanup_partial_dirs(root: Path) -> list[Path]:
    """Remove ``.tmp-*`` directories left in ``root`` by interrupted writes; returns what went.

    Only safe while no other writer is writing into ``root`` (the store has one writer per run).
    """
    if not root.is_dir():
        return []
    removed = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(TEMP_PREFIX) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
            log.warning("removed partial adapter directory %s (interrupted write)", entry)
            removed.append(entry)
    return removed


def file_sha256(path: Path) -> str:
    """The sha256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _fsync_and_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "r+b") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
        os.fsync(f.fileno())
    return h.hexdigest()


def _validate_state(
    state: Mapping[str, np.ndarray], peft_config: Mapping[str, object] | None = None
) -> None:
    """Collect every structural problem (pairs, ranks, dtype, finiteness; with ``peft_config``,
    its rank ``r`` and ``target_modules``: PEFT loads a version by them) and raise once."""
    if not state:
        raise AdapterValidationError(["adapter state is empty"])
    modules = lora_module_names(state)  # raises on unpaired or foreign keys
    problems: list[str] = []
    for key, value in state.items():
        arr = np.asarray(value)
        if not np.issubdtype(arr.dtype, np.floating):
            problems.append(f"{key}: dtype {arr.dtype} is not floating point")
        elif arr.ndim != 2:
            problems.append(f"{key}: expected a 2-D matrix, got shape {arr.shape}")
        elif not bool(np.isfinite(arr).all()):
            problems.append(f"{key}: contains NaN or Inf")
    if not problems:
        for m in modules:
            a, b = np.asarray(state[m + LORA_A_SUFFIX]), np.asarray(state[m + LORA_B_SUFFIX])
            if a.shape[0] != b.shape[1]:  # A (r, d_in), B (d_out, r)
                problems.append(f"{m}: rank mismatch, A {a.shape} vs B {b.shape}")
    if not problems and peft_config is not None:
        spec = LoraSpec.from_peft_config_dict(peft_config)  # (refuses a config PEFT's is not)
        for m in modules:
            rank = np.asarray(state[m + LORA_A_SUFFIX]).shape[0]
            if rank != spec.rank:
                problems.append(f"{m}: rank {rank}, but the adapter config says r={spec.rank}")
            # (PEFT's match of a list of targets: the module's name, or its dotted tail)
            if not any(m == t or m.endswith(f".{t}") for t in spec.target_modules):
                problems.append(
                    f"{m}: not one of the config's target_modules {list(spec.target_modules)}"
                )
    if problems:
        raise AdapterValidationError(problems)
