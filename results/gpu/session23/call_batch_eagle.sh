#!/usr/bin/env bash
# Session 23 (written, not run: no machine was lent): the batched engine's EAGLE chains on the GPU. Right after
# the GGUF parts on a warm machine. First tests/test_batch.py on CUDA (CUDA graphs against eager for the n-gram
# lookup, a draft model and EAGLE chains; the real model's batched output equals plain greedy, float32). Then,
# for each k in $KS, the bench's batch rows at 8 and 32 (all 80 eval prompts, three passes on one engine, each
# speculative row paired pass by pass with a plain engine): plain, ngram, the DraftLM and EAGLE chains, switch
# on and auto, greedy and T=0.7 (speculative sampling in the batched engine, new this session); the batch-1 loop rows of the same methods on one prompt a task. Then `specdeploy generate --batch 8`
# against --batch 1 on 20 eval prompts (EAGLE k=3). Writes $OUT/batch_eagle.tgz. About 2 min a k after the tests.
bash scripts/device_model.sh >/dev/null || exit 3
export PYTHONPATH=/tmp/site:$PWD SPECDEPLOY_CACHE=/tmp/sdcache PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
T=/tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p /tmp/o/batch_eagle
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_batch.py tests/test_sampling_distribution.py -k "batch" 2>&1 \
  | tail -3 > /tmp/o/batch_eagle/cuda_test_batch.log
cat /tmp/o/batch_eagle/cuda_test_batch.log
for K in ${KS:-2 4}; do
  [ $SECONDS -gt ${STOP_AFTER:-400} ] && break
  timeout -s INT ${LIMIT:-180} python3 -m specdeploy.bench.run --prompts eval --prompts-per-task 1 \
    --methods none,ngram,draft,eagle --k $K --peer-k $K --temperature 0,0.7 --batch 8,32 --batch-prompts-per-task 0 \
    --target $T --device cuda --max-new-tokens 128 --out /tmp/o/batch_eagle/k$K 2>&1 | grep -v "it/s\]$" \
    > /tmp/o/batch_eagle/k$K.log
  python3 - /tmp/o/batch_eagle/k$K/bench.json <<'PY'
import json, sys
b = json.load(open(sys.argv[1]))
print(sys.argv[1])
for r in b["rows"]:
    if r["task"] == "all":
        print(f"  T{r['temperature']:g} b{r['batch']:<3d} {r['method']:14s} k={r['k']} {r['tokens_per_s']:9.1f} tok/s {r['speedup_vs_plain']:.3f}x "
              f"alpha {r['alpha']} greedy != plain {r['greedy_mismatches']}")
PY
done
# the user's path: `specdeploy generate --batch 8` on 20 eval prompts against --batch 1 (outputs and tokens/s)
python3 -c "import json; from specdeploy.bench.tasks import builtin_prompts
[print(json.dumps({'prompt': p.prompt, 'task': p.task})) for p in builtin_prompts('eval')[::4]]" > /tmp/o/batch_eagle/p20.jsonl
for B in 1 8; do
  timeout 120 python3 -m specdeploy.cli generate --prompts /tmp/o/batch_eagle/p20.jsonl --json --method eagle --k 3 \
    --batch $B --device cuda --max-new-tokens 128 --target $T > /tmp/o/batch_eagle/gen_b$B.jsonl 2> /tmp/o/batch_eagle/gen_b$B.err
  tail -1 /tmp/o/batch_eagle/gen_b$B.err
done
python3 - /tmp/o/batch_eagle/gen_b1.jsonl /tmp/o/batch_eagle/gen_b8.jsonl <<'PY'
import json, sys
a, b = ([json.loads(l)["token_ids"] for l in open(f)] for f in sys.argv[1:])
print(f"generate --batch 8 vs --batch 1: {sum(x != y for x, y in zip(a, b))} of {len(a)} outputs differ (bfloat16)")
PY
tar czf $OUT/batch_eagle.tgz -C /tmp/o batch_eagle
