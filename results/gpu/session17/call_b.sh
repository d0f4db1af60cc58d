#!/usr/bin/env bash
# Session 17, device call B (after the GGUF parts paa..pac were carried; carries .ab/runtime_cur = the runtime
# before the device verdict, commit 5ebbade): CUDA tests, then step profiles of this tree (new) against
# 5ebbade's runtime (cur), interleaved, and a step trace of each. Writes $OUT/b.tgz.
bash scripts/device_model.sh >/dev/null || exit 3
export PYTHONPATH=/tmp/site:$PWD SPECDEPLOY_CACHE=/tmp/sdcache PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
T=/tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
O=/tmp/o/b; mkdir -p $O
python3 -m pytest -q -p no:cacheprovider tests/test_cuda_runner.py tests/test_fused_kernels.py tests/test_eagle.py \
  tests/test_tree_lossless.py -k "cuda or fused or frontier or topk or ahead or greedy_accept" > $O/cuda_tests.log 2>&1
tail -3 $O/cuda_tests.log
rm -rf /tmp/cur && mkdir -p /tmp/cur && cp -r specdeploy scripts /tmp/cur/ && rm -rf /tmp/cur/specdeploy/runtime \
  && cp -r .ab/runtime_cur /tmp/cur/specdeploy/runtime
P="scripts/step_profile.py --target $T --configs none:0,eagle:4 --per-task 1"
prof() { if [ $1 = new ]; then python3 $P --out $O/$2 > $O/$2.log 2>&1
         else (cd /tmp/$1 && PYTHONPATH=/tmp/site:/tmp/$1 python3 $P --out $O/$2 > $O/$2.log 2>&1); fi; }
prof new new1; prof cur cur1; prof new new2; prof cur cur2
for f in new1 cur1 new2 cur2; do echo "$f: $(grep -h '^| eagle:4\|^| none:0' $O/$f/step_profile.md | cut -c1-40 | tr '\n' ' ')"; done
python3 scripts/step_trace.py --target $T --configs eagle:4 --out $O/trace_new > $O/trace_new.log 2>&1
(cd /tmp/cur && PYTHONPATH=/tmp/site:/tmp/cur python3 scripts/step_trace.py --target $T --configs eagle:4 --out $O/trace_cur > $O/trace_cur.log 2>&1)
tail -1 $O/trace_new/step_trace.md $O/trace_cur/step_trace.md
tar -czf $OUT/b.tgz -C /tmp/o b
