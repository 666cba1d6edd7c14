#!/usr/bin/env bash
# Lint, type-check and test (CPU only; tiny models; the Flower simulation end to end).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
. "$VENV/bin/activate"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
ruff check .
ruff format --check .
mypy
python -m pytest "$@"
