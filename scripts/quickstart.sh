#!/usr/bin/env bash
# One command on a fresh machine: set everything up, then run the main job on the embedded
# default (SmolLM2-135M-Instruct + the Shakespeare plays): two co-executing replicas behind the
# gateway serve a live workload while the federation fine-tunes them, then the central
# perplexity of the base model and of every served version is measured.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. "${VENV:-.venv}/bin/activate"
OUT=${OUT:-outputs/live}
collm prepare --model smollm2-135m
collm live --model smollm2-135m --replicas "${REPLICAS:-2}" --rounds "${ROUNDS:-3}" \
  --rate "${RATE:-0.5}" --out "$OUT"
collm bench quality --output-dir "$OUT/federation" --run-name live --out "$OUT"
echo "main job done: $OUT/report.md (live run), $OUT/quality.md (central perplexity)"
