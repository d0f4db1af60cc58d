#!/usr/bin/env bash
# For a later session (not run): issue 5's side-by-side file as the issue words it: greedy, max_new_tokens 256,
# batch 1 / 8 / 32, specdeploy plain and each speculative method (k 4 and 6) against HF generate, assisted
# generation and prompt lookup, 3 eval prompts a task (results/bench uses 128 new tokens and every k). Right after
# the GGUF parts on a warm machine; writes $OUT/bench256.tgz.
bash scripts/device_model.sh >/dev/null || exit 3
export PYTHONPATH=/tmp/site:$PWD SPECDEPLOY_CACHE=/tmp/sdcache PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
mkdir -p /tmp/o/bench256
timeout -s INT ${LIMIT:-560} python3 -m specdeploy.bench.run --prompts eval --prompts-per-task 3 \
  --methods none,ngram,draft,medusa,eagle,multi,specinfer --k ${K:-4,6} --peer-k 4 --temperature 0 --batch 1,8,32 \
  --batch-prompts-per-task 0 --peers hf --peer-time-cap 8 --target /tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
  --device cuda --max-new-tokens 256 --time-budget ${BUDGET:-470} --out /tmp/o/bench256 2>&1 | grep -v "it/s\]$" > /tmp/o/bench256/log.txt
tail -5 /tmp/o/bench256/log.txt
tar -czf $OUT/bench256.tgz -C /tmp/o bench256
