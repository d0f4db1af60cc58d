#!/usr/bin/env bash
# Session 29, right after the greedy full bench at 256 new tokens (session17/call_c.sh with TEMPS=0): the T=0.7 rows
# (session28/call_t07.sh: plain, EAGLE k 4 / 6 / 8, the advised policy; batch 1, 8, 32) at 256 new tokens, then the
# float32 CUDA-graph lossless tests of the trees, last run on the GPU at session 25's code (before the draft
# vocabularies). Writes $OUT/bench_t07.tgz and $OUT/tests_cuda.log.
TOKENS=256 LIMIT=${LIMIT:-300} BUDGET=${BUDGET:-240} bash results/gpu/session28/call_t07.sh
export PYTHONPATH=/tmp/site:$PWD SPECDEPLOY_CACHE=/tmp/sdcache PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/tests_cuda.log
timeout ${TESTS_S:-200} python3 -m pytest -q -p no:cacheprovider -rs tests/test_tree_lossless.py -k cuda \
  tests/test_eagle.py::test_graph_eagle_replay_matches_eager_on_cuda 2>&1 | tail -8 >> $OUT/tests_cuda.log
tail -4 $OUT/tests_cuda.log
