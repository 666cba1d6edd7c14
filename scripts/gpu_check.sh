#!/usr/bin/env bash
# The CUDA paths on a GPU machine: 4/8-bit loads, the replica (serve + QLoRA training + shadow
# swap) on cuda, the PEFT trainer and the central evaluator (tests marked `gpu`, tests/gpu).
# Run from the repo root. Offline: missing packages come as wheels in .whl/ (bitsandbytes,
# prometheus-client); .whl/pinned/ holds the transformers + peft this project pins, installed only
# when the machine's transformers predates the `cache=` forward kwarg (and kept only if it imports).
# Needs no Flower, FastAPI or SQLAlchemy. Log: $OUT/gpu_check.log when $OUT is set. < 5 minutes.
# (.whl/ is not in the repository: put the wheels there, or have the packages installed already.)
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD
set -uo pipefail
LOG=${OUT:+$OUT/gpu_check.log}
LOG=${LOG:-/dev/null}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 COLLM_CACHE=/tmp/collm-cache
{
  echo "== gpu_check $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi -L
  engine_api_ok() {
    python3 - <<'PY'
import inspect, sys
from transformers.models.llama.modeling_llama import LlamaModel
sys.exit(0 if "cache" in inspect.signature(LlamaModel.forward).parameters else 1)
PY
  }
  if ! engine_api_ok && compgen -G ".whl/pinned/*.whl" >/dev/null; then
    echo "machine transformers predates LlamaModel.forward(cache=...): trying .whl/pinned"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/pinned/*.whl
    if ! python3 -c "import transformers, peft; from transformers import LlamaForCausalLM"; then
      # e.g. its huggingface-hub floor is above the machine's: keep the machine's transformers
      # (the engine then passes its KV cache as past_key_values).
      echo "pinned transformers/peft do not import here: removed, using the machine's"
      rm -rf /tmp/site/transformers /tmp/site/transformers-*.dist-info \
        /tmp/site/peft /tmp/site/peft-*.dist-info
    fi
  fi
  python3 - <<'PY'
import importlib.metadata as md
import torch
print("python", __import__("sys").version.split()[0], "| torch", torch.__version__,
      "| cuda", torch.version.cuda, "| available", torch.cuda.is_available(),
      "| devices", torch.cuda.device_count())
for pkg in ("transformers", "peft", "tokenizers", "accelerate", "bitsandbytes", "prometheus_client"):
    try:
        mod = __import__(pkg)
        print(f"{pkg} {getattr(mod, '__version__', md.version(pkg))} from {mod.__file__}")
    except Exception as e:  # report every missing piece, then let pytest say what fails
        print(f"{pkg}: NOT importable: {type(e).__name__}: {e}")
PY
  # Without CUDA or bitsandbytes the gpu tests would all skip and "pass": fail loudly instead.
  python3 -c "import torch, bitsandbytes; assert torch.cuda.is_available(), 'no CUDA'" \
    || { echo "== gpu_check: CUDA or bitsandbytes unusable (see above)"; pre=3; }
  timeout 270 python3 -m pytest -q -m gpu tests/gpu tests/collm_fl/test_models.py \
    -p no:cacheprovider -rA --durations=10
  rc=$?
  echo "== gpu_check pytest exit code $rc"
  [ "$rc" -eq 0 ] && rc=${pre:-0}
  exit $rc
} 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
