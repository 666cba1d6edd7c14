import tomllib
from pathlib import Path

import pytest

from collm_fl.config import RunConfig
from collm_fl.errors import ConfigError

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def app_config() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_app_config_is_a_valid_run_config():
    cfg = RunConfig.from_flower(app_config())
    assert cfg.model == "smollm2-135m"
    assert cfg.lora.target_modules == ("q_proj", "v_proj")


def test_every_run_config_field_is_in_pyproject():
    flat = RunConfig().to_flat()
    assert set(flat) == set(app_config())


def test_flat_config_round_trips():
    cfg = RunConfig(model="tiny", num_server_rounds=7, lora=RunConfig().lora.replace(rank=4))
    assert RunConfig.from_flower(cfg.to_flat()) == cfg


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="unknown key 'num-rounds'"):
        RunConfig.from_flower({"num-rounds": 3})


def test_bad_values_are_all_named_at_once():
    with pytest.raises(ConfigError) as err:
        RunConfig.from_flower({"local-steps": 0, "aggregation": "median", "seq-len": 4})
    msg = str(err.value)
    assert "local-steps=0" in msg and "aggregation='median'" in msg and "seq-len=4" in msg


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="batch-size='eight': expected int"):
        RunConfig.from_flower({"batch-size": "eight"})


def test_bad_data_field_is_named():
    with pytest.raises(ConfigError, match="partitioning"):
        RunConfig.from_flower({"partitioning": "by-act"})


def test_bad_lora_rank_is_named():
    with pytest.raises(ConfigError, match="lora-rank"):
        RunConfig.from_flower({"lora-rank": 0})


@pytest.mark.parametrize("rank", [8.7, True, "eight"])
def test_a_lora_rank_that_is_not_a_whole_number_is_refused(rank):
    with pytest.raises(ConfigError, match=r"lora-rank=.*: expected a whole number"):
        RunConfig.from_flower({"lora-rank": rank})


def test_a_bad_lora_value_is_named_beside_the_configs_other_problems():
    with pytest.raises(ConfigError) as info:
        RunConfig.from_flower({"lora-rank": 0, "learning-rate": "x", "lora-alpha": "big"})
    message = str(info.value)
    assert "learning-rate='x'" in message and "lora-alpha='big': expected a number" in message
    with pytest.raises(ConfigError, match="lora-rank must be >= 1, got 0"):
        RunConfig.from_flower({"lora-rank": 0, "learning-rate": 0.01})


@pytest.mark.parametrize(
    "key", ["quality-gate-margin", "learning-rate", "round-timeout", "publish-timeout"]
)
def test_a_nan_or_infinite_setting_is_refused_by_name(key):
    for value in (float("nan"), float("inf")):
        with pytest.raises(ConfigError, match=f"{key}=.*finite"):
            RunConfig.from_flower({key: value})


def test_publish_timeout_is_read_from_flower_and_checked():
    assert RunConfig.from_flower({"publish-timeout": 10}).publish_timeout == 10.0
    with pytest.raises(ConfigError, match=r"publish-timeout=0.0: must be > 0"):
        RunConfig.from_flower({"publish-timeout": 0})


def test_min_training_share_is_read_from_flower_and_checked():
    assert RunConfig.from_flower({"min-training-share": 0.45}).min_training_share == 0.45
    with pytest.raises(ConfigError, match=r"min-training-share=1.5: must be in \[0, 1\]"):
        RunConfig.from_flower({"min-training-share": 1.5})


def test_bad_robust_aggregation_values_are_all_named_at_once():
    with pytest.raises(ConfigError) as err:
        RunConfig.from_flower(
            {"robust-aggregation": "mean", "trim-fraction": 0.5, "max-weight-ratio": 0.5}
        )
    msg = str(err.value)
    assert "robust-aggregation='mean'" in msg
    assert "trim-fraction=0.5: must be in [0, 0.5)" in msg
    assert "max-weight-ratio=0.5: must be 0 (no cap) or >= 1" in msg


def test_robust_aggregation_keys_are_read_from_flower():
    cfg = RunConfig.from_flower(
        {"robust-aggregation": "trimmed-mean", "trim-fraction": 0.3, "max-weight-ratio": 4}
    )
    assert (cfg.robust_aggregation, cfg.trim_fraction, cfg.max_weight_ratio) == (
        "trimmed-mean",
        0.3,
        4.0,
    )


def test_device_key_is_read_from_the_run_config_and_defaults_to_cpu():
    assert RunConfig().device == "cpu"
    assert RunConfig.from_flower({"device": "cuda:1"}).device == "cuda:1"


@pytest.mark.parametrize("device", ["gpu", "cuda:", "CUDA", ""])
def test_a_malformed_device_is_a_config_error_naming_the_key(device):
    with pytest.raises(ConfigError, match="device="):
        RunConfig(device=device)


def test_dp_delta_is_read_from_flower_and_must_be_a_probability():
    assert RunConfig().dp_delta == 1e-5
    assert RunConfig.from_flower({"dp-delta": 1e-6}).dp_delta == 1e-6
    for bad in (0.0, 1.0, -1e-5):
        with pytest.raises(ConfigError, match=r"dp-delta=.*must be in \(0, 1\)"):
            RunConfig.from_flower({"dp-delta": bad})


