"""The ClientApp's handlers, called as Flower calls them: what leaves a client, and its errors."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client_app.app import evaluate, train
from collm_fl.adapters import LORA_A_SUFFIX, LORA_B_SUFFIX, LoraSpec
from collm_fl.errors import ConfigError
from collm_fl.flower_records import arrayrecord_to_state, state_to_arrayrecord
from collm_fl.training import attach_lora, get_adapter_state

RUN_CONFIG = {"model": "tiny", "local-steps": 2, "batch-size": 2, "max-samples-per-client": 20}


@pytest.fixture(autouse=True)
def flower_task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 7)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


@pytest.fixture(scope="module")
def global_state():
    from collm_fl.models import load_base_model

    return get_adapter_state(attach_lora(load_base_model("tiny").model, LoraSpec()))


def train_message(state) -> Message:
    content = RecordDict(
        {
            "arrays": state_to_arrayrecord(state),
            "config": ConfigRecord({"server-round": 1, "local-steps": 2, "global-version": 0}),
        }
    )
    return Message(content, dst_node_id=7, message_type="train")


def context(node_config) -> Context:
    return Context(1, 7, node_config, RecordDict(), RUN_CONFIG)


def test_only_adapter_tensors_and_scalar_metrics_leave_a_device(global_state):
    reply = train(train_message(global_state), context({"partition-id": 0, "num-partitions": 3}))
    content = reply.content
    assert set(content.array_records) == {"arrays"}
    assert not content.config_records
    sent = arrayrecord_to_state(content.array_records["arrays"])
    # Exactly the LoRA factors, same keys and shapes as the global adapter: no base weights.
    assert sent.keys() == global_state.keys()
    assert all(k.endswith((LORA_A_SUFFIX, LORA_B_SUFFIX)) for k in sent)
    assert all(sent[k].shape == global_state[k].shape for k in sent)
    total = sum(v.size for v in sent.values())
    assert total < 0.1 * 557_696  # a small fraction of the tiny model's parameters
    # Metrics are scalars only (no text, no token ids).
    (metrics,) = content.metric_records.values()
    assert set(metrics) == {
        "num-examples",
        "train-loss",
        "train-tokens",
        "train-seconds",
        "total-seconds",
        "local-steps",
    }
    assert all(isinstance(v, float) for v in metrics.values())
    assert any(not np.array_equal(sent[k], global_state[k]) for k in sent)


def test_a_device_without_partition_config_gets_a_clear_error(global_state):
    with pytest.raises(ConfigError, match="partition-id"):
        train(train_message(global_state), context({}))


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("server-round", "2", "must be a number"),
        ("server-round", True, "must be a number"),
        ("local-steps", 2.5, "must be an integer"),
        ("learning-rate", [0.1, 0.2], "must be a number"),
    ],
)
def test_a_round_config_value_of_the_wrong_type_gets_a_clear_error(
    global_state, key, value, expected
):
    msg = train_message(global_state)
    msg.content.config_records["config"][key] = value
    with pytest.raises(ConfigError, match=f"config '{key}' {expected}"):
        train(msg, context({"partition-id": 0, "num-partitions": 3}))


def test_a_train_message_without_an_adapter_gets_a_clear_error():
    msg = Message(
        RecordDict({"config": ConfigRecord({"server-round": 1})}),
        dst_node_id=7,
        message_type="train",
    )
    with pytest.raises(ConfigError, match="no 'arrays' ArrayRecord"):
        train(msg, context({"partition-id": 0, "num-partitions": 3}))


def test_a_replica_node_without_a_token_gets_a_clear_error(global_state, monkeypatch):
    monkeypatch.delenv("COLLM_CONTROL_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="COLLM_CONTROL_TOKEN"):
        train(train_message(global_state), context({"replica-address": "127.0.0.1:1"}))


def test_evaluate_returns_held_out_loss_only(global_state):
    msg = Message(
        RecordDict({"arrays": state_to_arrayrecord(global_state), "config": ConfigRecord({})}),
        dst_node_id=7,
        message_type="evaluate",
    )
    node = {"partition-id": 1, "num-partitions": 3}
    ctx = Context(1, 7, node, RecordDict(), {**RUN_CONFIG, "heldout-fraction": 0.1})
    reply = evaluate(msg, ctx)
    assert not reply.content.array_records  # evaluation sends nothing back but metrics
    (metrics,) = reply.content.metric_records.values()
    assert set(metrics) == {"num-examples", "eval-loss", "eval-perplexity"}
    assert metrics["eval-loss"] > 0 and metrics["num-examples"] > 0
    assert metrics["eval-perplexity"] == pytest.approx(np.exp(metrics["eval-loss"]), rel=1e-6)


def test_evaluate_on_a_client_without_a_heldout_split_says_why(global_state, tmp_path):
    data = tmp_path / "one.jsonl"
    data.write_text('{"text": "a single record"}\n')
    msg = Message(
        RecordDict({"arrays": state_to_arrayrecord(global_state), "config": ConfigRecord({})}),
        dst_node_id=7,
        message_type="evaluate",
    )
    ctx = Context(
        1,
        7,
        {"partition-id": 0, "num-partitions": 1},
        RecordDict(),
        {**RUN_CONFIG, "data": str(data)},
    )
    with pytest.raises(
        ConfigError, match=r"partition 0 of 1 \(one.jsonl.*\) has no held-out split"
    ):
        evaluate(msg, ctx)


def test_a_device_trains_on_its_own_data_file_given_in_its_node_config(global_state, tmp_path):
    data = tmp_path / "private.jsonl"
    records = (f'{{"instruction": "question {i}", "output": "answer {i}"}}' for i in range(12))
    data.write_text("\n".join(records))
    ctx = context({"data": str(data)})  # no partition-id / num-partitions: the whole file
    reply = train(train_message(global_state), ctx)
    (metrics,) = reply.content.metric_records.values()
    # All 12 records train (one row each): nothing set aside as the server's held-out set, nor a
    # local held-out tail for an evaluation the server never asks for (heldout-fraction 0).
    assert metrics["num-examples"] == 12
    with pytest.raises(ConfigError, match="data must be 'shakespeare' or an existing file"):
        train(train_message(global_state), context({"data": str(tmp_path / "missing.jsonl")}))


def test_a_device_naming_the_runs_own_corpus_keeps_the_servers_held_out_plays_out():
    from client_app.app import _own_data
    from collm_fl.config import RunConfig

    cfg = RunConfig.from_flower(RUN_CONFIG)
    spec = _own_data(context({"data": "shakespeare"}), cfg)
    assert spec is not None and spec.central_heldout == cfg.data_spec.central_heldout > 0
    other = _own_data(context({"data": "/data/private.jsonl"}), cfg)
    assert other is not None and other.central_heldout == 0


def test_the_runs_own_file_named_another_way_still_keeps_the_servers_held_out_part_out(
    tmp_path, monkeypatch
):
    """`./data/qa.jsonl`, `data/qa.jsonl`, its absolute path or a link: the same corpus, so the
    server's held-out records stay out (compared as strings, they trained)."""
    from client_app.app import _own_data
    from collm_fl.config import RunConfig

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "qa.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "data" / "qa.jsonl")
    monkeypatch.chdir(tmp_path)
    cfg = RunConfig.from_flower({**RUN_CONFIG, "data": "data/qa.jsonl", "central-heldout": 1})
    for alias in ("./data/qa.jsonl", str(tmp_path / "data" / "qa.jsonl"), "link.jsonl"):
        spec = _own_data(context({"data": alias}), cfg)
        assert spec is not None and spec.central_heldout == 1, alias
    (tmp_path / "data" / "other.jsonl").write_text('{"text": "y"}\n')
    other = _own_data(context({"data": "data/other.jsonl"}), cfg)
    assert other is not None and other.central_heldout == 0
    # A file of the run's folder, or a folder holding the run's file: the server sets aside the
    # same records of each file (chosen by its name) and they stay out here too (they trained).
    folder_run = RunConfig.from_flower({**RUN_CONFIG, "data": "data", "central-heldout": 1})
    for node_data, run in (("data/qa.jsonl", folder_run), (str(tmp_path / "data"), cfg)):
        spec = _own_data(context({"data": node_data}), run)
        assert spec is not None and spec.central_heldout == 1, node_data


