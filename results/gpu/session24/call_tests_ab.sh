#!/usr/bin/env bash
# Session 24, the call carrying the last GGUF part (carry .carry/paf, .whl, .ab): main's batched-engine tests on
# CUDA first (tests/test_batch.py and the batched sampling tests: CUDA graphs against eager for n-gram, draft
# and EAGLE chains, fresh randoms at each graph replay; at most 180 s), then the eagle-level-kernels A/B
# (session 21's call_eagle_ab2.sh: step profiles of none:0, eagle:6 and eagle:6:127, branch and main
# alternately, each run started before STOP_AFTER s). Writes $OUT/tests_batch_cuda.log, $OUT/eagle_ab.tgz.
bash scripts/device_model.sh >/dev/null || exit 3
export SPECDEPLOY_CACHE=/tmp/sdcache PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
PYTHONPATH=/tmp/site:$PWD timeout 180 python3 -m pytest -q -p no:cacheprovider -rs tests/test_batch.py \
  tests/test_sampling_distribution.py 2>&1 | tail -25 > $OUT/tests_batch_cuda.log
echo "main's batch tests on CUDA:"; tail -3 $OUT/tests_batch_cuda.log
PROFILES_FIRST=1 STOP_AFTER=${STOP_AFTER:-200} TESTS_UNTIL=0 CONFIGS=none:0,eagle:6,eagle:6:127 \
  bash results/gpu/session20/call_eagle_ab.sh
