#!/usr/bin/env bash
# Session 19, device call D (after the GGUF parts were carried): the batched engine's exact KV margin (this tree)
# against e96a237's (`.ab/batch_e96a237.py`, carried), alternately: the bench's batch-32 rows (none, ngram and
# the DraftLM at k=4, switch on and auto), three passes each, each tree run from its own folder; first
# tests/test_batch.py on the GPU. OLD_BATCH=FILE runs another batch.py as the old tree (session 20's call_batch.sh).
bash scripts/device_model.sh >/dev/null || exit 3
export SPECDEPLOY_CACHE=/tmp/sdcache PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
T=/tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
rm -rf /tmp/oldtree && mkdir -p /tmp/o /tmp/oldtree && cp -r specdeploy /tmp/oldtree/ && cp ${OLD_BATCH:-.ab/batch_e96a237.py} /tmp/oldtree/specdeploy/runtime/batch.py
PYTHONPATH=/tmp/site:$PWD timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_batch.py 2>&1 | tail -3 > /tmp/o/cuda_test_batch.log
cat /tmp/o/cuda_test_batch.log
i=0
for tree in $PWD /tmp/oldtree $PWD /tmp/oldtree; do
  i=$((i + 1))
  [ $SECONDS -gt ${STOP_AFTER:-200} ] && break
  name=run${i}_$([ $tree = $PWD ] && echo new || echo old)
  (cd $tree && PYTHONPATH=/tmp/site:$tree timeout -s INT 100 python3 -m specdeploy.bench.run --prompts eval --prompts-per-task 1 \
    --methods none,ngram,draft --k 4 --temperature 0 --batch 32 --batch-prompts-per-task 0 --target $T --device cuda \
    --max-new-tokens 128 --out /tmp/o/$name > /tmp/o/$name.log 2>&1)
  python3 - /tmp/o/$name/bench.json <<'PY'
import json, sys
b = json.load(open(sys.argv[1]))
print(sys.argv[1])
for r in b["rows"]:
    if r["batch"] > 1:
        print(f"  {r['method']:14s} {r['tokens_per_s']:9.1f} tok/s {r['speedup_vs_plain']:.3f}x "
              f"switched_off {r.get('switched_off', '-')} greedy != plain {r['greedy_mismatches']}/{r['prompts']}")
PY
done
tar czf $OUT/batch2.tgz -C /tmp/o .
