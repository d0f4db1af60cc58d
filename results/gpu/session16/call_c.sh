#!/usr/bin/env bash
# Session 16, device call C (right after A, same warm machine): the full bench. Its EAGLE head is B's
# (copied over the shipped artifact in this call's copy of the tree) where B ran before it and its
# greedy eagle k=4 mean acceptance length beat the shipped head's, else the shipped one. Writes
# $OUT/bench.tgz.
bash scripts/device_model.sh >/dev/null || exit 3
export PYTHONPATH=/tmp/site:$PWD SPECDEPLOY_CACHE=/tmp/sdcache PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
T=/tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p /tmp/o/bench
[ -f /tmp/o/b/res/unroll4_T0.json ] && python3 - <<'PY' && cp /tmp/art/eagle/* specdeploy/models/artifacts/smollm2-eagle/ && echo "bench: B's head" > /tmp/o/bench/head.txt
import json, sys
length = lambda f: json.load(open(f))["total"]["acceptance_length"]
old, new = length("/tmp/o/b/res/shipped_T0.json"), length("/tmp/o/b/res/unroll4_T0.json")
print(f"greedy eagle k=4 acceptance length: shipped {old:.3f}, unroll4 {new:.3f}")
sys.exit(0 if new > old else 1)
PY
[ -f /tmp/o/bench/head.txt ] || echo "bench: the shipped head" > /tmp/o/bench/head.txt
timeout -s INT ${LIMIT:-500} python3 -m specdeploy.bench.run --prompts eval --prompts-per-task 3 \
  --methods none,ngram,draft,medusa,eagle,multi,specinfer,policy --k 1,2,4,8 --temperature 0,0.7 --batch 1,8,32 \
  --batch-prompts-per-task 0 --peers hf --peer-time-cap 8 --policy-min-speedup 1.1 --target $T --device cuda \
  --max-new-tokens 128 --time-budget ${BUDGET:-420} --out /tmp/o/bench 2>&1 | grep -v "it/s\]$" > /tmp/o/bench/log.txt
tail -5 /tmp/o/bench/log.txt
tar -czf $OUT/bench.tgz -C /tmp/o bench
