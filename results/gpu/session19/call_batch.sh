#!/usr/bin/env bash
# Session 19, device call C (after the GGUF parts were carried): the bench's batch-32 rows (none, ngram and the
# DraftLM at k=4, switch on and auto) with one pass over the 80 prompts (as before) and with three passes on one
# engine, the median timed (the new default), alternately. Writes $OUT/batch.tgz and prints the rows.
bash scripts/device_model.sh >/dev/null || exit 3
export PYTHONPATH=/tmp/site:$PWD SPECDEPLOY_CACHE=/tmp/sdcache PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
T=/tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p /tmp/o
i=0
for P in 1 3 1 3; do
  i=$((i + 1))
  [ $SECONDS -gt ${STOP_AFTER:-330} ] && break
  timeout -s INT 150 python3 -m specdeploy.bench.run --prompts eval --prompts-per-task 1 --methods none,ngram,draft \
    --k 4 --temperature 0 --batch 32 --batch-prompts-per-task 0 --batch-passes $P --target $T --device cuda \
    --max-new-tokens 128 --out /tmp/o/run${i}_passes$P 2>&1 | grep -v "it/s\]$" > /tmp/o/run${i}_passes$P.log
  python3 - /tmp/o/run${i}_passes$P/bench.json <<'PY'
import json, sys
b = json.load(open(sys.argv[1]))
print(sys.argv[1], b["command"].split("--batch-passes ")[1].split()[0], "passes")
for r in b["rows"]:
    if r["batch"] > 1:
        print(f"  {r['method']:14s} {r['tokens_per_s']:9.1f} tok/s {r['speedup_vs_plain']:.3f}x switched_off {r.get('switched_off', '-')}")
PY
done
tar czf $OUT/batch.tgz -C /tmp/o .
