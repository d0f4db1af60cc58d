#!/usr/bin/env bash
# Session 16, device call A (after the GGUF parts paa..pac were carried): step profile of HEAD against
# 7d5b954's runtime (.ab/runtime_old, carried), interleaved new/old/new/old; then fresh distillation
# data (seed 2) for the EAGLE head's continued training in call B. Writes $OUT/a.tgz.
bash scripts/device_model.sh >/dev/null || exit 3
export PYTHONPATH=/tmp/site:$PWD SPECDEPLOY_CACHE=/tmp/sdcache PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
T=/tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
O=/tmp/o/a; mkdir -p $O
rm -rf /tmp/old && mkdir -p /tmp/old && cp -r specdeploy scripts /tmp/old/
rm -rf /tmp/old/specdeploy/runtime && cp -r .ab/runtime_old /tmp/old/specdeploy/runtime
P="scripts/step_profile.py --target $T --configs none:0,eagle:4 --per-task 1"
for i in 1 2; do
  python3 $P --out $O/new$i > $O/new$i.log 2>&1
  (cd /tmp/old && PYTHONPATH=/tmp/site:/tmp/old python3 $P --out $O/old$i > $O/old$i.log 2>&1)
done
grep -h "ms/step" $O/*.log
python3 -m specdeploy.training.cli data --target $T --device cuda --out /tmp/distill --n-per-task 500 \
  --batch-size 1000 --seed 2 > $O/data.log 2>&1
tail -2 $O/data.log; cp /tmp/distill/manifest.json $O/data_manifest.json
tar -czf $OUT/a.tgz -C /tmp/o a