@pytest.fixture()
def node_log(caplog):
    """What the node's own log says (the ClientApp's loggers do not propagate: setup_logging)."""
    import logging

    loggers = [logging.getLogger(name) for name in ("client_app", "collm_fl")]
    for logger in loggers:
        logger.addHandler(caplog.handler)
    yield caplog
    for logger in loggers:
        logger.removeHandler(caplog.handler)


def test_a_devices_malformed_data_reaches_the_server_as_its_line_not_its_content(
    global_state, tmp_path, node_log
):
    # Flower sends an error's text to the server (which logs and stores it): a role holding a
    # person's name, and the file's path, were in it.
    from collm_fl.errors import DataFormatError

    data = tmp_path / "alice-medical.jsonl"
    chat = '{"messages": [{"role": "Dr. Alice Smith", "content": "x"}]}'
    data.write_text('{"text": "fine"}\n' + chat + "\n")
    with pytest.raises(DataFormatError) as raised:
        train(train_message(global_state), context({"data": str(data)}))
    sent = str(raised.value)
    assert sent == "this node's data file:2: malformed (the node's log says what)"
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    logged = node_log.text  # the node's own log has all of it
    assert "alice-medical.jsonl:2" in logged and "Dr. Alice Smith" in logged


def test_a_devices_data_path_and_file_names_never_reach_the_server(global_state, tmp_path):
    """A config or OS error on a device's own data named its path (no such file, a folder with
    no data files, no permission): Flower sends the text to the server."""
    missing = tmp_path / "secret-name" / "missing.jsonl"
    with pytest.raises(ConfigError) as raised:
        train(train_message(global_state), context({"data": str(missing)}))
    assert "secret-name" not in str(raised.value) and "missing" not in str(raised.value)
    assert "existing file or folder" in str(raised.value)  # what was wrong stays
    folder = tmp_path / "alice-notes"
    folder.mkdir()
    (folder / "alice-diary.bin").write_bytes(b"not a data file")
    with pytest.raises(ConfigError) as raised:
        train(train_message(global_state), context({"data": str(folder)}))
    assert "alice" not in str(raised.value) and "holds no" in str(raised.value)


