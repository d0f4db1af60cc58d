#!/usr/bin/env bash
# For a later session (not run: session 22 was lent no machine). On main, right after session 21's call_eagle_ab2.sh
# on the same warm machine (whose profiles now time eagle:6 at 63 and at 127 nodes) and before any training shares
# the GPU: scripts/step_trace.py none:0, eagle:6 (profiler on), how long the GPU sits idle per step and under which
# host call, with this tree's staged verify. Session 17's traces predate it (425-490 us idle of ~2,600 a step at
# eagle:4, results/gpu/session17). About 70 s. Writes $OUT/step_trace.tgz.
bash scripts/device_model.sh >/dev/null || exit 3
export PYTHONPATH=/tmp/site:$PWD SPECDEPLOY_CACHE=/tmp/sdcache PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
mkdir -p /tmp/tt
timeout 90 python3 scripts/step_trace.py --target /tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out /tmp/tt/trace \
  --configs none:0,eagle:6 > /tmp/tt/trace.log 2>&1
cat /tmp/tt/trace/step_trace.md 2>/dev/null || tail -3 /tmp/tt/trace.log
tar czf $OUT/step_trace.tgz -C /tmp/tt .
