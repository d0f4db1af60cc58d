#!/usr/bin/env bash
# For a later session (not run: session 22 was lent no machine). On main, after call_eagle_ab2.sh on the same warm
# machine and before any training shares the GPU:
# 1. scripts/step_profile.py none:0, eagle:6, eagle:6:127: does a 127-node tree (the 128-token verify bucket) pay?
#    On the CPU it accepts 5% more than 63 nodes (results/cpu/eagle_calibration: 3.93 against 3.75 tokens a step);
#    it pays if its step costs under ~5% more. One prompt per task of six, as the A/B's profiles.
# 2. scripts/step_trace.py none:0, eagle:6 (profiler on): how long the GPU sits idle per step, and under which host
#    call, with this tree's staged verify (session 17's traces predate it: 425-490 us idle of ~2,600 at eagle:4).
# At most ~200 s. Writes $OUT/tree_trace.tgz.
bash scripts/device_model.sh >/dev/null || exit 3
export PYTHONPATH=/tmp/site:$PWD SPECDEPLOY_CACHE=/tmp/sdcache PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
T=/tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p /tmp/tt
timeout 130 python3 scripts/step_profile.py --target $T --out /tmp/tt/profile --configs none:0,eagle:6,eagle:6:127 \
  --per-task 1 > /tmp/tt/profile.log 2>&1
head -6 /tmp/tt/profile/step_profile.md 2>/dev/null || tail -3 /tmp/tt/profile.log
timeout 70 python3 scripts/step_trace.py --target $T --out /tmp/tt/trace --configs none:0,eagle:6 > /tmp/tt/trace.log 2>&1
cat /tmp/tt/trace/step_trace.md 2>/dev/null || tail -3 /tmp/tt/trace.log
tar czf $OUT/tree_trace.tgz -C /tmp/tt .
