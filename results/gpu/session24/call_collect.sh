#!/usr/bin/env bash
# For a later session (not run), right after session 21's call_train_next.sh on the same warm machine: while the
# head trains, the GPU tests of the level kernels merged from eagle-level-kernels in session 24 (the four files its
# A/B call left unrun; tests time nothing, so sharing the GPU with the training is harmless, at most 420 s), then
# session 21's call_b.sh: waits for the training, returns the head. Then the full bench with that head:
# K=1,2,4,6,8 LIMIT=560 BUDGET=470 bash results/gpu/session19/call_bench.sh.
# Writes $OUT/tests_kernels_cuda.log, $OUT/train.log, $OUT/eagle.tgz.
export PYTHONPATH=/tmp/site:$PWD SPECDEPLOY_CACHE=/tmp/sdcache PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
timeout 420 python3 -m pytest -q -p no:cacheprovider -rs tests/test_fused_kernels.py tests/test_tree_lossless.py \
  tests/test_eagle.py tests/test_cuda_runner.py 2>&1 | tail -15 > $OUT/tests_kernels_cuda.log
tail -3 $OUT/tests_kernels_cuda.log
bash results/gpu/session21/call_b.sh
