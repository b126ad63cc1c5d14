#!/usr/bin/env bash
# README command one: set up .venv if needed, then run the CPU quickstart pipeline
# (tokenizer + tiny hybrid base -> SFT -> ELO -> TDPO -> reward model -> PPO, evaluated after each stage).
# Extra arguments go to `m1-align pipeline`, e.g. `bash scripts/quickstart.sh --from tdpo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export VLLM_ENABLE_V1_MULTIPROCESSING=${VLLM_ENABLE_V1_MULTIPROCESSING:-0}
.venv/bin/m1-align pipeline configs/quickstart.yaml "$@"
echo "done: runs/quickstart/report.md"
