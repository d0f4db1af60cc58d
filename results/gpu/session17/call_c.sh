#!/usr/bin/env bash
# Session 17, device call C (right after B, same warm machine): the full bench of this tree, as session 16's
# call_c.sh with the shipped EAGLE head. Writes $OUT/$NAME.tgz. Defaults: NAME bench, METHODS every method and the
# policy, PEERS hf, TEMPS 0,0.7, TOKENS 128 (NAME, METHODS, PEERS, TEMPS and TOKENS since session 28).
bash scripts/device_model.sh >/dev/null || exit 3
export PYTHONPATH=/tmp/site:$PWD SPECDEPLOY_CACHE=/tmp/sdcache PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
T=/tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
NAME=${NAME:-bench}
mkdir -p /tmp/o/$NAME
timeout -s INT ${LIMIT:-500} python3 -m specdeploy.bench.run --prompts eval --prompts-per-task 3 \
  --methods ${METHODS:-none,ngram,draft,medusa,eagle,multi,specinfer,policy} --k ${K:-1,2,4,8} --temperature ${TEMPS:-0,0.7} \
  --batch 1,8,32 --batch-prompts-per-task 0 --peers "${PEERS-hf}" --peer-time-cap 8 --policy-min-speedup 1.1 --target $T \
  --device cuda --max-new-tokens ${TOKENS:-128} --time-budget ${BUDGET:-420} --out /tmp/o/$NAME 2>&1 | grep -v "it/s\]$" > /tmp/o/$NAME/log.txt
tail -5 /tmp/o/$NAME/log.txt
tar -czf $OUT/$NAME.tgz -C /tmp/o $NAME
