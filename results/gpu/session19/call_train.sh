#!/usr/bin/env bash
# Session 19, device call T (after the GGUF parts were carried): fresh distillation data (seed 3, 600 prompts
# per task), then the shipped EAGLE head trained on for the rest of the call at batch 32 (the trainer is
# host-bound at 16, results/gpu/session18/train_step). Writes $OUT/eagle.tgz and $OUT/train/ (logs, data
# manifest). The head stays in /tmp/art/eagle for call_bench.sh while the machine is warm.
set -eo pipefail
bash scripts/device_model.sh >/dev/null || exit 3
export PYTHONPATH=/tmp/site:$PWD SPECDEPLOY_CACHE=/tmp/sdcache PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
T=/tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p $OUT/train /tmp/art
python3 -m specdeploy.training.cli data --target $T --device cuda --out /tmp/distill --n-per-task 600 \
  --batch-size 1000 --seed 3 2>&1 | tr '\r' '\n' | grep -v "it/s\]$" | tail -20 > $OUT/train/data.log
cp /tmp/distill/manifest.json $OUT/train/data_manifest.json
MIN=$(python3 -c "print(round((${END:-555} - $SECONDS - 45) / 60, 2))")  # what is left, less load and save
echo "data done at ${SECONDS}s; training for $MIN minutes" | tee $OUT/train/plan.txt
python3 -m specdeploy.training.cli eagle --target $T --device cuda --data /tmp/distill --out /tmp/art/eagle \
  --init specdeploy/models/artifacts/smollm2-eagle --minutes $MIN --batch-size ${BS:-32} 2>&1 \
  | tr '\r' '\n' | grep -v "it/s\]$" | tail -40 > $OUT/train/train.log
tar czf $OUT/eagle.tgz -C /tmp/art eagle
echo "done at ${SECONDS}s" >> $OUT/train/plan.txt
