#!/usr/bin/env bash
# Session 17, device call A (after the GGUF parts paa..pac were carried): where an EAGLE step's GPU sits idle
# (scripts/step_trace.py, torch.profiler) at this tree, then session 16's call_d (eagle depth 4/5/6 against
# plain). Writes $OUT/a.tgz.
bash scripts/device_model.sh >/dev/null || exit 3
export PYTHONPATH=/tmp/site:$PWD SPECDEPLOY_CACHE=/tmp/sdcache PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
T=/tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
O=/tmp/o/a; mkdir -p $O
python3 scripts/step_trace.py --target $T --configs none:0,eagle:4 --out $O/trace > $O/trace.log 2>&1
tail -4 $O/trace.log
python3 scripts/step_profile.py --target $T --configs none:0,eagle:4 --per-task 1 --out $O/profile > $O/profile.log 2>&1
grep -h '^| none:0\|^| eagle:4' $O/profile/step_profile.md
tar -czf $OUT/a.tgz -C /tmp/o a
LIMIT=150 BUDGET=120 bash results/gpu/session16/call_d.sh
