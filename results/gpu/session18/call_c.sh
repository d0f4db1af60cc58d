#!/usr/bin/env bash
# Session 18, device call C (commit 2f5bdc4; the four GGUF parts carried first): the advisor's policy at T=0.7 on
# all 80 eval prompts (8 per task, the full bench has 3), against plain and the methods it chooses from at k 2 and 4.
# Writes $OUT/c.tgz.
bash scripts/device_model.sh >/dev/null || exit 3
export PYTHONPATH=/tmp/site:$PWD SPECDEPLOY_CACHE=/tmp/sdcache PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
T=/tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
O=/tmp/o/c; mkdir -p $O/bench
timeout -s INT ${LIMIT:-420} python3 -m specdeploy.bench.run --prompts eval --prompts-per-task 8 \
  --methods none,ngram,draft,eagle,multi,policy --k 2,4 --temperature 0.7 --batch 1 --policy-min-speedup 1.1 \
  --target $T --device cuda --max-new-tokens 128 --time-budget ${BUDGET:-330} --out $O/bench 2>&1 \
  | grep -v "it/s\]$" > $O/bench/log.txt
grep -A16 "temperature 0.7: speedup" $O/bench/bench.md | tail -14
tar -czf $OUT/c.tgz -C /tmp/o c
