#!/usr/bin/env bash
# For a later session (not run): session 20's call_eagle_ab.sh reordered after session 21's attempt, whose branch
# tests used up their 240 s before any profile ran. Branch eagle-level-kernels against this tree: step profiles
# first, alternately (none:0, eagle:4, eagle:6; per-step times and the EAGLE draft graphs' GPU times), each tree
# twice while SECONDS < PROFILE_UNTIL; then the branch's CUDA and fused-kernel tests, stopping at the first
# failure, for what is left of TESTS_UNTIL. Before the call, on the CPU machine:
#   mkdir -p .ab/eagle && git archive eagle-level-kernels specdeploy/runtime tests | tar x -C .ab/eagle   (carry .ab)
# Writes $OUT/eagle_ab.tgz.
bash scripts/device_model.sh >/dev/null || exit 3
export SPECDEPLOY_CACHE=/tmp/sdcache PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
T=/tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
rm -rf /tmp/newtree /tmp/o && mkdir -p /tmp/o /tmp/newtree && cp -r specdeploy scripts /tmp/newtree/ \
  && rm -rf /tmp/newtree/specdeploy/runtime && cp -r .ab/eagle/specdeploy/runtime /tmp/newtree/specdeploy/ \
  && cp -r .ab/eagle/tests /tmp/newtree/ || exit 4
i=0
for tree in /tmp/newtree $PWD /tmp/newtree $PWD; do
  i=$((i + 1))
  [ $SECONDS -gt ${PROFILE_UNTIL:-240} ] && break
  name=run${i}_$([ $tree = $PWD ] && echo main || echo branch)
  (cd $tree && PYTHONPATH=/tmp/site:$tree timeout 120 python3 scripts/step_profile.py --target $T --out /tmp/o/$name \
    --configs none:0,eagle:4,eagle:6 --per-task 1 > /tmp/o/$name.log 2>&1)
  echo "$name at $SECONDS s"; head -5 /tmp/o/$name/step_profile.md 2>/dev/null || tail -3 /tmp/o/$name.log
done
left=$(( ${TESTS_UNTIL:-540} - SECONDS ))
(cd /tmp/newtree && PYTHONPATH=/tmp/site:/tmp/newtree timeout $left python3 -m pytest -x -q -p no:cacheprovider \
  tests/test_fused_kernels.py tests/test_eagle.py tests/test_tree_lossless.py tests/test_cuda_runner.py 2>&1 | tail -5) > /tmp/o/tests_branch.log
echo "branch tests (at most $left s):"; cat /tmp/o/tests_branch.log
tar czf $OUT/eagle_ab.tgz -C /tmp/o .
