#!/usr/bin/env bash
# Session 17, device call C (right after B, same warm machine): the full bench of this tree, as session 16's
# call_c.sh with the shipped EAGLE head. Writes $OUT/bench.tgz. TEMPS and TOKENS (session 28) default to 0,0.7 and 128.
bash scripts/device_model.sh >/dev/null || exit 3
export PYTHONPATH=/tmp/site:$PWD SPECDEPLOY_CACHE=/tmp/sdcache PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
T=/tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p /tmp/o/bench
timeout -s INT ${LIMIT:-500} python3 -m specdeploy.bench.run --prompts eval --prompts-per-task 3 \
  --methods none,ngram,draft,medusa,eagle,multi,specinfer,policy --k ${K:-1,2,4,8} --temperature ${TEMPS:-0,0.7} --batch 1,8,32 \
  --batch-prompts-per-task 0 --peers hf --peer-time-cap 8 --policy-min-speedup 1.1 --target $T --device cuda \
  --max-new-tokens ${TOKENS:-128} --time-budget ${BUDGET:-420} --out /tmp/o/bench 2>&1 | grep -v "it/s\]$" > /tmp/o/bench/log.txt
tail -5 /tmp/o/bench/log.txt
tar -czf $OUT/bench.tgz -C /tmp/o bench
