#!/usr/bin/env bash
# Session 25: the CUDA-only tests that session 24's call_collect.sh left unrun (its 420 s timeout stopped pytest in
# test_eagle.py, whose real-model tests run on the CPU beside the training). No GGUF needed: the tests deselected
# here load the real model on the CPU, as CI does. Writes $OUT/tests_cuda_only.log.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/tests_cuda_only.log
timeout ${TESTS_S:-150} python3 -m pytest -q -p no:cacheprovider -rs tests/test_eagle.py::test_graph_eagle_replay_matches_eager_on_cuda \
  tests/test_cuda_runner.py --deselect tests/test_cuda_runner.py::test_smollm2_compiled_runner_matches_hf \
  --deselect tests/test_cuda_runner.py::test_engine_with_compiled_runner_matches_eager_engine \
  --deselect tests/test_cuda_runner.py::test_tree_forward_and_keep_path_match_torch_runner 2>&1 | tail -15 >> $OUT/tests_cuda_only.log
tail -4 $OUT/tests_cuda_only.log
