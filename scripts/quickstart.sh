#!/usr/bin/env bash
# One command on a fresh machine: set everything up, then run the main job on the embedded
# default (SmolLM2-135M-Instruct + the Shakespeare plays), then report central perplexity.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. "${VENV:-.venv}/bin/activate"
OUT=${OUT:-outputs/quickstart}
collm prepare --model smollm2-135m
collm federate --supernodes "${SUPERNODES:-4}" \
  -c "output-dir='$OUT' run-name='quickstart' num-server-rounds=${ROUNDS:-3}"
collm bench quality --output-dir "$OUT" --run-name quickstart
