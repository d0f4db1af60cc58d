#!/usr/bin/env bash
# For a later session (not run in session 25: its device time ran out): after the GGUF parts .carry/paa .. pae (one
# a call; this one carries .carry/paf and .whl), batch_switch_diag.py at batch 32, T=0.7 and greedy (~150 s).
# Writes $OUT/diag.log and $OUT/batch_switch_diag.json.
bash scripts/device_model.sh >/dev/null || exit 3
export PYTHONPATH=/tmp/site:$PWD SPECDEPLOY_CACHE=/tmp/sdcache PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
timeout ${DIAG_S:-300} python3 results/gpu/session25/batch_switch_diag.py --target /tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
  --out $OUT 2>&1 | grep -v "it/s\]$" | tail -20 | tee $OUT/diag.log
