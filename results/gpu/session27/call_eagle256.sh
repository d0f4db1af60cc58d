#!/usr/bin/env bash
# Session 27, if a machine comes late: the short form of issue 5's question, does EAGLE reach 3x of plain per task
# at 256 new tokens with the draft vocabulary? Plain and eagle k=6, 8 only, batch 1, greedy, 3 eval prompts a task,
# no peers (the full file is session21/call_bench256.sh). Right after the GGUF parts; writes $OUT/eagle256.tgz.
bash scripts/device_model.sh >/dev/null || exit 3
export PYTHONPATH=/tmp/site:$PWD SPECDEPLOY_CACHE=/tmp/sdcache PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
mkdir -p /tmp/o/eagle256
timeout -s INT ${LIMIT:-300} python3 -m specdeploy.bench.run --prompts eval --prompts-per-task 3 \
  --methods none,eagle --k 6,8 --temperature 0 --batch 1 --target /tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
  --device cuda --max-new-tokens 256 --time-budget ${BUDGET:-240} --out /tmp/o/eagle256 2>&1 | grep -v "it/s\]$" > /tmp/o/eagle256/log.txt
tail -5 /tmp/o/eagle256/log.txt
tar -czf $OUT/eagle256.tgz -C /tmp/o eagle256
