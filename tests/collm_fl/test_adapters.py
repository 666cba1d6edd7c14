"""LoRA specs read back from adapter_config.json."""

import pytest

from collm_fl.adapters import LoraSpec
from collm_fl.errors import AdapterValidationError


def test_plain_lora_configs_are_read_back_as_peft_writes_them():
    plain = LoraSpec().to_peft_config_dict("tiny")
    assert LoraSpec.from_peft_config_dict(plain) == LoraSpec()
    peft_saved = {**plain, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None}
    assert LoraSpec.from_peft_config_dict({**peft_saved, "lora_bias": False}) == LoraSpec()
    # every key PEFT 0.21 writes for a plain LoRA, at its value
    from peft import LoraConfig

    saved = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]).to_dict()
    saved = {**saved, "peft_type": "LORA", "target_modules": sorted(saved["target_modules"])}
    assert LoraSpec.from_peft_config_dict(saved) == LoraSpec()


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
        # newer PEFT options, and any a later one adds: refused unless left unused
        ("alora_invocation_tokens", [1]),
        ("use_qalora", True),
        ("layer_replication", [[0, 1]]),
        ("target_parameters", ["mlp.experts.down_proj"]),
        ("some_future_option", "on"),
        ("init_lora_weights", "pissa"),
    ],
)
def test_lora_options_that_change_the_adapters_math_are_refused(key, value):
    # Served as plain LoRA (alpha / r, no bias, every layer alike) such an adapter's logits
    # would not be PEFT's, and its stored copy would load in PEFT as another model.
    config = {**LoraSpec().to_peft_config_dict("tiny"), key: value}
    with pytest.raises(AdapterValidationError, match=key):
        LoraSpec.from_peft_config_dict(config)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("r", 8.5),
        ("r", "8"),
        ("r", True),
        ("r", None),
        ("lora_alpha", "16"),
        ("lora_dropout", None),
    ],
)
def test_shape_fields_of_another_type_are_refused_not_coerced(key, value):
    # Read with int() / float(), "r": 8.5 served as rank 8 and was stored as 8.5: a stored
    # version PEFT could not load.
    config = {**LoraSpec().to_peft_config_dict("tiny"), key: value}
    if value is None and key == "r":
        del config[key]
    with pytest.raises(AdapterValidationError, match=f"{key} must be"):
        LoraSpec.from_peft_config_dict(config)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_a_pushed_config_holding_a_non_json_number_is_a_malformed_payload(constant):
    # Python's json reads NaN; the store writes strict JSON, so the push failed later, as a 500.
    import numpy as np

    from collm_fl.replica.wire import decode_adapter, encode_adapter

    blob = encode_adapter({"x.lora_A.weight": np.zeros((1, 1))}, {"r": 12345678901})
    assert b"12345678901" in blob  # (a number as long as any constant, swapped in its place)
    tampered = blob.replace(b"12345678901", constant.encode().ljust(11))
    with pytest.raises(AdapterValidationError, match=f"holds {constant}"):
        decode_adapter(tampered)
