#!/usr/bin/env bash
# Session 19, device call T2 (right after call_train.sh, same warm machine, its data and head in /tmp): the head
# of call T trained on for 8.4 more minutes on the same data (it stopped after 270 s: see README). The exact
# command of the call, one line there; writes $OUT/train2/train.log and $OUT/eagle2.tgz.
export PYTHONPATH=/tmp/site:$PWD SPECDEPLOY_CACHE=/tmp/sdcache PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1; [ -d /tmp/distill ] || exit 3; mkdir -p $OUT/train2; python3 -m specdeploy.training.cli eagle --target /tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --device cuda --data /tmp/distill --out /tmp/art/eagle2 --init /tmp/art/eagle --minutes 8.4 --batch-size 32 2>&1 | tr '\r' '\n' | grep -v "it/s\]$" | grep -v "step/s, reg1" | tail -30 > $OUT/train2/train.log; tail -5 $OUT/train2/train.log; rm -rf /tmp/art/eagle_first && mv /tmp/art/eagle /tmp/art/eagle_first && cp -r /tmp/art/eagle2 /tmp/art/eagle && tar czf $OUT/eagle2.tgz -C /tmp/art eagle2; echo done $SECONDS
