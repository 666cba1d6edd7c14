"""A stored version is a PEFT directory: PeftModel.from_pretrained reproduces the logits exactly."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from collm_fl.adapters import LoraSpec
from collm_fl.store import VersionStore

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def test_saved_version_reloads_in_peft_to_identical_logits(store: VersionStore) -> None:
    base = _tiny_llama()
    fresh_base = copy.deepcopy(base)  # get_peft_model wraps `base` in place
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    pm = peft.get_peft_model(base, lora).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in pm.named_parameters():
            if "lora_" in name:  # lora_B starts at zero; make the adapter actually do something
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    state = {
        k: v.detach().numpy().copy()
        for k, v in peft.get_peft_model_state_dict(pm, save_embedding_layers=False).items()
    }

    ids = torch.tensor([[1, 5, 9, 33, 77, 120, 3, 64]])
    with torch.no_grad():
        base_logits = fresh_base(input_ids=ids).logits  # before PEFT wraps fresh_base in place

    run = store.open_run("peft", {}, "tiny")
    spec_cfg = LoraSpec(rank=4, alpha=8).to_peft_config_dict("tiny")
    info = store.save_version(run.id, 0, state, spec_cfg, {})
    reloaded = peft.PeftModel.from_pretrained(fresh_base, str(store.version_dir(info))).eval()
    with torch.no_grad():
        expected = pm(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
    assert not torch.allclose(expected, base_logits)  # the adapter really changes the output
    assert torch.equal(got, expected)
    reloaded_state = peft.get_peft_model_state_dict(reloaded, save_embedding_layers=False)
    assert sorted(reloaded_state) == sorted(state)
    for k, v in reloaded_state.items():
        np.testing.assert_array_equal(v.numpy(), state[k])
