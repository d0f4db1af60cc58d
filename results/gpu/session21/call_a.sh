#!/usr/bin/env bash
# Session 21, device call A (after the GGUF parts; carries .ab, see session 20's call_eagle_ab.sh header): the A/B
# of branch eagle-level-kernels against this tree (two step profiles each at most), then fresh distillation data
# (seed 5, kept as $OUT/data.tgz) and the shipped EAGLE head trained on it for 7 minutes in the background
# (call_b.sh collects it). Writes $OUT/eagle_ab.tgz, $OUT/data.tgz, $OUT/data.log.
STOP_AFTER=${STOP_AFTER:-150} bash results/gpu/session20/call_eagle_ab.sh
export PYTHONPATH=/tmp/site:$PWD SPECDEPLOY_CACHE=/tmp/sdcache PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
DATA_ARGS="--seed 5" N_PER_TASK=600 DATA_BATCH=1000 bash results/drafts/run_gpu.sh data 2>&1 | tr '\r' '\n' \
  | grep -v "it/s\]$" | tail -15 > $OUT/data.log
tail -3 $OUT/data.log
CONTINUE=1 TRAIN_MINUTES=${TRAIN_MINUTES:-7} TRAIN_ARGS="--batch-size 32" bash results/drafts/run_gpu.sh train-bg eagle
echo "call A done at $SECONDS s"
