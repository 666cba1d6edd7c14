"""The continuous-batching engine: batched greedy equals solo greedy, versions pinned at admission,
stop strings, seeds, back-pressure, cancellation, async reading and failure isolation."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from collm_fl.adapters import AdapterState, LoraSpec
from collm_fl.errors import ConfigError
from collm_fl.models import LoadedModel
from collm_fl.replica.engine import LEND_SHARE_LIMIT, InferenceEngine
from collm_fl.replica.lora_layers import MultiLoraModules, inject_multi_lora, lora_context, serve
from collm_fl.replica.requests import (
    EngineStoppedError,
    GenerationRequest,
    InvalidPromptError,
    PromptTooLongError,
    QueueFullError,
    RequestHandle,
    TokenEvent,
)
from collm_fl.replica.sampling import SamplingParams
from collm_fl.replica.slots import AdapterSlots

SPEC = LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
TIMEOUT = 60.0
GREEDY = SamplingParams(max_tokens=24, temperature=0.0)


@dataclass
class Rig:
    model: LlamaForCausalLM
    tokenizer: PreTrainedTokenizerBase
    modules: MultiLoraModules
    slots: AdapterSlots
    engine: InferenceEngine

    def prompt(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def load(self, version: int, seed: int) -> int:
        rng = np.random.default_rng(seed)
        shapes = self.modules.expected_shapes()
        state: AdapterState = {
            k: (rng.standard_normal(s) * 0.3).astype(np.float32) for k, s in shapes.items()
        }
        self.slots.load_shadow(state, version, SPEC).promote()
        return self.slots.current_slot

    def submit(self, prompt: list[int], params: SamplingParams = GREEDY) -> RequestHandle:
        return self.engine.submit(GenerationRequest(prompt, params, request_id=f"r{time.time()}"))


@pytest.fixture()
def rig(tiny: LoadedModel) -> Iterator[Rig]:
    # Untied and randomly initialized: its greedy tokens depend on the whole context (the tiny
    # built-in model, with tied embeddings, mostly repeats its last token).
    tok = tiny.tokenizer
    config = LlamaConfig(
        vocab_size=tiny.model.config.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
    modules = inject_multi_lora(model, SPEC, num_slots=3)
    slots = AdapterSlots(modules)
    engine = InferenceEngine(model, tok, modules, slots, max_batch_size=4, max_queue=8)
    engine.start()
    yield Rig(model, tok, modules, slots, engine)
    engine.stop()


def solo_greedy(rig: Rig, prompt: list[int], slot: int, max_tokens: int) -> list[int]:
    """Reference: full forward over the whole sequence each step, no cache, batch of one."""
    ids, out = list(prompt), []
    for _ in range(max_tokens):
        with torch.inference_mode(), lora_context(serve([slot])):
            logits = rig.model(input_ids=torch.tensor([ids])).logits[0, -1]  # (V,)
        token = int(logits.argmax())
        out.append(token)
        ids.append(token)
        if token in rig.engine.eos_ids:
            break
    return out


def read(handle: RequestHandle, n: int) -> None:
    """Block until ``handle`` has produced ``n`` events (or finished)."""
    for i, ev in enumerate(handle.events(timeout=TIMEOUT)):
        if i + 1 >= n or ev.finish_reason:
            return


def finish(handle: RequestHandle) -> str:
    deltas = [ev.text_delta for ev in handle.events(timeout=TIMEOUT)]
    assert "".join(deltas) == handle.text
    return handle.text


PROMPTS = ["To be, or not", "Friends, Romans, countrymen, lend me your ears; I come", "O Romeo"]


def test_batched_greedy_equals_solo_when_requests_join_at_different_times(rig: Rig) -> None:
    slot = rig.load(version=1, seed=1)
    prompts = [rig.prompt(p) for p in PROMPTS]
    lengths = [40, 30, 24]
    a = rig.submit(prompts[0], SamplingParams(max_tokens=lengths[0], temperature=0.0))
    read(a, 5)
    b = rig.submit(prompts[1], SamplingParams(max_tokens=lengths[1], temperature=0.0))
    read(b, 3)
    c = rig.submit(prompts[2], SamplingParams(max_tokens=lengths[2], temperature=0.0))
    handles = [a, b, c]
    for h in handles:
        finish(h)
    assert b.admitted_at is not None and a.finished_at is not None and b.admitted_at < a.finished_at
    assert c.admitted_at is not None and b.finished_at is not None and c.admitted_at < b.finished_at
    for h, p, n in zip(handles, prompts, lengths, strict=True):
        assert h.version == 1
        assert h.token_ids == solo_greedy(rig, p, slot, n)
        want = rig.tokenizer.decode(h.token_ids, skip_special_tokens=True)
        assert h.text == want
    assert len({tuple(h.token_ids) for h in handles}) == 3


def test_promotion_between_steps_keeps_admitted_requests_on_their_version(rig: Rig) -> None:
    slot1 = rig.load(version=1, seed=1)
    prompt = rig.prompt(PROMPTS[0])
    long = SamplingParams(max_tokens=120, temperature=0.0)
    before = rig.submit(prompt, long)
    read(before, 3)
    slot2 = rig.load(version=2, seed=2)
    promoted_at = time.monotonic()
    after = rig.submit(prompt, long)
    finish(before)
    finish(after)
    assert before.finished_at is not None and before.finished_at > promoted_at
    assert (before.version, after.version) == (1, 2)
    want_before = solo_greedy(rig, prompt, slot1, 120)
    want_after = solo_greedy(rig, prompt, slot2, 120)
    assert want_before != want_after
    assert before.token_ids == want_before
    assert after.token_ids == want_after
    assert all(s.refcount == 0 for s in rig.slots.snapshot())


def test_stop_string_ends_generation_and_is_not_sent(rig: Rig) -> None:
    prompt = rig.prompt(PROMPTS[1])
    full = finish(rig.submit(prompt, SamplingParams(max_tokens=30, temperature=0.0)))
    start = next(i for i in range(6, len(full) - 3) if "\ufffd" not in full[i : i + 3])
    stop = full[start : start + 3]
    cut = full.find(stop)
    h = rig.submit(prompt, SamplingParams(max_tokens=30, temperature=0.0, stop=("zzzz", stop)))
    assert finish(h) == full[:cut]
    assert h.finish_reason == "stop"
    assert h.num_generated < 30


def test_max_tokens_finishes_with_length(rig: Rig) -> None:
    h = rig.submit(rig.prompt(PROMPTS[0]), SamplingParams(max_tokens=5, temperature=0.0))
    finish(h)
    assert (h.finish_reason, h.num_generated) == ("length", 5)
    assert h.ttft is not None and h.tpot is not None and h.num_prompt_tokens > 0


def test_ignore_eos_generates_the_whole_max_tokens(rig: Rig) -> None:
    # (vLLM's ignore_eos: a trace's output lengths replayed as lengths, not as caps)
    prompt = rig.prompt(PROMPTS[0])
    plain = rig.submit(prompt, SamplingParams(max_tokens=5, temperature=0.0))
    finish(plain)
    ends = plain.token_ids[1]  # made an end-of-sequence token: greedy decoding meets it early
    eos = rig.engine.eos_ids
    try:
        rig.engine.eos_ids = frozenset({ends})
        stopped = rig.submit(prompt, SamplingParams(max_tokens=5, temperature=0.0))
        finish(stopped)
        kept = rig.submit(prompt, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
        finish(kept)
    finally:
        rig.engine.eos_ids = eos
    assert (stopped.finish_reason, stopped.num_generated) == (
        "stop",
        plain.token_ids.index(ends) + 1,
    )
    assert (kept.finish_reason, kept.token_ids) == ("length", plain.token_ids)


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(rig: Rig) -> None:
    rig.load(version=1, seed=1)
    prompt = rig.prompt(PROMPTS[2])
    params = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, seed=123)
    alone = rig.submit(prompt, params)
    finish(alone)
    noise = [
        rig.submit(rig.prompt(p), SamplingParams(max_tokens=20, temperature=1.0))
        for p in PROMPTS[:2]
    ]
    batched = rig.submit(prompt, params)
    other_seed = rig.submit(prompt, SamplingParams(max_tokens=20, temperature=0.9, seed=124))
    for h in [*noise, batched, other_seed]:
        finish(h)
    assert batched.token_ids == alone.token_ids
    assert other_seed.token_ids != alone.token_ids


def test_full_queue_bad_prompts_and_stopped_engine_are_refused(rig: Rig) -> None:
    prompt = rig.prompt(PROMPTS[0])
    with rig.engine.busy_changed:  # holds the engine thread off the queue while we fill it
        queued = [rig.submit(prompt) for _ in range(rig.engine.max_queue)]
        assert rig.engine.stats().queue_depth == rig.engine.max_queue
        with pytest.raises(QueueFullError):
            rig.submit(prompt)
    for h in queued:
        assert h.wait(TIMEOUT) and h.finish_reason in ("length", "stop")
    with pytest.raises(PromptTooLongError):
        rig.submit([5] * 250, SamplingParams(max_tokens=7))
    with pytest.raises(InvalidPromptError):
        rig.submit([5, rig.model.config.vocab_size])
    with pytest.raises(InvalidPromptError):
        rig.submit([])
    rig.engine.stop()
    with pytest.raises(EngineStoppedError):
        rig.submit(prompt)


def test_requests_whose_clients_left_do_not_fill_the_queue(rig: Rig) -> None:
    prompt = rig.prompt(PROMPTS[0])
    finished_before = rig.engine.stats().requests_finished
    with rig.engine.busy_changed:  # holds the engine thread off the queue: no step purges it
        left = [rig.submit(prompt) for _ in range(rig.engine.max_queue)]
        for h in left:
            h.cancel()
        assert rig.engine.stats().queue_depth == 0
        live = rig.submit(prompt)
        assert rig.engine.stats().queue_depth == 1
    assert all(h.finished and h.finish_reason == "cancelled" for h in left)
    assert live.wait(TIMEOUT) and live.finish_reason in ("length", "stop")
    assert rig.engine.stats().requests_finished == finished_before + len(left) + 1


def test_cancel_drops_the_row_and_releases_its_slot(rig: Rig) -> None:
    rig.load(version=1, seed=1)
    prompt = rig.prompt(PROMPTS[0])
    running = rig.submit(prompt, SamplingParams(max_tokens=200, temperature=0.0))
    read(running, 2)
    running.cancel()
    with rig.engine.busy_changed:
        waiting = rig.submit(prompt)
        waiting.cancel()
    assert running.wait(TIMEOUT) and waiting.wait(TIMEOUT)
    assert running.finish_reason == waiting.finish_reason == "cancelled"
    assert running.num_generated < 200 and waiting.num_generated == 0
    assert rig.engine.wait_for_idle(TIMEOUT)
    assert all(s.refcount == 0 for s in rig.slots.snapshot())


def test_a_cancel_landing_while_cancelled_rows_finish_still_finishes_its_row(rig: Rig) -> None:
    rig.load(version=1, seed=1)
    long = SamplingParams(max_tokens=200, temperature=0.0)
    first, second = (
        rig.submit(rig.prompt(PROMPTS[0]), long),
        rig.submit(rig.prompt(PROMPTS[1]), long),
    )
    read(first, 2)
    read(second, 2)
    push = first._push

    def push_then_cancel_second(event: TokenEvent, error: str | None = None) -> None:
        push(event, error)
        second.cancel()  # another thread's cancel, landing mid-step (here: deterministically)

    first._push = push_then_cancel_second  # type: ignore[method-assign]
    first.cancel()
    assert first.wait(TIMEOUT) and second.wait(TIMEOUT)
    assert first.finish_reason == second.finish_reason == "cancelled"
    assert rig.engine.wait_for_idle(TIMEOUT)
    assert all(s.refcount == 0 for s in rig.slots.snapshot())


def test_async_iteration_inside_asyncio_run(rig: Rig) -> None:
    slot = rig.load(version=1, seed=1)
    prompts = [rig.prompt(p) for p in PROMPTS[:2]]

    async def consume(prompt: list[int]) -> tuple[list[int], str | None]:
        handle = rig.submit(prompt)
        tokens, reason = [], None
        async for ev in handle.aiter():
            if ev.token_id is not None:
                tokens.append(ev.token_id)
            reason = ev.finish_reason
        return tokens, reason

    async def main() -> list[tuple[list[int], str | None]]:
        return await asyncio.wait_for(asyncio.gather(*(consume(p) for p in prompts)), TIMEOUT)

    results = asyncio.run(main())
    for (tokens, reason), prompt in zip(results, prompts, strict=True):
        assert tokens == solo_greedy(rig, prompt, slot, GREEDY.max_tokens)
        assert reason in ("length", "stop")


def test_failed_forward_fails_its_requests_and_the_engine_goes_on(rig: Rig) -> None:
    calls = {"n": 0}

    def explode_once(module: torch.nn.Module, args: object) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated kernel failure")

    hook = rig.model.model.register_forward_pre_hook(explode_once)
    try:
        failed = rig.submit(rig.prompt(PROMPTS[0]))
        assert failed.wait(TIMEOUT) and failed.finish_reason == "error"
        assert failed.error is not None and "simulated" in failed.error
        ok = rig.submit(rig.prompt(PROMPTS[0]))
        finish(ok)
        assert ok.finish_reason in ("length", "stop") and ok.num_generated > 0
    finally:
        hook.remove()
    assert rig.engine.wait_for_idle(TIMEOUT)
    stats = rig.engine.stats()
    assert stats.requests_finished == 2 and stats.running == 0 and stats.queue_depth == 0
    assert stats.tokens_generated == ok.num_generated and stats.decode_step_s > 0
    assert rig.engine.is_idle()


@pytest.mark.parametrize(("stop", "want"), [((), "Hi é😀 ok STOP tail"), (("STOP",), "Hi é😀 ok ")])
def test_text_deltas_are_whole_utf8_and_never_hold_a_stop_string(
    rig: Rig, stop: tuple[str, ...], want: str
) -> None:
    script = rig.prompt("Hi é😀 ok STOP tail")
    step = {"n": 0}

    def force_next_token(module: torch.nn.Module, args: object, output: object) -> None:
        logits = output.logits  # type: ignore[attr-defined]  # (1, L, V)
        logits.fill_(-1e9)
        logits[..., script[min(step["n"], len(script) - 1)]] = 0.0
        step["n"] += 1

    hook = rig.model.register_forward_hook(force_next_token)
    try:
        h = rig.submit([5, 6], SamplingParams(max_tokens=len(script), temperature=0.0, stop=stop))
        deltas = [ev.text_delta for ev in h.events(timeout=TIMEOUT)]
    finally:
        hook.remove()
    assert "".join(deltas) == want
    assert all("\ufffd" not in d for d in deltas)
    assert not any("S" in d for d in deltas) or not stop  # no piece of the stop string went out


@pytest.mark.parametrize(("schedule", "first"), [("slo", "fresh"), ("fcfs", "late")])
def test_slo_schedule_admits_a_request_that_can_still_meet_its_ttft_before_a_late_one(
    rig: Rig, schedule: str, first: str
) -> None:
    rig.engine.stop()
    engine = InferenceEngine(
        rig.model,
        rig.tokenizer,
        rig.modules,
        rig.slots,
        max_batch_size=1,  # one at a time: the admission order is the order of service
        schedule=schedule,
        ttft_slo_s=1.0,
    )
    engine.start()
    try:
        prompt = rig.prompt(PROMPTS[0])
        params = SamplingParams(max_tokens=4, temperature=0.0)
        warm = engine.submit(GenerationRequest(prompt, params, request_id="warm"))
        assert warm.wait(TIMEOUT)  # a prefill has been timed: the "slo" order has a cost model
        with engine.busy_changed:  # holds the engine thread off the queue while both arrive
            late = engine.submit(GenerationRequest(prompt, params, request_id="late"))
            late.arrival -= 5.0  # it has waited 5 s: its 1-s TTFT SLO is lost
            fresh = engine.submit(GenerationRequest(prompt, params, request_id="fresh"))
        assert late.wait(TIMEOUT) and fresh.wait(TIMEOUT)  # both are answered
        assert late.finish_reason == fresh.finish_reason == "length"
        assert late.admitted_at is not None and fresh.admitted_at is not None
        order = "fresh" if fresh.admitted_at < late.admitted_at else "late"
        assert order == first
        assert engine.stats().admitted_late == 1  # the late one, in either order
    finally:
        engine.stop()


def test_unknown_schedule_and_bad_lend_share_are_refused(rig: Rig) -> None:
    with pytest.raises(ConfigError, match="schedule must be one of"):
        InferenceEngine(rig.model, rig.tokenizer, rig.modules, rig.slots, schedule="lifo")
    for share in (-0.1, LEND_SHARE_LIMIT + 0.01):
        with pytest.raises(ConfigError, match="max_lend_share"):
            InferenceEngine(rig.model, rig.tokenizer, rig.modules, rig.slots, max_lend_share=share)


def test_lending_time_to_training_rests_between_steps_and_changes_no_output(rig: Rig) -> None:
    slot = rig.load(version=1, seed=1)
    prompt = rig.prompt(PROMPTS[1])
    want = solo_greedy(rig, prompt, slot, 6)
    rig.engine.lend_to_training(0.5)  # by default serving lends nothing
    assert rig.engine._lent_share == 0.0
    rig.engine.max_lend_share = 0.25
    rig.engine.lend_to_training(0.5)  # more than serving may lend: capped
    assert rig.engine._lent_share == 0.25
    lent = rig.submit(prompt, SamplingParams(max_tokens=6, temperature=0.0))
    assert lent.wait(TIMEOUT) and lent.finish_reason == "length"
    assert lent.token_ids == want  # answered exactly as without the loan
    rig.engine.lend_to_training(0.0)
    # The engine thread runs steps and rests in turn: once a later request is answered, any rest
    # after the lent request's last step is over.
    after = rig.submit(prompt, SamplingParams(max_tokens=6, temperature=0.0))
    assert after.wait(TIMEOUT) and after.token_ids == want
    rested = rig.engine.stats().lent_s
    assert rested > 0  # it rested after the lent request's steps
    again = rig.submit(prompt, SamplingParams(max_tokens=6, temperature=0.0))
    assert again.wait(TIMEOUT) and again.token_ids == want
    assert rig.engine.stats().lent_s == rested  # no loan, no rest


def test_training_gets_the_core_only_when_serving_is_idle_paused_or_resting(rig: Rig) -> None:
    assert rig.engine.wait_for_training_turn(TIMEOUT)  # idle
    prompt = rig.prompt(PROMPTS[0])
    with rig.engine.busy_changed:  # the engine thread cannot take the request off the queue
        handle = rig.submit(prompt, SamplingParams(max_tokens=3, temperature=0.0))
        # Serving has work and lends nothing: a training step waits (here until the timeout).
        assert not rig.engine.wait_for_training_turn(0.05)
    assert handle.wait(TIMEOUT) and handle.finish_reason == "length"
    assert rig.engine.wait_for_training_turn(TIMEOUT)  # idle again
    rig.engine.pause()
    try:
        held = rig.submit(prompt, SamplingParams(max_tokens=3, temperature=0.0))
        assert rig.engine.wait_for_training_turn(TIMEOUT)  # paused: work waits, training runs
    finally:
        rig.engine.resume()
    assert held.wait(TIMEOUT)
