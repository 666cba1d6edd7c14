"""Atomic PEFT-directory writes and checksummed reads."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy as st_np
from safetensors import SafetensorError

from collm_fl.errors import AdapterValidationError, StoreError
from collm_fl.store import cleanup_partial_dirs, read_adapter_dir, write_adapter_dir


def test_write_then_read_round_trips_state_and_config(
    tmp_path: Path, make_state, assert_states_equal, peft_config
) -> None:
    state = make_state(0)
    sha = write_adapter_dir(tmp_path / "v0000", state, peft_config)
    data = (tmp_path / "v0000" / "adapter_model.safetensors").read_bytes()
    assert sha == hashlib.sha256(data).hexdigest()
    loaded, config = read_adapter_dir(tmp_path / "v0000", verify_sha256=sha)
    assert_states_equal(loaded, state)
    assert config == peft_config
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v0000"]


def test_float64_input_is_stored_as_float32(tmp_path: Path, make_state, peft_config) -> None:
    state = {k: v.astype(np.float64) for k, v in make_state(1).items()}
    write_adapter_dir(tmp_path / "v", state, peft_config)
    loaded, _ = read_adapter_dir(tmp_path / "v")
    assert all(v.dtype == np.float32 for v in loaded.values())


def test_write_refuses_to_overwrite_existing_dir(tmp_path: Path, make_state, peft_config) -> None:
    (tmp_path / "v0000").mkdir()
    with pytest.raises(StoreError, match="already exists"):
        write_adapter_dir(tmp_path / "v0000", make_state(0), peft_config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v0000"]


def test_crash_in_safetensors_save_leaves_no_dir_and_no_temp(
    tmp_path: Path, make_state, peft_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("power cut")

    monkeypatch.setattr(st_np, "save_file", boom)
    with pytest.raises(RuntimeError, match="power cut"):
        write_adapter_dir(tmp_path / "v0001", make_state(0), peft_config)
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_while_writing_the_weights_is_a_store_error(
    tmp_path: Path, make_state, peft_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*args: object, **kwargs: object) -> None:
        raise SafetensorError("No space left on device (os error 28)")

    monkeypatch.setattr(st_np, "save_file", full)
    with pytest.raises(StoreError, match="No space left"):
        write_adapter_dir(tmp_path / "v0001", make_state(0), peft_config)
    assert list(tmp_path.iterdir()) == []


def test_failed_rename_becomes_store_error_and_leaves_nothing(
    tmp_path: Path, make_state, peft_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(src: object, dst: object) -> None:
        raise OSError("EIO")

    monkeypatch.setattr(os, "rename", boom)
    with pytest.raises(StoreError, match="EIO"):
        write_adapter_dir(tmp_path / "v0001", make_state(0), peft_config)
    assert list(tmp_path.iterdir()) == []


def test_checksum_mismatch_raises_store_error_naming_the_path(
    tmp_path: Path, make_state, peft_config
) -> None:
    sha = write_adapter_dir(tmp_path / "v", make_state(0), peft_config)
    with pytest.raises(StoreError, match="checksum mismatch") as info:
        read_adapter_dir(tmp_path / "v", verify_sha256="0" * 64)
    assert str(tmp_path / "v") in str(info.value)
    read_adapter_dir(tmp_path / "v", verify_sha256=sha)


def test_missing_files_raise_store_error(tmp_path: Path, make_state, peft_config) -> None:
    write_adapter_dir(tmp_path / "v", make_state(0), peft_config)
    (tmp_path / "v" / "adapter_config.json").unlink()
    with pytest.raises(StoreError, match=r"missing adapter_config\.json"):
        read_adapter_dir(tmp_path / "v")
    with pytest.raises(StoreError, match="missing"):
        read_adapter_dir(tmp_path / "nowhere")


def test_invalid_state_is_rejected_with_every_problem_before_writing(
    tmp_path: Path, make_state, peft_config
) -> None:
    state = make_state(0)
    keys = sorted(state)
    state[keys[0]] = np.full_like(state[keys[0]], np.nan)
    state[keys[1]] = state[keys[1]].astype(np.int32)
    with pytest.raises(AdapterValidationError) as info:
        write_adapter_dir(tmp_path / "v", state, peft_config)
    assert len(info.value.problems) == 2
    assert list(tmp_path.iterdir()) == []


def test_cleanup_partial_dirs_removes_only_temp_dirs(tmp_path: Path) -> None:
    (tmp_path / ".tmp-v0003-abc").mkdir()
    (tmp_path / ".tmp-v0003-abc" / "adapter_model.safetensors").write_bytes(b"half")
    (tmp_path / "v0002").mkdir()
    removed = cleanup_partial_dirs(tmp_path)
    assert [p.name for p in removed] == [".tmp-v0003-abc"]
    assert [p.name for p in tmp_path.iterdir()] == ["v0002"]
    assert cleanup_partial_dirs(tmp_path / "absent") == []


def test_an_adapter_that_does_not_match_its_own_config_is_never_stored_or_read(
    tmp_path, make_state, peft_config
):
    """PEFT loads a version by its config's r and target_modules: a state of another rank, or of
    modules the config does not target, was stored and checksummed, and failed only in PEFT."""
    with pytest.raises(AdapterValidationError, match="rank 8, but the adapter config says r=4"):
        write_adapter_dir(tmp_path / "a", make_state(0, rank=8), peft_config)
    only_q = {**peft_config, "target_modules": ["q_proj"]}
    with pytest.raises(AdapterValidationError, match="v_proj: not one of the config's target"):
        write_adapter_dir(tmp_path / "b", make_state(0), only_q)
    dotted = {**peft_config, "target_modules": ["self_attn.q_proj", "self_attn.v_proj"]}
    write_adapter_dir(tmp_path / "c", make_state(0), dotted)  # PEFT's dotted tails match
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # A folder written by something else (a config edited after): read back, it is refused.
    write_adapter_dir(tmp_path / "d", make_state(0), peft_config)
    (tmp_path / "d" / "adapter_config.json").write_text(json.dumps({**peft_config, "r": 8}))
    with pytest.raises(StoreError, match=r"not a valid stored adapter: .*r=8"):
        read_adapter_dir(tmp_path / "d")
