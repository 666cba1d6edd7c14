"""LoRA specs read back from adapter_config.json."""

import pytest

from collm_fl.adapters import LoraSpec
from collm_fl.errors import AdapterValidationError


def test_plain_lora_configs_are_read_back_as_peft_writes_them():
    plain = LoraSpec().to_peft_config_dict("tiny")
    assert LoraSpec.from_peft_config_dict(plain) == LoraSpec()
    peft_saved = {**plain, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None}
    assert LoraSpec.from_peft_config_dict({**peft_saved, "lora_bias": False}) == LoraSpec()


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("use_rslora", True),
        ("use_dora", True),
        ("bias", "all"),
        ("alpha_pattern", {"q_proj": 32}),
        ("rank_pattern", {"q_proj": 4}),
        ("modules_to_save", ["lm_head"]),
        ("layers_to_transform", [0]),
        ("lora_bias", True),
        ("fan_in_fan_out", True),
    ],
)
def test_lora_options_that_change_the_adapters_math_are_refused(key, value):
    # Served as plain LoRA (alpha / r, no bias, every layer alike) such an adapter's logits
    # would not be PEFT's, and its stored copy would load in PEFT as another model.
    config = {**LoraSpec().to_peft_config_dict("tiny"), key: value}
    with pytest.raises(AdapterValidationError, match=key):
        LoraSpec.from_peft_config_dict(config)
