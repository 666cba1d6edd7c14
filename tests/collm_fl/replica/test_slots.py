"""Serving slots: validation before writing, shadow promotion, pinning, waiting for a free slot."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch import nn

from collm_fl.adapters import AdapterState, LoraSpec
from collm_fl.errors import AdapterValidationError
from collm_fl.replica.lora_layers import MultiLoraModules, inject_multi_lora
from collm_fl.replica.slots import (
    HISTORY_LEN,
    AdapterSlots,
    NoFreeSlotError,
    ShadowStateError,
    canary_check,
)

SPEC = LoraSpec(rank=2, alpha=4.0, target_modules=("q_proj", "v_proj"))


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(8, 8)
        self.v_proj = nn.Linear(8, 4)


def make_slots(num_slots: int = 3) -> tuple[MultiLoraModules, AdapterSlots]:
    modules = inject_multi_lora(Toy(), SPEC, num_slots=num_slots)
    return modules, AdapterSlots(modules)


def state_for(modules: MultiLoraModules, seed: int) -> AdapterState:
    rng = np.random.default_rng(seed)
    shapes = modules.expected_shapes()
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def assert_state_equal(a: AdapterState, b: AdapterState) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_before_any_version_requests_get_the_base_model() -> None:
    _, slots = make_slots()
    assert slots.acquire() == (-1, None)
    slots.release(-1)
    assert slots.current_version is None


def test_validation_collects_every_problem_at_once() -> None:
    modules, slots = make_slots()
    state = state_for(modules, 0)
    missing = "base_model.model.v_proj.lora_B.weight"
    del state[missing]
    state["base_model.model.q_proj.lora_A.weight"][0, 0] = np.nan
    state["base_model.model.extra.lora_A.weight"] = np.zeros((2, 8), np.float32)
    with pytest.raises(AdapterValidationError) as err:
        slots.load_shadow(state, version=1, spec=SPEC.replace(rank=4))
    text = " | ".join(err.value.problems)
    assert len(err.value.problems) == 4
    assert "rank 4" in text and f"missing key {missing}" in text
    assert "non-finite" in text and "unexpected key" in text
    assert all(s.role == "idle" for s in slots.snapshot())  # nothing reserved or written


def test_rejected_shadow_leaves_current_untouched() -> None:
    modules, slots = make_slots()
    good = state_for(modules, 1)
    slots.load_shadow(good, version=1, spec=SPEC).promote()
    current = slots.current_slot
    bad = state_for(modules, 2)
    bad["base_model.model.v_proj.lora_A.weight"] = np.full((2, 8), np.inf, np.float32)
    with pytest.raises(AdapterValidationError):
        slots.load_shadow(bad, version=2, spec=SPEC)

    def failing_canary(slot: int) -> None:
        assert slot != current
        raise RuntimeError("logits exploded")

    with pytest.raises(AdapterValidationError, match="logits exploded"):
        slots.load_shadow(state_for(modules, 3), version=3, spec=SPEC, validate_fn=failing_canary)
    assert slots.current_slot == current and slots.current_version == 1
    assert_state_equal(modules.read_slot(current), good)
    assert [s.role for s in slots.snapshot()].count("shadow") == 0


def test_promote_switches_new_requests_only() -> None:
    modules, slots = make_slots()
    v1 = state_for(modules, 1)
    slots.load_shadow(v1, version=1, spec=SPEC).promote()
    old_slot, old_version = slots.acquire()
    shadow = slots.load_shadow(state_for(modules, 2), version=2, spec=SPEC)
    assert shadow.slot != old_slot
    assert slots.acquire()[1] == 1  # not served before promote()
    slots.release(old_slot)
    assert shadow.promote() == 1
    new_slot, new_version = slots.acquire()
    assert (old_version, new_version) == (1, 2) and new_slot == shadow.slot
    assert_state_equal(modules.read_slot(old_slot), v1)  # the pinned request still reads v1
    assert [v for v, _ in slots.history] == [1, 2]


def test_many_swaps_keep_the_slot_bookkeeping_bounded() -> None:
    # Per-swap state must not grow: a replica swaps thousands of times between restarts.
    modules, slots = make_slots()
    states = [state_for(modules, seed) for seed in range(3)]
    swaps = 10 * HISTORY_LEN + 3
    for version in range(1, swaps + 1):
        slots.load_shadow(states[version % 3], version=version, spec=SPEC).promote()
        slot, served = slots.acquire()
        assert served == version
        slots.release(slot)
    assert [v for v, _ in slots.history] == list(range(swaps - HISTORY_LEN + 1, swaps + 1))
    assert len(slots.snapshot()) == slots.num_slots
    assert slots.pinned() == 0
    assert sum(s.role == "current" for s in slots.snapshot()) == 1


def test_pinned_slot_is_never_chosen_for_a_shadow() -> None:
    modules, slots = make_slots(num_slots=3)
    slots.load_shadow(state_for(modules, 1), version=1, spec=SPEC).promote()
    pinned, _ = slots.acquire()
    slots.load_shadow(state_for(modules, 2), version=2, spec=SPEC).promote()
    for version in range(3, 9):  # many reloads cycle through the free slots only
        with slots.load_shadow(state_for(modules, version), version, spec=SPEC) as shadow:
            assert shadow.slot not in (pinned, slots.current_slot)
            shadow.promote()
    assert slots.snapshot()[pinned].version == 1


def test_load_shadow_times_out_while_all_slots_are_pinned_then_waits_for_release() -> None:
    modules, slots = make_slots(num_slots=2)
    slots.load_shadow(state_for(modules, 1), version=1, spec=SPEC).promote()
    first, _ = slots.acquire()
    slots.load_shadow(state_for(modules, 2), version=2, spec=SPEC).promote()
    with pytest.raises(NoFreeSlotError):
        slots.load_shadow(state_for(modules, 3), version=3, spec=SPEC, timeout=0.05)

    got: list[int] = []
    loader = threading.Thread(
        target=lambda: got.append(
            slots.load_shadow(state_for(modules, 3), version=3, spec=SPEC, timeout=20).slot
        )
    )
    loader.start()
    slots.release(first)  # the waiting loader gets the slot as soon as it drains
    loader.join(timeout=20)
    assert got == [first]


def test_shadow_context_discards_unpromoted_and_state_errors() -> None:
    modules, slots = make_slots()
    with slots.load_shadow(state_for(modules, 1), version=1, spec=SPEC) as shadow:
        assert slots.snapshot()[shadow.slot].role == "shadow"
    assert shadow.state == "discarded" and slots.snapshot()[shadow.slot].role == "idle"
    with pytest.raises(ShadowStateError):
        shadow.promote()
    promoted = slots.load_shadow(state_for(modules, 2), version=2, spec=SPEC)
    promoted.promote()
    with pytest.raises(ShadowStateError):
        promoted.promote()
    with pytest.raises(ShadowStateError):
        promoted.discard()


def test_canary_check_rejects_a_finite_adapter_that_overflows(lora_spec: LoraSpec) -> None:
    from collm_fl.models import load_base_model

    model = load_base_model("tiny").model
    modules = inject_multi_lora(model, lora_spec, num_slots=2)
    slots = AdapterSlots(modules)
    ids = torch.tensor([[5, 6, 7, 8]])

    def canary(slot: int) -> None:
        canary_check(model, modules, slot, ids)

    shapes = modules.expected_shapes()
    fine = {k: np.full(s, 0.01, np.float32) for k, s in shapes.items()}
    slots.load_shadow(fine, version=1, spec=lora_spec, validate_fn=canary).promote()
    huge = {k: np.full(s, 1e30, np.float32) for k, s in shapes.items()}
    with pytest.raises(AdapterValidationError, match="non-finite logits"):
        slots.load_shadow(huge, version=2, spec=lora_spec, validate_fn=canary)
    assert slots.current_version == 1