def test_an_error_that_names_nothing_of_a_devices_data_goes_as_it_is(tmp_path):
    from client_app.app import _on_private_data

    def model_cache_broken():
        raise OSError("Can't load the configuration of 'HuggingFaceTB/SmolLM2-135M'")

    with pytest.raises(OSError, match="Can't load the configuration"):
        _on_private_data(model_cache_broken, str(tmp_path / "data.jsonl"))


def test_a_malformed_record_of_a_json_list_reaches_the_server_as_its_index(
    global_state, tmp_path, node_log
):
    from collm_fl.errors import DataFormatError

    data = tmp_path / "private.json"
    data.write_text('[{"text": "fine"}, {"what": "Dr. Alice Smith"}]')
    with pytest.raises(DataFormatError) as raised:
        train(train_message(global_state), context({"data": str(data)}))
    assert str(raised.value) == (
        "this node's data file: record 1: malformed (the node's log says what)"
    )
    assert "private.json: record 1: unknown record" in node_log.text  # the node's log: all


def test_a_device_without_a_deadline_in_its_message_trains_to_the_runs_round_deadline(
    global_state, monkeypatch
):
    # (round-timeout, the old fallback, is when the server stops waiting: a node training
    # until then always answers too late)
    import collm_fl.client_task

    seen = {}

    def record(cfg, *args, deadline_s, **kwargs):
        seen["deadline_s"] = deadline_s
        raise RuntimeError("stop here")

    monkeypatch.setattr(collm_fl.client_task, "train_on_partition", record)
    ctx = Context(
        1,
        7,
        {"partition-id": 0, "num-partitions": 3},
        RecordDict(),
        {**RUN_CONFIG, "round-deadline-s": 30.0, "round-timeout": 90.0},
    )
    with pytest.raises(RuntimeError, match="stop here"):
        train(train_message(global_state), ctx)
    assert seen == {"deadline_s": 30.0}


