#!/usr/bin/env bash
# Session 20's plan for a later session, device call E (not run: no machine was lent): branch eagle-level-kernels
# (commit 263bc5a: an EAGLE tree level in 11 launches, was 16) against this tree, alternately. Before the call,
# on the CPU machine: mkdir -p .ab/eagle && git archive eagle-level-kernels specdeploy/runtime tests | tar x -C .ab/eagle
# (carry .ab). First the branch's CUDA and fused-kernel tests (TESTS_S seconds at most), then scripts/step_profile.py
# ($CONFIGS; per-step times and the EAGLE draft graphs' GPU times) for each tree, twice, each run started before
# STOP_AFTER s. PROFILES_FIRST=1 swaps the two parts: the tests then stop at the first failure and get what is left
# of TESTS_UNTIL s (0: no tests; session 21's call_eagle_ab2.sh). Writes $OUT/eagle_ab.tgz.
bash scripts/device_model.sh >/dev/null || exit 3
export SPECDEPLOY_CACHE=/tmp/sdcache PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
T=/tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
rm -rf /tmp/newtree && mkdir -p /tmp/o /tmp/newtree && cp -r specdeploy scripts tests /tmp/newtree/ \
  && rm -rf /tmp/newtree/specdeploy/runtime /tmp/newtree/tests && cp -r .ab/eagle/specdeploy/runtime /tmp/newtree/specdeploy/ \
  && cp -r .ab/eagle/tests /tmp/newtree/ || exit 4
branch_tests() {  # seconds [pytest options]
  (cd /tmp/newtree && PYTHONPATH=/tmp/site:/tmp/newtree timeout $1 python3 -m pytest -q -p no:cacheprovider ${@:2} \
    tests/test_fused_kernels.py tests/test_tree_lossless.py tests/test_eagle.py tests/test_cuda_runner.py 2>&1 | tail -3) > /tmp/o/tests_new.log
  echo "branch tests (at most $1 s):"; cat /tmp/o/tests_new.log
}
[ -z "$PROFILES_FIRST" ] && branch_tests ${TESTS_S:-240}
i=0
for tree in /tmp/newtree $PWD /tmp/newtree $PWD; do
  i=$((i + 1))
  [ $SECONDS -gt ${STOP_AFTER:-420} ] && break
  name=run${i}_$([ $tree = $PWD ] && echo main || echo branch)
  (cd $tree && PYTHONPATH=/tmp/site:$tree timeout 150 python3 scripts/step_profile.py --target $T --out /tmp/o/$name \
    --configs ${CONFIGS:-none:0,eagle:4,eagle:8} --per-task 1 > /tmp/o/$name.log 2>&1)
  echo "$name at $SECONDS s"; head -6 /tmp/o/$name/step_profile.md 2>/dev/null || tail -3 /tmp/o/$name.log
done
left=$(( ${TESTS_UNTIL:-540} - SECONDS )); [ $left -lt 30 ] && left=30
[ -n "$PROFILES_FIRST" ] && [ "${TESTS_UNTIL:-540}" -gt 0 ] && branch_tests $left -x
tar czf $OUT/eagle_ab.tgz -C /tmp/o .
