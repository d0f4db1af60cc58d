#!/usr/bin/env bash
# Session 16, device call B (after the bench, call C, same warm machine): fresh distillation data (seed 2),
# the shipped EAGLE head continued on it with 4 unrolled passes (HASS), then acceptance of the shipped
# and the new head on the eval prompts (greedy and T=0.7, eagle k=4). Writes $OUT/b.tgz (the new
# artifact, logs, report).
bash scripts/device_model.sh >/dev/null || exit 3
export PYTHONPATH=/tmp/site:$PWD SPECDEPLOY_CACHE=/tmp/sdcache PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
T=/tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
O=/tmp/o/b; mkdir -p $O/res /tmp/art
python3 -m specdeploy.training.cli data --target $T --device cuda --out /tmp/distill --n-per-task ${N_PER_TASK:-400} \
  --batch-size 1000 --seed 2 > $O/data.log 2>&1
tail -2 $O/data.log; cp /tmp/distill/manifest.json $O/data_manifest.json
python3 -m specdeploy.training.cli eagle --target $T --device cuda --data /tmp/distill --out /tmp/art/eagle \
  --init specdeploy/models/artifacts/smollm2-eagle --unroll 4 --steps 20000 --minutes ${MINUTES:-4} > $O/train.log 2>&1
grep -a "steps in\|planning" $O/train.log | cut -c1-600
cp -r /tmp/art/eagle $O/
E="python3 -m specdeploy.training.report run --method eagle --k 4 --target $T --device cuda --max-new-tokens 128"
for temp in 0 0.7; do
  $E --label shipped --temperature $temp --out $O/res/shipped_T$temp.json > $O/eval_shipped_T$temp.log 2>&1 &
  $E --label unroll4 --temperature $temp --draft /tmp/art/eagle --out $O/res/unroll4_T$temp.json > $O/eval_unroll4_T$temp.log 2>&1 &
done
wait
python3 -m specdeploy.training.report table $O/res/*.json --out $O/report > /dev/null 2>&1
sed -n '/mean acceptance length/,/^## α/p' $O/report/README.md
tar -czf $OUT/b.tgz -C /tmp/o b
