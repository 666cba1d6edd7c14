"""Fixtures for the version store tests: small PEFT-keyed adapter states and temp-dir stores."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from collm_fl.adapters import AdapterState, LoraSpec
from collm_fl.store import VersionStore

PREFIX = "base_model.model.model.layers.{i}.self_attn.{m}"


def _make_state(seed: int, rank: int = 4, dim: int = 8, layers: int = 2) -> AdapterState:
    """A LoRA state keyed like PEFT's adapter_model.safetensors: A (r, d_in), B (d_out, r)."""
    rng = np.random.default_rng(seed)
    state: AdapterState = {}
    for i in range(layers):
        for m in ("q_proj", "v_proj"):
            p = PREFIX.format(i=i, m=m)
            state[p + ".lora_A.weight"] = rng.standard_normal((rank, dim)).astype(np.float32)
            state[p + ".lora_B.weight"] = rng.standard_normal((dim, rank)).astype(np.float32)
    return state


@pytest.fixture
def peft_config() -> dict[str, object]:
    return LoraSpec(rank=4, alpha=8).to_peft_config_dict("tiny")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[VersionStore]:
    with VersionStore(tmp_path / "store") as s:
        yield s


def _assert_states_equal(a: AdapterState, b: AdapterState) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == np.float32
        np.testing.assert_array_equal(a[k], b[k])


@pytest.fixture
def make_state() -> Callable[..., AdapterState]:
    return _make_state


@pytest.fixture
def assert_states_equal() -> Callable[[AdapterState, AdapterState], None]:
    return _assert_states_equal
