import numpy as np
import pytest
import torch

from collm_fl.data import TextSample
from collm_fl.data.tokenize import iterate_batches, tokenize_samples
from collm_fl.errors import AdapterValidationError
from collm_fl.training import (
    attach_lora,
    evaluate_loss,
    get_adapter_state,
    set_adapter_state,
    train_lora,
)

TEXT = "ROMEO: But soft, what light through yonder window breaks? " * 20


def test_fresh_adapter_is_a_no_op(tiny_fresh, lora_spec):
    ids = tiny_fresh.tokenizer(TEXT, return_tensors="pt").input_ids[:, :32]
    base = tiny_fresh.model(ids).logits
    model = attach_lora(tiny_fresh.model, lora_spec)
    assert torch.allclose(model(ids).logits, base)
    state = get_adapter_state(model)
    assert all(np.all(v == 0) for k, v in state.items() if k.endswith("lora_B.weight"))


def test_adapter_state_round_trips(tiny_fresh, lora_spec):
    model = attach_lora(tiny_fresh.model, lora_spec)
    rng = np.random.default_rng(0)
    state = {
        k: rng.standard_normal(v.shape).astype(np.float32)
        for k, v in get_adapter_state(model).items()
    }
    set_adapter_state(model, state)
    back = get_adapter_state(model)
    assert state.keys() == back.keys()
    for k in state:
        np.testing.assert_array_equal(state[k], back[k])


def test_set_adapter_state_rejects_missing_and_foreign_keys(tiny_fresh, lora_spec):
    model = attach_lora(tiny_fresh.model, lora_spec)
    state = get_adapter_state(model)
    first = sorted(state)[0].rsplit(".lora_", 1)[0]
    del state[first + ".lora_A.weight"], state[first + ".lora_B.weight"]
    with pytest.raises(AdapterValidationError, match="missing key"):
        set_adapter_state(model, state)


def test_set_adapter_state_names_a_wrong_rank_and_non_finite_values(tiny_fresh, lora_spec):
    model = attach_lora(tiny_fresh.model, lora_spec)
    good = get_adapter_state(model)
    a_key = sorted(k for k in good if ".lora_A." in k)[0]
    b_key = a_key.replace(".lora_A.", ".lora_B.")
    bad = dict(good)
    bad[a_key] = np.zeros((lora_spec.rank * 2, good[a_key].shape[1]), np.float32)
    bad[b_key] = np.zeros((good[b_key].shape[0], lora_spec.rank * 2), np.float32)
    with pytest.raises(AdapterValidationError, match=r"shape \(8, .*expected \(4, "):
        set_adapter_state(model, bad)
    bad = dict(good)
    bad[a_key] = np.full_like(good[a_key], np.nan)
    bad[b_key] = np.asarray(good[b_key], np.float64) * 0 + 1e39  # overflows float32: inf
    with pytest.raises(AdapterValidationError) as e:
        set_adapter_state(model, bad)
    assert "non-finite" in str(e.value) and b_key in str(e.value) and a_key in str(e.value)
    after = get_adapter_state(model)
    assert all(np.array_equal(after[k], good[k]) for k in good)  # left as it was


def test_training_lowers_the_loss_on_its_data(tiny_fresh, lora_spec):
    tok = tiny_fresh.tokenizer
    blocks = tokenize_samples([TextSample(TEXT)], tok, seq_len=32)
    model = attach_lora(tiny_fresh.model, lora_spec.replace(alpha=32.0))
    before = evaluate_loss(model, blocks).loss
    result = train_lora(model, iterate_batches(blocks, 4, seed=0), steps=30, learning_rate=1e-2)
    after = evaluate_loss(model, blocks).loss
    assert result.steps == 30 and result.tokens > 0
    assert after < before - 0.5
    # Only LoRA weights changed: the base stays frozen.
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())


