"""The CUDA paths: quantized loads, the replica (serve + train + shadow swap), the PEFT trainer and
the central evaluator, on a small model built from a config. Skipped without CUDA.

Run on a GPU machine with ``scripts/gpu_check.sh`` (``pytest -m gpu``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from collm_fl.adapters import LoraSpec

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
needs_bnb = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes"
)
QUANTS = [pytest.param("4bit", marks=needs_bnb), pytest.param("8bit", marks=needs_bnb)]
SPEC = LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
TIMEOUT = 120.0


def random_state(shapes: dict[str, tuple[int, int]], seed: int, scale: float = 0.05):
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in shapes.items()}


# ---- (a) loading ----


@pytest.mark.parametrize("quant", QUANTS)
def test_quantized_load_of_a_local_model_gives_finite_logits_on_cuda(gpu_model_dir, quant):
    import bitsandbytes as bnb

    from collm_fl.models import load_base_model, model_device

    loaded = load_base_model(str(gpu_model_dir), quantization=quant, device="cuda")
    q_proj = loaded.model.model.layers[0].self_attn.q_proj
    expected = bnb.nn.Linear4bit if quant == "4bit" else bnb.nn.Linear8bitLt
    assert isinstance(q_proj, expected)
    assert model_device(loaded.model).type == "cuda"
    ids = loaded.tokenizer("the king speaks", return_tensors="pt").to("cuda")
    logits = loaded.model(**ids).logits
    assert logits.shape[-1] == loaded.model.config.vocab_size
    assert torch.isfinite(logits).all()


def test_auto_device_resolves_to_cuda_and_fp32_loads_there(gpu_model_dir):
    from collm_fl.models import load_base_model, model_device, resolve_device

    assert resolve_device("auto") == "cuda"
    loaded = load_base_model(str(gpu_model_dir), device="auto")
    assert model_device(loaded.model).type == "cuda"
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())


def test_a_missing_gpu_index_is_a_clear_error():
    from collm_fl.errors import ModelLoadError
    from collm_fl.models import resolve_device

    with pytest.raises(ModelLoadError, match="GPU"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


# ---- (b) the replica: multi-LoRA over a (quantized) base on the GPU ----


@pytest.mark.parametrize("quant", ["none", *QUANTS])
def test_multi_lora_layer_over_the_base_matches_the_dense_maths_on_cuda(gpu_model_dir, quant):
    from collm_fl.models import load_base_model
    from collm_fl.replica.lora_layers import inject_multi_lora, lora_context, serve, train

    loaded = load_base_model(str(gpu_model_dir), quantization=quant, device="cuda")
    modules = inject_multi_lora(loaded.model, SPEC, num_slots=2)
    state = random_state(modules.expected_shapes(), seed=3)
    modules.write_slot(1, state)
    prefix, layer = next(iter(modules.layers.items()))
    assert layer.slot_a.device.type == "cuda" and layer.train_a.dtype == torch.float32
    x = torch.randn(2, 5, layer.in_features, device="cuda")  # (b, L, d_in)
    with torch.no_grad():
        base = layer.base(x)
        with lora_context(serve([1, -1], "cuda")):
            mixed = layer(x)  # row 0 through slot 1, row 1 on the base only
    a = torch.from_numpy(state[prefix + ".lora_A.weight"]).cuda()
    b = torch.from_numpy(state[prefix + ".lora_B.weight"]).cuda()
    expected = base[0] + SPEC.scaling * (x[0] @ a.T) @ b.T
    torch.testing.assert_close(mixed[0], expected, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(mixed[1], base[1])
    with lora_context(train()):  # bf16/fp32 activations reach fp32 adapters; grads flow to them
        layer(x.to(base.dtype)).float().pow(2).mean().backward()
    assert layer.train_a.grad is not None and torch.isfinite(layer.train_a.grad).all()


@pytest.mark.parametrize("quant", ["none", pytest.param("4bit", marks=needs_bnb)])
def test_replica_on_cuda_serves_trains_and_swaps_versions(
    tmp_path, gpu_model_dir, gpu_text_file, quant
):
    from collm_fl.data import DataSpec
    from collm_fl.replica.requests import GenerationRequest
    from collm_fl.replica.runtime import Replica, ReplicaConfig
    from collm_fl.replica.sampling import SamplingParams

    cfg = ReplicaConfig(
        model=str(gpu_model_dir),
        quantization=quant,
        device="cuda",
        lora=SPEC,
        store_dir=str(tmp_path / "store"),
        data=DataSpec(source=str(gpu_text_file), partitioning="iid"),
        seq_len=64,
        train_batch_size=2,
        max_batch_size=4,
        canary=True,  # exercises the canary forward on the GPU too
    )
    replica = Replica(cfg)
    replica.start()
    try:
        assert replica.engine.device.type == "cuda"
        peft_config = SPEC.to_peft_config_dict(str(gpu_model_dir))
        shapes = replica.modules.expected_shapes()
        replica.push_version(random_state(shapes, seed=1), peft_config, 1)
        ids = list(replica.tokenizer("the king")["input_ids"])

        def ask(request_id: str, sampled: bool = False):
            params = SamplingParams(max_tokens=12, temperature=0.8 if sampled else 0.0, seed=7)
            return replica.engine.submit(GenerationRequest(ids, params, request_id))

        # Requests in flight while a training job (QLoRA on a 4-bit base) runs on the same model.
        handles = [ask(f"r{i}", sampled=i % 2 == 1) for i in range(4)]
        outcome = replica.train(steps=2, learning_rate=1e-3, deadline_s=TIMEOUT, round_number=1)
        for h in handles:
            assert h.wait(TIMEOUT) and h.error is None, h.error
            assert h.version == 1 and h.num_generated >= 1
        assert outcome.steps == 2 and np.isfinite(outcome.loss)
        assert all(isinstance(v, np.ndarray) for v in outcome.state.values())
        assert set(outcome.state) == set(shapes)
        # The trained adapter goes back in as version 2 through the shadow slot.
        swap = replica.push_version(outcome.state, peft_config, 2)
        assert swap.previous == 1 and replica.served_version == 2
        after = ask("after")
        assert after.wait(TIMEOUT) and after.error is None, after.error
        assert after.version == 2 and after.num_generated >= 1
    finally:
        replica.stop()


# ---- (c) the PEFT trainer used by device clients; (d) central evaluation ----


def _run_config(gpu_model_dir: Path, gpu_text_file: Path, quant: str):
    from collm_fl.config import RunConfig

    return RunConfig(
        model=str(gpu_model_dir),
        quantization=quant,
        device="cuda",
        data=str(gpu_text_file),
        partitioning="iid",
        lora=SPEC,
        seq_len=64,
        batch_size=2,
        local_steps=3,
        central_eval_samples=8,
    )


@pytest.mark.parametrize("quant", [pytest.param("4bit", marks=needs_bnb), "none"])
def test_peft_trainer_round_on_cuda_returns_a_cpu_numpy_adapter(
    gpu_model_dir, gpu_text_file, quant
):
    from collm_fl.client_task import evaluate_on_partition, train_on_partition
    from collm_fl.config import TrainBudget
    from collm_fl.models import load_base_model
    from collm_fl.training import attach_lora, get_adapter_state

    cfg = _run_config(gpu_model_dir, gpu_text_file, quant)
    start = get_adapter_state(attach_lora(load_base_model(str(gpu_model_dir)).model, SPEC))
    budget = TrainBudget(local_steps=3, batch_size=2, learning_rate=1e-3)
    state, metrics = train_on_partition(cfg, 0, 2, start, budget, server_round=1)
    assert set(state) == set(start)
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in state.values())
    assert all(np.isfinite(v).all() for v in state.values())
    assert any(not np.array_equal(state[k], start[k]) for k in state)  # it trained
    assert metrics["local-steps"] == 3 and np.isfinite(metrics["train-loss"])
    evaluated = evaluate_on_partition(cfg, 0, 2, state)
    assert np.isfinite(evaluated["eval-loss"])


@pytest.mark.parametrize("quant", ["none", pytest.param("4bit", marks=needs_bnb)])
def test_central_evaluator_on_cuda_matches_the_cpu_loss(gpu_model_dir, gpu_text_file, quant):
    from collm_fl.central_eval import CentralEvaluator

    cfg = _run_config(gpu_model_dir, gpu_text_file, quant)
    evaluator = CentralEvaluator(cfg)
    state = random_state(
        {k: v.shape for k, v in _zero_state(evaluator).items()}, seed=4, scale=0.02
    )
    on_gpu = evaluator.evaluate(state)
    assert np.isfinite(on_gpu.loss) and on_gpu.tokens > 0
    if quant == "none":  # the same maths on the CPU, up to TF32/kernel differences
        on_cpu = CentralEvaluator(cfg.replace(device="cpu")).evaluate(state)
        assert on_cpu.tokens == on_gpu.tokens
        assert abs(on_cpu.loss - on_gpu.loss) < 1e-2


def _zero_state(evaluator) -> dict[str, np.ndarray]:
    from collm_fl.training import get_adapter_state

    return get_adapter_state(evaluator.model)
