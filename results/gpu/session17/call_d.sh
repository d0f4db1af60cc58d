#!/usr/bin/env bash
# Session 17, device call D (after the GGUF parts were carried; carries .ab/runtime_2f8 = commit 2f80945's
# runtime): CUDA tests of the sampled device verdict and the ancestry / select kernels; step profiles of this
# tree (new) against 2f80945's runtime (old), one each; then a reduced bench of this tree: plain, eagle k=4
# and the advisor's policy, T=0.7, batch 1, no peers. Writes $OUT/d.tgz.
bash scripts/device_model.sh >/dev/null || exit 3
export PYTHONPATH=/tmp/site:$PWD SPECDEPLOY_CACHE=/tmp/sdcache PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
T=/tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
O=/tmp/o/d; mkdir -p $O/bench
python3 -m pytest -q -p no:cacheprovider tests/test_cuda_runner.py tests/test_eagle.py tests/test_tree_lossless.py \
  tests/test_fused_kernels.py -k "device_verdict or ancestry or best_nodes or ahead or fused_graph_eagle or cuda_graphs_equals" \
  > $O/cuda_tests.log 2>&1
tail -2 $O/cuda_tests.log
rm -rf /tmp/old && mkdir -p /tmp/old && cp -r specdeploy scripts /tmp/old/ && rm -rf /tmp/old/specdeploy/runtime \
  && cp -r .ab/runtime_2f8 /tmp/old/specdeploy/runtime
P="scripts/step_profile.py --target $T --configs none:0,eagle:4 --per-task 1"
prof() { if [ $1 = new ]; then python3 $P --out $O/$2 > $O/$2.log 2>&1
         else (cd /tmp/$1 && PYTHONPATH=/tmp/site:/tmp/$1 python3 $P --out $O/$2 > $O/$2.log 2>&1); fi; }
prof new new1; prof old old1
for f in new1 old1; do echo "$f: $(grep -h '^| eagle:4\|^| none:0' $O/$f/step_profile.md | cut -c1-40 | tr '\n' ' ')"; done
timeout -s INT ${LIMIT:-150} python3 -m specdeploy.bench.run --prompts eval --prompts-per-task 3 \
  --methods none,eagle,policy --k 4 --temperature 0.7 --batch 1 --policy-min-speedup 1.1 --target $T \
  --device cuda --max-new-tokens 128 --time-budget ${BUDGET:-120} --out $O/bench 2>&1 | grep -v "it/s\]$" > $O/bench/log.txt
grep -A14 "temperature 0.7: speedup" $O/bench/bench.md | tail -12
tar -czf $OUT/d.tgz -C /tmp/o d
