"""Shared fixtures: tiny models and temp stores; nothing here touches the network."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest

from collm_fl.adapters import LoraSpec


@pytest.fixture(scope="session")
def tiny():
    """The built-in tiny Llama + tokenizer (built once into the cache, then loaded)."""
    from collm_fl.models import load_base_model

    return load_base_model("tiny")


@pytest.fixture()
def tiny_fresh():
    """A fresh copy of the tiny model, for tests that wrap or modify it."""
    from collm_fl.models import load_base_model

    return load_base_model("tiny")


@pytest.fixture()
def lora_spec() -> LoraSpec:
    return LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))


def random_adapter(shapes: dict[str, tuple[int, int]], seed: int, scale: float = 0.05):
    """A random adapter state with the given PEFT keys and shapes."""
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in shapes.items()}
