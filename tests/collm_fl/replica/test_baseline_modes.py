"""The stop-the-world hooks the goodput baselines use: merged serving, reload/merge swaps with
serving paused, exclusive training, and their pass-through in the control API."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from collm_fl.adapters import LORA_A_SUFFIX, LORA_B_SUFFIX, AdapterState, LoraSpec
from collm_fl.data import DataSpec
from collm_fl.errors import AdapterValidationError
from collm_fl.models import LoadedModel
from collm_fl.replica.coexec import TrainOutcome
from collm_fl.replica.control_client import ReplicaClient, ReplicaUnavailable
from collm_fl.replica.lora_layers import NO_SLOT, inject_multi_lora
from collm_fl.replica.requests import GenerationRequest, RequestHandle
from collm_fl.replica.runtime import Replica, ReplicaConfig
from collm_fl.replica.sampling import SamplingParams
from collm_fl.replica.slots import AdapterSlots, NoFreeSlotError, ShadowStateError

SPEC = LoraSpec()  # the replica's defaults: r=8, alpha=16, q_proj/v_proj
CONFIG = SPEC.to_peft_config_dict("tiny")
TIMEOUT = 120.0
GREEDY = SamplingParams(max_tokens=16, temperature=0.0)


def adapter(shapes: dict[str, tuple[int, int]], seed: int, scale: float = 0.3) -> AdapterState:
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in shapes.items()}


def base_weights(replica_or_modules: Replica | object) -> dict[str, torch.Tensor]:
    modules = getattr(replica_or_modules, "modules", replica_or_modules)
    return {k: layer.base.weight.detach().clone() for k, layer in modules.layers.items()}


def assert_base_weights(replica: Replica, expected: dict[str, torch.Tensor]) -> None:
    for prefix, weight in base_weights(replica).items():
        torch.testing.assert_close(weight, expected[prefix], atol=1e-5, rtol=0)


@pytest.fixture()
def make_replica(tmp_path: Path) -> Iterator[Callable[..., Replica]]:
    started: list[Replica] = []

    def make(with_data: bool = False, num_slots: int = 4) -> Replica:
        cfg = ReplicaConfig(
            model="tiny",
            lora=SPEC,
            store_dir=str(tmp_path / f"store{len(started)}"),
            data=DataSpec() if with_data else None,
            num_partitions=4,
            max_batch_size=4,
            num_slots=num_slots,
        )
        replica = Replica(cfg)
        replica.start()
        started.append(replica)
        return replica

    yield make
    for replica in started:
        replica.stop()


def generate(replica: Replica, prompt: str, request_id: str) -> RequestHandle:
    ids = list(replica.tokenizer(prompt)["input_ids"])
    handle = replica.engine.submit(GenerationRequest(ids, GREEDY, request_id))
    assert handle.wait(TIMEOUT), f"{request_id} did not finish"
    return handle


def test_merge_then_unmerge_restores_the_base_weights(tiny_fresh: LoadedModel) -> None:
    modules = inject_multi_lora(tiny_fresh.model, SPEC, num_slots=2)
    before = base_weights(modules)
    state = adapter(modules.expected_shapes(), seed=1)
    modules.merge_into_base(state)
    for prefix, layer in modules.layers.items():
        a, b = state[prefix + LORA_A_SUFFIX], state[prefix + LORA_B_SUFFIX]
        expected = before[prefix].numpy() + SPEC.scaling * (b @ a)  # W + s·B@A (numpy reference)
        np.testing.assert_allclose(layer.base.weight.numpy(), expected, atol=1e-5)
    modules.unmerge_from_base(state)
    for prefix, layer in modules.layers.items():
        torch.testing.assert_close(layer.base.weight, before[prefix], atol=1e-5, rtol=0)


def test_merge_refuses_a_bad_state_before_touching_any_weight(tiny_fresh: LoadedModel) -> None:
    modules = inject_multi_lora(tiny_fresh.model, SPEC, num_slots=2)
    before = base_weights(modules)
    state = adapter(modules.expected_shapes(), seed=2)
    last = sorted(state)[-1]
    state[last][0, 0] = np.nan
    del state[sorted(state)[0]]
    with pytest.raises(AdapterValidationError) as err:
        modules.merge_into_base(state)
    assert "missing key" in str(err.value) and "non-finite" in str(err.value)
    for prefix, layer in modules.layers.items():
        assert torch.equal(layer.base.weight, before[prefix])


def test_merged_version_is_served_on_slot_minus_one_and_blocks_slot_loads(
    tiny_fresh: LoadedModel,
) -> None:
    modules = inject_multi_lora(tiny_fresh.model, SPEC, num_slots=2)
    slots = AdapterSlots(modules)
    state = adapter(modules.expected_shapes(), seed=3)
    slots.load_shadow(state, 1, SPEC).promote()
    assert slots.set_merged(2) == 1
    assert slots.acquire() == (NO_SLOT, 2) and slots.current_version == 2
    with pytest.raises(ShadowStateError, match="merged"):
        slots.load_shadow(state, 3, SPEC)
    slots.clear_merged()
    assert slots.acquire() == (NO_SLOT, None)
    slots.load_shadow(state, 3, SPEC).promote()
    assert slots.current_version == 3


def test_merged_serving_equals_unmerged_serving_of_the_same_version(make_replica) -> None:
    replica = make_replica()
    before = base_weights(replica)
    state = adapter(replica.modules.expected_shapes(), seed=4)
    prompts = ["ROMEO: O, she doth teach", "To be, or not to be"]
    base = [generate(replica, p, f"base{i}").token_ids for i, p in enumerate(prompts)]
    replica.push_version(state, CONFIG, 1, run="unmerged")
    unmerged = [generate(replica, p, f"u{i}") for i, p in enumerate(prompts)]
    replica.push_version(state, CONFIG, 1, run="merged", mode="merge")
    merged = [generate(replica, p, f"m{i}") for i, p in enumerate(prompts)]
    assert [h.token_ids for h in merged] == [h.token_ids for h in unmerged]
    assert [h.token_ids for h in unmerged] != base  # the adapter matters, so the check bites
    assert all(h.slot == NO_SLOT and h.version == 1 for h in merged)
    assert all(h.slot != NO_SLOT and h.version == 1 for h in unmerged)
    # Back to slot serving: the merged version leaves the base exactly as it was.
    replica.push_version(state, CONFIG, 2, run="merged")
    assert replica.slots.merged_version is None
    for prefix, layer in replica.modules.layers.items():
        torch.testing.assert_close(layer.base.weight, before[prefix], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("mode", "gated"), [("reload", "write_slot"), ("merge", "merge_into_base")]
)
def test_reload_and_merge_pause_serving_and_a_request_during_the_swap_waits_then_completes(
    make_replica, monkeypatch: pytest.MonkeyPatch, mode: str, gated: str
) -> None:
    replica = make_replica()
    shapes = replica.modules.expected_shapes()
    replica.push_version(adapter(shapes, 5), CONFIG, 1, mode=mode)
    entered, release = threading.Event(), threading.Event()
    original = getattr(replica.modules, gated)

    def held(*args: object) -> None:  # the swap's load step, held open by the test
        entered.set()
        assert release.wait(TIMEOUT)
        original(*args)

    monkeypatch.setattr(replica.modules, gated, held)
    pusher = threading.Thread(
        target=replica.push_version, args=(adapter(shapes, 6), CONFIG, 2), kwargs={"mode": mode}
    )
    pusher.start()
    assert entered.wait(TIMEOUT)
    ids = list(replica.tokenizer("Good morrow")["input_ids"])
    handle = replica.engine.submit(GenerationRequest(ids, GREEDY, "during-swap"))
    released_at = time.monotonic()
    release.set()
    pusher.join(TIMEOUT)
    assert handle.wait(TIMEOUT)
    assert handle.finish_reason in ("length", "stop")
    assert handle.first_token_at is not None and handle.first_token_at >= released_at
    assert handle.version == 2  # admitted after the swap, on the new version


def test_shadow_swap_serves_while_the_version_loads(make_replica, monkeypatch) -> None:
    replica = make_replica()
    shapes = replica.modules.expected_shapes()
    replica.push_version(adapter(shapes, 5), CONFIG, 1)
    entered, release = threading.Event(), threading.Event()
    original = replica.modules.write_slot

    def held(*args: object) -> None:
        entered.set()
        assert release.wait(TIMEOUT)
        original(*args)

    monkeypatch.setattr(replica.modules, "write_slot", held)
    pusher = threading.Thread(target=replica.push_version, args=(adapter(shapes, 6), CONFIG, 2))
    pusher.start()
    try:
        assert entered.wait(TIMEOUT)
        handle = generate(replica, "Good morrow", "during-shadow-load")  # finishes while held
        assert handle.version == 1
    finally:
        release.set()
        pusher.join(TIMEOUT)
    assert replica.served_version == 2


def test_exclusive_training_pauses_serving_until_the_job_ends(make_replica, monkeypatch) -> None:
    replica = make_replica(with_data=True)
    replica.push_version(adapter(replica.modules.expected_shapes(), 7, 0.05), CONFIG, 0)
    entered, release = threading.Event(), threading.Event()
    job_done: list[float] = []
    set_state, get_state = replica.modules.set_training_state, replica.modules.get_training_state

    def held_start(state: AdapterState) -> None:  # the job's first act, with serving paused
        entered.set()
        assert release.wait(TIMEOUT)
        set_state(state)

    def timed_end() -> AdapterState:  # the job's last act, after its last micro-step
        job_done.append(time.monotonic())
        return get_state()

    monkeypatch.setattr(replica.modules, "set_training_state", held_start)
    monkeypatch.setattr(replica.modules, "get_training_state", timed_end)
    outcome: list[TrainOutcome] = []
    trainer = threading.Thread(
        target=lambda: outcome.append(replica.train(3, 1e-3, 60.0, 1, exclusive=True))
    )
    trainer.start()
    assert entered.wait(TIMEOUT)
    ids = list(replica.tokenizer("Good morrow")["input_ids"])
    handle = replica.engine.submit(GenerationRequest(ids, GREEDY, "during-training"))
    release.set()
    trainer.join(TIMEOUT)
    assert handle.wait(TIMEOUT) and handle.finish_reason in ("length", "stop")
    assert handle.first_token_at is not None and handle.first_token_at >= job_done[0]
    assert outcome[0].steps == 3 and outcome[0].yields == 0  # no SLO guard: no yielding


def test_exclusive_training_on_a_merged_replica_uses_the_plain_base_and_merges_back(
    make_replica, monkeypatch
) -> None:
    replica = make_replica(with_data=True)
    plain = base_weights(replica)
    state = adapter(replica.modules.expected_shapes(), 8, 0.05)
    replica.push_version(state, CONFIG, 0, mode="merge")
    merged = base_weights(replica)
    seen: list[tuple[AdapterState, dict[str, torch.Tensor]]] = []
    set_state = replica.modules.set_training_state

    def spy(start: AdapterState) -> None:
        seen.append((start, base_weights(replica)))
        set_state(start)

    monkeypatch.setattr(replica.modules, "set_training_state", spy)
    replica.train(2, 1e-3, 60.0, 1, exclusive=True)
    start, during = seen[0]
    assert all(np.array_equal(start[k], state[k]) for k in state)  # from the merged version
    for prefix in plain:
        torch.testing.assert_close(during[prefix], plain[prefix], atol=1e-5, rtol=0)
        torch.testing.assert_close(base_weights(replica)[prefix], merged[prefix], atol=1e-5, rtol=0)
    assert replica.slots.merged_version == 0


@pytest.fixture()
def merged_v0(make_replica) -> tuple[Replica, dict[str, torch.Tensor]]:
    """A replica serving version 0 merged into its base, and those merged base weights."""
    replica = make_replica()
    replica.push_version(
        adapter(replica.modules.expected_shapes(), 1, 0.01), CONFIG, 0, mode="merge"
    )
    return replica, base_weights(replica)


def test_a_merge_the_canary_rejects_is_neither_served_nor_stored(merged_v0) -> None:
    replica, served = merged_v0
    shapes = replica.modules.expected_shapes()
    overflowing = {k: np.full(s, 1e20, dtype=np.float32) for k, s in shapes.items()}  # finite
    with pytest.raises(AdapterValidationError, match="not finite"):
        replica.push_version(overflowing, CONFIG, 1, mode="merge")
    assert (replica.served_version, replica.stored_versions()) == (0, [0])
    assert_base_weights(replica, served)


def test_a_canary_that_fails_in_any_way_puts_the_served_weights_back(
    merged_v0, monkeypatch
) -> None:
    replica, served = merged_v0
    shapes = replica.modules.expected_shapes()

    def out_of_memory() -> None:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(replica.merged, "_check_canary", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        replica.push_version(adapter(shapes, 2, 0.01), CONFIG, 1, mode="merge")
    assert (replica.slots.merged_version, replica.stored_versions()) == (0, [0])
    assert_base_weights(replica, served)


def test_a_reload_that_fails_after_leaving_a_merged_version_serves_it_again(
    merged_v0, monkeypatch
) -> None:
    replica, served = merged_v0
    shapes = replica.modules.expected_shapes()

    def no_slot(*_: object, **__: object) -> None:
        raise NoFreeSlotError("every slot pinned")

    monkeypatch.setattr(replica, "_load_and_promote", no_slot)
    with pytest.raises(NoFreeSlotError):
        replica.push_version(adapter(shapes, 2, 0.01), CONFIG, 1, mode="reload")
    assert (replica.slots.merged_version, replica.served_version) == (0, 0)
    assert_base_weights(replica, served)


def test_a_failed_rollback_from_a_merged_version_keeps_serving_it(
    make_replica, monkeypatch
) -> None:
    replica = make_replica()
    shapes = replica.modules.expected_shapes()
    replica.push_version(adapter(shapes, 1, 0.01), CONFIG, 1)
    replica.push_version(adapter(shapes, 2, 0.01), CONFIG, 2, mode="merge")
    assert (replica.served_version, replica.slots.merged_version) == (2, 2)
    served = base_weights(replica)

    def no_slot(*_: object, **__: object) -> None:
        raise NoFreeSlotError("every slot pinned")

    monkeypatch.setattr(replica.slots, "load_shadow", no_slot)
    with pytest.raises(NoFreeSlotError):
        replica.rollback(1)
    assert (replica.served_version, replica.slots.merged_version) == (2, 2)
    assert_base_weights(replica, served)
    handle = generate(replica, "To be, or not to be", "after")
    assert (handle.slot, handle.version) == (NO_SLOT, 2)


def test_control_api_passes_mode_and_exclusive_through(
    start_replica, tiny_fresh: LoadedModel
) -> None:
    replica = start_replica()
    state = adapter(inject_multi_lora(tiny_fresh.model, SPEC).expected_shapes(), 9, 0.05)
    with ReplicaClient(replica.control_address, replica.token, timeout=TIMEOUT) as c:
        r = httpx.put(
            f"http://{replica.control_address}/control/adapters/0",
            params={"mode": "sideways"},
            content=b"",
            headers={"Authorization": f"Bearer {replica.token}"},
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "mode"
        c.push_version(state, CONFIG, 0, mode="merge")
        status = c.status()
        assert status["served_version"] == 0
        assert all(s["role"] != "current" for s in status["slots"])  # served merged, no slot
        body = {"model": "tiny", "prompt": "ROMEO:", "max_tokens": 4, "temperature": 0}
        reply = httpx.post(replica.url + "/v1/completions", json=body, timeout=TIMEOUT).json()
        assert reply["adapter_version"] == 0
        trained, metrics = c.train(
            1, steps=2, learning_rate=1e-3, deadline_s=60, base_version=0, exclusive=True
        )
        assert metrics["local-steps"] == 2 and metrics["yields"] == 0
        with pytest.raises(ReplicaUnavailable, match="exclusive"):
            c.train(2, steps=1, learning_rate=1e-3, deadline_s=60, base_version=0)
        c.push_version(trained, CONFIG, 1, mode="reload")
        status = c.status()
        assert status["served_version"] == 1
        assert any(s["role"] == "current" for s in status["slots"])


def test_a_reload_waits_for_a_free_slot_with_serving_running(make_replica) -> None:
    # Two slots: v2 serves, v1's is pinned by a request in flight. Only serving can unpin it, so
    # the reload must not pause serving before it has its slot (it used to, and then timed out).
    replica = make_replica(num_slots=2)
    shapes = replica.modules.expected_shapes()
    replica.push_version(adapter(shapes, seed=1), CONFIG, 1)
    old_slot, version = replica.slots.acquire()  # what admitting a request does
    assert version == 1
    replica.push_version(adapter(shapes, seed=2), CONFIG, 2, mode="reload")
    waiting = threading.Event()
    reserve = replica.slots.reserve_free_slot

    def spy(*args: object, **kwargs: object) -> int:
        waiting.set()
        return reserve(*args, **kwargs)  # type: ignore[arg-type]

    replica.slots.reserve_free_slot = spy  # type: ignore[method-assign]
    errors: list[BaseException] = []

    def push() -> None:
        try:
            replica.push_version(adapter(shapes, seed=3), CONFIG, 3, mode="reload")
        except BaseException as e:
            errors.append(e)

    pusher = threading.Thread(target=push)
    pusher.start()
    assert waiting.wait(TIMEOUT)
    handle = generate(replica, "ROMEO:", "served-while-the-reload-waits")
    assert handle.version == 2 and pusher.is_alive()  # served; the reload still waits
    replica.slots.release(old_slot)  # the request in flight ends
    pusher.join(TIMEOUT)
    assert not errors and replica.served_version == 3
