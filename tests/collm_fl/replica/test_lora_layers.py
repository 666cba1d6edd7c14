"""Multi-LoRA layers: the maths against NumPy, per-row slots, thread-local modes, PEFT parity."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch import nn

from collm_fl.adapters import LORA_A_SUFFIX, LORA_B_SUFFIX, AdapterState, LoraSpec
from collm_fl.errors import AdapterValidationError, ConfigError
from collm_fl.replica.lora_layers import (
    MultiLoraModules,
    current_mode,
    inject_multi_lora,
    lora_context,
    serve,
    train,
)

D_IN, D_OUT, RANK, SLOTS = 8, 6, 2, 3
SPEC = LoraSpec(rank=RANK, alpha=6.0, target_modules=("q_proj", "v_proj"))


class Toy(nn.Module):
    """Two target projections and one non-target, like an attention block."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(D_IN, D_OUT, bias=True)
        self.v_proj = nn.Linear(D_IN, D_OUT, bias=False)
        self.o_proj = nn.Linear(D_IN, D_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q_proj(x)


def random_state(shapes: dict[str, tuple[int, int]], seed: int, scale: float = 0.5) -> AdapterState:
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in shapes.items()}


@pytest.fixture()
def toy() -> tuple[Toy, MultiLoraModules]:
    torch.manual_seed(0)
    model = Toy()
    return model, inject_multi_lora(model, SPEC, num_slots=SLOTS)


def reference(model: Toy, state: AdapterState | None, x: np.ndarray) -> np.ndarray:
    """NumPy: W x + b + scaling * B A x for q_proj."""
    w = model.q_proj.base.weight.detach().numpy()
    b = model.q_proj.base.bias.detach().numpy()
    y = x @ w.T + b
    if state is not None:
        a = state["base_model.model.q_proj" + LORA_A_SUFFIX]
        bm = state["base_model.model.q_proj" + LORA_B_SUFFIX]
        y = y + SPEC.scaling * (x @ a.T @ bm.T)
    return y


def test_inject_replaces_only_targets_keyed_like_peft(toy: tuple[Toy, MultiLoraModules]) -> None:
    model, modules = toy
    assert sorted(modules.layers) == ["base_model.model.q_proj", "base_model.model.v_proj"]
    assert isinstance(model.o_proj, nn.Linear)
    assert modules.expected_shapes() == {
        "base_model.model.q_proj.lora_A.weight": (RANK, D_IN),
        "base_model.model.q_proj.lora_B.weight": (D_OUT, RANK),
        "base_model.model.v_proj.lora_A.weight": (RANK, D_IN),
        "base_model.model.v_proj.lora_B.weight": (D_OUT, RANK),
    }


def test_inject_freezes_everything_but_training_adapters(toy: tuple[Toy, MultiLoraModules]) -> None:
    model, modules = toy
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in modules.training_parameters()}
    assert len(trainable) == 4


def test_inject_twice_or_without_targets_is_a_config_error(
    toy: tuple[Toy, MultiLoraModules],
) -> None:
    model, _ = toy
    with pytest.raises(ConfigError):
        inject_multi_lora(model, SPEC, num_slots=2)
    with pytest.raises(ConfigError):
        inject_multi_lora(nn.Sequential(nn.Linear(2, 2)), SPEC, num_slots=2)


def test_serve_slot_equals_numpy_reference(toy: tuple[Toy, MultiLoraModules]) -> None:
    model, modules = toy
    state = random_state(modules.expected_shapes(), seed=1)
    modules.write_slot(1, state)
    x = np.random.default_rng(2).standard_normal((3, 5, D_IN)).astype(np.float32)
    with torch.no_grad(), lora_context(serve([1, 1, 1])):
        y = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y, reference(model, state, x), atol=1e-5)


def test_mixed_slots_per_row_and_no_slot_rows_equal_base(
    toy: tuple[Toy, MultiLoraModules],
) -> None:
    model, modules = toy
    states = [random_state(modules.expected_shapes(), seed=s) for s in range(SLOTS)]
    for slot, state in enumerate(states):
        modules.write_slot(slot, state)
    x = np.random.default_rng(3).standard_normal((4, 3, D_IN)).astype(np.float32)
    slot_ids = [2, -1, 0, 2]
    with torch.no_grad(), lora_context(serve(slot_ids)):
        y = model(torch.from_numpy(x)).numpy()
    for row, slot in enumerate(slot_ids):
        want = reference(model, states[slot] if slot >= 0 else None, x[row])
        np.testing.assert_allclose(y[row], want, atol=1e-5)


def test_all_rows_without_slot_and_no_context_equal_base(
    toy: tuple[Toy, MultiLoraModules],
) -> None:
    model, modules = toy
    modules.write_slot(0, random_state(modules.expected_shapes(), seed=4))
    x = np.random.default_rng(5).standard_normal((2, D_IN)).astype(np.float32)
    with torch.no_grad():
        plain = model(torch.from_numpy(x)).numpy()
        with lora_context(serve([-1, -1])):
            none = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(plain, reference(model, None, x), atol=1e-6)
    np.testing.assert_array_equal(none, plain)