def test_server_lr_is_read_from_flower_and_bounded():
    assert RunConfig().server_lr == 1.0  # plain FedAvg unless asked
    assert RunConfig.from_flower({"server-lr": 3}).server_lr == 3.0
    for bad in (0.0, -1.0, 17.0):
        with pytest.raises(ConfigError, match=r"server-lr=.*must be in \(0, 16\]"):
            RunConfig(server_lr=bad)


def test_no_central_held_out_part_is_refused():
    with pytest.raises(ConfigError, match="central-heldout=0"):
        RunConfig.from_flower({"central-heldout": 0})


def test_user_data_too_small_to_hold_anything_out_is_a_config_error(tmp_path):
    from collm_fl.central_eval import CentralEvaluator

    (tmp_path / "a.jsonl").write_text('{"instruction": "hi", "output": "hello"}\n')
    cfg = RunConfig(model="tiny", data=str(tmp_path), partitioning="iid")
    with pytest.raises(ConfigError, match="central held-out set is empty"):
        CentralEvaluator(cfg)


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ({"aggregation": "exact"}, "aggregation"),
        ({"aggregation": "fedavg", "robust-aggregation": "median"}, "robust-aggregation"),
        ({"aggregation": "fedavg", "server-lr": 3.0}, "server-lr"),
    ],
)
def test_dp_refuses_an_aggregate_its_noise_is_not_calibrated_for(setting, key):
    with pytest.raises(ConfigError, match=rf"{key}=.*dp-noise-multiplier > 0"):
        RunConfig.from_flower({"dp-noise-multiplier": 0.5, **setting})
    RunConfig.from_flower(setting)  # fine without DP
    RunConfig.from_flower({"dp-noise-multiplier": 0.5, "aggregation": "fedavg"})


def test_a_round_deadline_at_or_beyond_the_round_timeout_is_refused():
    with pytest.raises(ConfigError, match=r"round-deadline-s=60.*below round-timeout \(60\)"):
        RunConfig.from_flower({"round-timeout": 60.0, "round-deadline-s": 60.0})
    assert RunConfig.from_flower({"round-timeout": 60.0, "round-deadline-s": 50.0})


def test_a_run_config_string_is_read_as_flower_reads_it_and_stray_words_are_refused():
    app = Path(__file__).parents[2]
    cfg = RunConfig.from_app(app, "num-server-rounds=2 data='my data/x.jsonl' lora-rank=4")
    assert (cfg.num_server_rounds, cfg.data, cfg.lora.rank) == (2, "my data/x.jsonl", 4)
    assert RunConfig.from_app(app).num_server_rounds == 3  # pyproject.toml's value
    with pytest.raises(ConfigError, match="not key=value: 'rounds 5'"):
        RunConfig.from_app(app, "local-steps=2 rounds 5")  # Flower would drop it without a word
    with pytest.raises(ConfigError, match="invalid format"):
        RunConfig.from_app(app, 'data="unterminated')


def test_data_settings_are_refused_by_their_run_config_names():
    with pytest.raises(ConfigError, match=r"invalid run config: .*dirichlet-alpha must be > 0"):
        RunConfig.from_flower({"dirichlet-alpha": 0.0})
    with pytest.raises(ConfigError, match=r"max-samples-per-client must be >= 0 \(0 = all\)"):
        RunConfig.from_flower({"max-samples-per-client": -1})


@pytest.mark.parametrize("value", ["nan", "inf", -1.0])
def test_a_lora_alpha_that_is_not_a_finite_positive_number_is_refused(value):
    with pytest.raises(ConfigError, match="lora-alpha must be a finite number > 0"):
        RunConfig.from_flower({"lora-alpha": value})


def test_a_seed_beyond_what_the_random_generators_take_is_refused():
    with pytest.raises(ConfigError, match=r"seed=1000000000000000: must be in \[0, 2\*\*32\)"):
        RunConfig.from_flower({"seed": 10**15})


@pytest.mark.parametrize(
    "key,value",
    [
        ("local-steps", -1),
        ("learning-rate", float("nan")),
        ("learning-rate", float("inf")),
        ("learning-rate", -0.1),
        ("batch-size", 0),
    ],
)
def test_a_train_message_budget_out_of_range_is_a_config_error_naming_its_key(key, value):
    from collm_fl.config import TrainBudget

    with pytest.raises(ConfigError, match=f"'{key}' must be"):
        TrainBudget.from_config(RunConfig(), {key: value})
    assert TrainBudget.from_config(RunConfig(), {"local-steps": 0}).local_steps == 0


def test_allocation_settings_under_static_allocation_are_named_as_ignored():
    assert RunConfig(allocation="static").ignored_settings() == []
    assert RunConfig(train_in_turns=True).ignored_settings() == []  # quality-aware: used
    ignored = RunConfig(allocation="static", train_in_turns=True, min_training_share=0.4)
    assert ignored.ignored_settings() == ["train-in-turns=True", "min-training-share=0.4"]