def test_evaluate_loss_matches_a_manual_cross_entropy(tiny, lora_spec):
    blocks = tokenize_samples([TextSample(TEXT)], tiny.tokenizer, seq_len=16)
    got = evaluate_loss(tiny.model, blocks, batch_size=3)
    with torch.no_grad():
        logits = tiny.model(input_ids=blocks.input_ids, attention_mask=blocks.attention_mask).logits
    lp = torch.log_softmax(logits[:, :-1].double(), -1).numpy()
    labels = blocks.labels[:, 1:].numpy()
    mask = labels != -100
    picked = np.take_along_axis(lp, np.where(mask, labels, 0)[..., None], -1)[..., 0]
    expected = -(picked * mask).sum() / mask.sum()
    assert got.loss == pytest.approx(expected, rel=1e-5)
    assert got.perplexity == pytest.approx(np.exp(expected), rel=1e-4)


def test_no_step_starts_after_the_deadline(tiny_fresh, lora_spec):
    blocks = tokenize_samples([TextSample(TEXT)], tiny_fresh.tokenizer, seq_len=32)
    model = attach_lora(tiny_fresh.model, lora_spec)
    before = get_adapter_state(model)
    batches = iterate_batches(blocks, 4, seed=0)
    passed = train_lora(model, batches, steps=5, learning_rate=1e-2, deadline_s=0.0)
    assert (passed.steps, passed.tokens) == (0, 0)
    assert all(np.array_equal(v, before[k]) for k, v in get_adapter_state(model).items())
    ample = train_lora(model, batches, steps=3, learning_rate=1e-2, deadline_s=3600.0)
    assert ample.steps == 3 and ample.tokens > 0


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_an_infinite_gradient_fails_the_step_before_the_weights_change(
    tiny_fresh, lora_spec, max_grad_norm
):
    """Clipping by an infinite norm turns every gradient into NaN and AdamW every weight: a
    device sent that adapter as a trained one. The step fails before the optimizer instead."""
    blocks = tokenize_samples([TextSample(TEXT)], tiny_fresh.tokenizer, seq_len=32)
    model = attach_lora(tiny_fresh.model, lora_spec)
    before = get_adapter_state(model)
    name, param = next((n, p) for n, p in model.named_parameters() if "lora_B" in n)
    param.register_hook(lambda g: torch.full_like(g, float("inf")))
    batches = iterate_batches(blocks, 4, seed=0)
    with pytest.raises(FloatingPointError, match="non-finite gradient norm at step 0"):
        train_lora(model, batches, steps=2, learning_rate=1e-2, max_grad_norm=max_grad_norm)
    after = get_adapter_state(model)
    assert all(np.array_equal(v, before[k]) for k, v in after.items()), name


def test_the_runs_first_adapter_is_the_same_for_the_same_seed():
    from collm_fl.central_eval import CentralEvaluator
    from collm_fl.config import RunConfig

    def v0(seed: int):
        cfg = RunConfig(model="tiny", seed=seed, central_eval_samples=2, seq_len=32)
        return get_adapter_state(CentralEvaluator(cfg).model)

    torch.manual_seed(1)
    a = v0(0)
    torch.manual_seed(2)  # whatever the process did before
    b, c = v0(0), v0(1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)


def test_lora_targets_the_model_lacks_and_a_seq_len_past_its_context_are_config_errors(
    tiny_fresh,
):
    from collm_fl.adapters import LoraSpec
    from collm_fl.errors import ConfigError
    from collm_fl.models import check_seq_len

    with pytest.raises(ConfigError, match=r"lora-targets 'c_attn'.*q_proj"):
        attach_lora(tiny_fresh.model, LoraSpec(target_modules=("c_attn",)))
    context = tiny_fresh.model.config.max_position_embeddings
    check_seq_len(tiny_fresh.model, context)
    with pytest.raises(ConfigError, match=f"seq-len {context + 1} .* at most {context}"):
        check_seq_len(tiny_fresh.model, context + 1)
