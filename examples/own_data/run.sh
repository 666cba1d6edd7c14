#!/usr/bin/env bash
# Federated LoRA fine-tuning on your own data, on one machine: a Flower simulation of two clients
# that split site_data.jsonl between them, one round, then the stored versions.
#
#   bash examples/own_data/run.sh                       # tiny test model, a minute or less
#   MODEL=smollm2-135m bash examples/own_data/run.sh    # the real SmolLM2-135M-Instruct
#
# DATA (a .json/.jsonl/.txt/.md file or a folder of them), OUT and RUN_NAME can be set the same way.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
MODEL=${MODEL:-tiny}
DATA=${DATA:-$HERE/site_data.jsonl}
OUT=${OUT:-$ROOT/outputs/own_data}
RUN_NAME=${RUN_NAME:-own-data}

# An absolute path, so the command also works when copied into a plain `flwr run` (collm
# federate resolves a relative one against this directory itself).
DATA=$(cd "$(dirname "$DATA")" && pwd)/$(basename "$DATA")

collm federate --app "$ROOT" --supernodes 2 --run-config "\
model='$MODEL' data='$DATA' partitioning='iid' num-server-rounds=1 local-steps=3 \
batch-size=2 central-eval-samples=4 output-dir='$OUT' run-name='$RUN_NAME'"
collm versions --output-dir "$OUT" --run-name "$RUN_NAME"
