#!/usr/bin/env bash
# For a later session (not run), right after call_train_next.sh on the same warm machine: while the head trains,
# the eagle-level-kernels branch's GPU tests (the four files of session 20's call_eagle_ab.sh, all of them, at most
# 420 s) run from the /tmp/newtree that call_eagle_ab2.sh left: tests time nothing, so sharing the GPU with the
# training is harmless. Then as call_b.sh: waits for the training, returns the head and the log's last lines.
# Writes $OUT/tests_branch.log, $OUT/train.log, $OUT/eagle.tgz.
[ -d /tmp/newtree/tests ] && (cd /tmp/newtree && PYTHONPATH=/tmp/site:/tmp/newtree SPECDEPLOY_CACHE=/tmp/sdcache timeout 420 \
  python3 -m pytest -q -p no:cacheprovider tests/test_fused_kernels.py tests/test_tree_lossless.py tests/test_eagle.py \
  tests/test_cuda_runner.py 2>&1 | tail -15) > $OUT/tests_branch.log
tail -3 $OUT/tests_branch.log
bash results/gpu/session21/call_b.sh
