#!/usr/bin/env bash
# Session 28, after the full bench (results/bench, whose 470 s budget ran out before its T=0.7 policy row and batched
# T=0.7 rows): T=0.7 alone, plain, EAGLE at k 4 / 6 / 8 and the advised policy, batch 1 then 8 and 32, same prompts
# and settings as the full bench (TOKENS new tokens, 128 by default). After the GGUF parts on a warm machine; writes $OUT/bench_t07.tgz.
bash scripts/device_model.sh >/dev/null || exit 3
export PYTHONPATH=/tmp/site:$PWD SPECDEPLOY_CACHE=/tmp/sdcache PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
mkdir -p /tmp/o/bench_t07
timeout -s INT ${LIMIT:-330} python3 -m specdeploy.bench.run --prompts eval --prompts-per-task 3 \
  --methods none,eagle,policy --k 4,6,8 --temperature 0.7 --batch 1,8,32 --batch-prompts-per-task 0 \
  --policy-min-speedup 1.1 --target /tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --device cuda \
  --max-new-tokens ${TOKENS:-128} --time-budget ${BUDGET:-270} --out /tmp/o/bench_t07 2>&1 | grep -v "it/s\]$" > /tmp/o/bench_t07/log.txt
tail -5 /tmp/o/bench_t07/log.txt
tar -czf $OUT/bench_t07.tgz -C /tmp/o bench_t07