def test_a_replica_node_is_told_it_does_not_evaluate(global_state):
    msg = Message(
        RecordDict({"arrays": state_to_arrayrecord(global_state), "config": ConfigRecord({})}),
        dst_node_id=7,
        message_type="evaluate",
    )
    with pytest.raises(ConfigError, match="relays to a replica"):
        evaluate(msg, context({"replica-address": "127.0.0.1:1"}))


def test_a_replica_node_refuses_a_message_without_its_version(global_state, monkeypatch):
    monkeypatch.setenv("COLLM_CONTROL_TOKEN", "t")
    msg = train_message(global_state)
    del msg.content.config_records["config"]["global-version"]
    with pytest.raises(ConfigError, match="no 'global-version'"):
        train(msg, context({"replica-address": "127.0.0.1:1"}))


def test_a_device_whose_prompts_fill_seq_len_is_told_so_not_that_its_data_is_empty(
    global_state, tmp_path
):
    data = tmp_path / "long.jsonl"
    long = " ".join(f"word{i}" for i in range(200))
    data.write_text("\n".join(f'{{"instruction": "{long}", "output": "ok"}}' for _ in range(3)))
    ctx = Context(1, 7, {"data": str(data)}, RecordDict(), {**RUN_CONFIG, "seq-len": 32})
    with pytest.raises(ConfigError, match=r"none of its 3 sample\(s\) fits seq-len=32"):
        train(train_message(global_state), ctx)


def test_a_device_whose_deadline_passed_while_it_loaded_warns(global_state, node_log):
    msg = train_message(global_state)
    msg.content.config_records["config"]["deadline-s"] = 0.0
    reply = train(msg, context({"partition-id": 0, "num-partitions": 3}))
    (metrics,) = reply.content.metric_records.values()
    assert metrics["local-steps"] == 0
    warned = [r for r in node_log.records if "no step trained this round" in r.getMessage()]
    assert warned and warned[0].levelname == "WARNING", node_log.text


def test_under_dp_a_node_that_trains_nothing_still_answers_with_its_zero_update(global_state):
    # Under DP every node is asked, one that sits out for 0 steps; Flower's clip divides by the
    # update's norm, and a norm of 0 made the reply (with its load report) an error.
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    from client_app.app import dp_clipping_mod

    node = context({"partition-id": 0, "num-partitions": 3})
    msg = train_message(global_state)
    msg.content["config"]["local-steps"] = 0
    msg.content["config"][KEY_CLIPPING_NORM] = 1.0
    reply = dp_clipping_mod(msg, node, train)
    assert not reply.has_error()
    sent = arrayrecord_to_state(reply.content.array_records["arrays"])
    assert all(np.array_equal(sent[k], global_state[k]) for k in sent)
    assert reply.content.metric_records["metrics"]["local-steps"] == 0
    # A node that trained is clipped to the norm as Flower clips it.
    msg = train_message(global_state)
    msg.content["config"][KEY_CLIPPING_NORM] = 1e-3  # (its unclipped update is ~0.05)
    reply = dp_clipping_mod(msg, node, train)
    sent = arrayrecord_to_state(reply.content.array_records["arrays"])
    delta = np.sqrt(sum(float(np.sum((sent[k] - global_state[k]) ** 2)) for k in sent))
    # The arrays travel as float32: global + clipped delta rounds each element by up to one
    # spacing of the value it lands on (a norm of 1e-6 was within that rounding and flaked).
    rounding = np.sqrt(sum(float(np.sum(np.spacing(np.abs(sent[k])) ** 2)) for k in sent))
    assert abs(delta - 1e-3) <= rounding  # clipped to the norm, not below it