def test_lora_context_nests_and_restores_previous_mode() -> None:
    assert current_mode() is None
    with lora_context(serve([0])):
        outer = current_mode()
        with lora_context(train()):
            assert current_mode() is not None and current_mode().training  # type: ignore[union-attr]
        assert current_mode() is outer
    assert current_mode() is None


def test_train_mode_gradients_reach_only_training_adapter(
    toy: tuple[Toy, MultiLoraModules],
) -> None:
    model, modules = toy
    modules.set_training_state(random_state(modules.expected_shapes(), seed=6))
    x = torch.randn(4, D_IN)
    with lora_context(train()):
        model(x).pow(2).sum().backward()
    q = model.q_proj
    assert q.train_a.grad is not None and q.train_a.grad.abs().sum() > 0
    assert q.train_b.grad is not None and q.train_b.grad.abs().sum() > 0
    assert q.base.weight.grad is None and q.slot_a.grad is None
    assert model.v_proj.train_a.grad is None  # not on the loss path


def test_training_state_round_trips_in_place(toy: tuple[Toy, MultiLoraModules]) -> None:
    _, modules = toy
    params_before = [id(p) for p in modules.training_parameters()]
    fresh = modules.get_training_state()
    assert all(np.all(v == 0) for k, v in fresh.items() if k.endswith(LORA_B_SUFFIX))
    state = random_state(modules.expected_shapes(), seed=7)
    modules.set_training_state(state)
    assert [id(p) for p in modules.training_parameters()] == params_before
    got = modules.get_training_state()
    assert sorted(got) == sorted(state)
    for k in state:
        np.testing.assert_array_equal(got[k], state[k])


def test_write_slot_round_trips_and_rejects_bad_states(toy: tuple[Toy, MultiLoraModules]) -> None:
    _, modules = toy
    state = random_state(modules.expected_shapes(), seed=8)
    modules.write_slot(2, state)
    got = modules.read_slot(2)
    for k in state:
        np.testing.assert_array_equal(got[k], state[k])
    bad = dict(state)
    bad["base_model.model.q_proj.lora_A.weight"] = np.zeros((RANK + 1, D_IN), np.float32)
    del bad["base_model.model.v_proj.lora_B.weight"]
    with pytest.raises(AdapterValidationError) as err:
        modules.write_slot(0, bad)
    assert len(err.value.problems) == 2
    with pytest.raises(IndexError):
        modules.write_slot(SLOTS, state)


def test_serving_and_training_threads_do_not_leak_modes(
    toy: tuple[Toy, MultiLoraModules],
) -> None:
    model, modules = toy
    modules.write_slot(1, random_state(modules.expected_shapes(), seed=9))
    modules.set_training_state(random_state(modules.expected_shapes(), seed=10))
    x = torch.randn(2, 4, D_IN)
    with torch.no_grad():
        with lora_context(serve([1, 1])):
            want_serve = model(x)
        with lora_context(train()):
            want_train = model(x)
    rounds = 200
    barrier = threading.Barrier(2)
    results: dict[str, list[bool]] = {"serve": [], "train": []}

    def worker(name: str) -> None:
        mode = serve([1, 1]) if name == "serve" else train()
        want = want_serve if name == "serve" else want_train
        with lora_context(mode):
            for _ in range(rounds):
                barrier.wait(timeout=10)  # interleave the two threads' forwards step by step
                with torch.no_grad():
                    results[name].append(bool(torch.allclose(model(x), want, atol=1e-6)))

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("serve", "train")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results["serve"] == [True] * rounds
    assert results["train"] == [True] * rounds
    assert not torch.allclose(want_serve, want_train)


def test_logits_equal_peft_with_same_adapter(lora_spec: LoraSpec) -> None:
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    from collm_fl.models import load_base_model
    from collm_fl.training import attach_lora

    ours = load_base_model("tiny").model
    modules = inject_multi_lora(ours, lora_spec, num_slots=2)
    peft_model = attach_lora(load_base_model("tiny").model, lora_spec)
    peft_keys = set(get_peft_model_state_dict(peft_model))
    assert set(modules.get_training_state()) == peft_keys
    assert set(modules.expected_shapes()) == peft_keys

    state = random_state(modules.expected_shapes(), seed=11, scale=0.2)
    set_peft_model_state_dict(peft_model, {k: torch.from_numpy(v) for k, v in state.items()})
    modules.write_slot(1, state)
    ids = torch.randint(2, 2000, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        with lora_context(serve([1, 1])):
            got = ours(input_ids=ids).logits
        base = ours(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - base).abs().max() > 1e-3  # the adapter really changes the output
