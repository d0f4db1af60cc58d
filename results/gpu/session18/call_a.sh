#!/usr/bin/env bash
# Session 18, device call A (after the GGUF parts paa..pac were carried; carries .carry/pad, .whl and
# .ab/runtime_ac6 = the runtime of ac62e34, before staged verifies): CUDA tests, step profiles of this tree
# (new) against ac62e34's runtime (old), interleaved, and the host costs of each. Writes $OUT/a.tgz.
bash scripts/device_model.sh >/dev/null || exit 3
export PYTHONPATH=/tmp/site:$PWD SPECDEPLOY_CACHE=/tmp/sdcache PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
T=/tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
O=/tmp/o/a; mkdir -p $O
python3 -m pytest -q -p no:cacheprovider tests/test_cuda_runner.py tests/test_fused_kernels.py tests/test_eagle.py \
  tests/test_tree_lossless.py -k "cuda or fused or frontier or topk or ahead or staged or plain_steps" > $O/cuda_tests.log 2>&1
tail -3 $O/cuda_tests.log
rm -rf /tmp/old && mkdir -p /tmp/old && cp -r specdeploy scripts /tmp/old/ && rm -rf /tmp/old/specdeploy/runtime \
  && cp -r .ab/runtime_ac6 /tmp/old/specdeploy/runtime
P="scripts/step_profile.py --target $T --configs none:0,eagle:4 --per-task 1"
prof() { if [ $1 = new ]; then python3 $P --out $O/$2 > $O/$2.log 2>&1
         else (cd /tmp/$1 && PYTHONPATH=/tmp/site:/tmp/$1 python3 $P --out $O/$2 > $O/$2.log 2>&1); fi; }
prof new new1; prof old old1; prof new new2; prof old old2
for f in new1 old1 new2 old2; do echo "$f: $(grep -h '^| eagle:4\|^| none:0' $O/$f/step_profile.md | cut -c1-40 | tr '\n' ' ')"; done
python3 scripts/host_costs.py --target $T --out $O/host_new > $O/host_new.log 2>&1
R=$PWD; (cd /tmp/old && PYTHONPATH=/tmp/site:/tmp/old python3 $R/scripts/host_costs.py --target $T --out $O/host_old > $O/host_old.log 2>&1)
grep -h "^| eagle:4\|^| none" $O/host_new/host_costs.md $O/host_old/host_costs.md
tar -czf $OUT/a.tgz -C /tmp/o a
