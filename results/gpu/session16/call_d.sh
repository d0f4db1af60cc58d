#!/usr/bin/env bash
# Prepared in session 16, NOT run (no device time was left): after the GGUF parts are carried, does a deeper
# EAGLE tree pay now that a level costs ~0.095 ms (session16/a)? eagle at k (depth) 4, 5, 6 against plain, greedy,
# batch 1, 3 eval prompts per task. Writes $OUT/depth.tgz.
bash scripts/device_model.sh >/dev/null || exit 3
export PYTHONPATH=/tmp/site:$PWD SPECDEPLOY_CACHE=/tmp/sdcache PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
mkdir -p /tmp/o/depth
timeout -s INT ${LIMIT:-140} python3 -m specdeploy.bench.run --prompts eval --prompts-per-task 3 --methods none,eagle \
  --k 4,5,6 --temperature 0 --batch 1 --target /tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --device cuda \
  --max-new-tokens 128 --time-budget ${BUDGET:-110} --out /tmp/o/depth 2>&1 | grep -v "it/s\]$" > /tmp/o/depth/log.txt
grep -A16 "^## Batch 1, greedy" /tmp/o/depth/bench.md | head -18
tar -czf $OUT/depth.tgz -C /tmp/o depth
