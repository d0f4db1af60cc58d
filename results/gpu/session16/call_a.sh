#!/usr/bin/env bash
# Session 16, device call A (after the GGUF parts paa..pac were carried): the CUDA tests of the fused
# kernels and EAGLE drafting; step profiles of this tree (new) against 7d5b954's runtime (old:
# .ab/runtime_old) and 7061f69's (mid: the loop reorder of ea00d1c without eagle_frontier,
# .ab/runtime_mid), interleaved. Writes $OUT/a.tgz.
bash scripts/device_model.sh >/dev/null || exit 3
export PYTHONPATH=/tmp/site:$PWD SPECDEPLOY_CACHE=/tmp/sdcache PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
T=/tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
O=/tmp/o/a; mkdir -p $O
python3 -m pytest -q -x -p no:cacheprovider tests/test_fused_kernels.py tests/test_eagle.py -k "cuda or fused or frontier or topk" > $O/cuda_tests.log 2>&1
tail -2 $O/cuda_tests.log
for v in old mid; do
  rm -rf /tmp/$v && mkdir -p /tmp/$v && cp -r specdeploy scripts /tmp/$v/
  rm -rf /tmp/$v/specdeploy/runtime && cp -r .ab/runtime_$v /tmp/$v/specdeploy/runtime
done
P="scripts/step_profile.py --target $T --configs none:0,eagle:4 --per-task 1"
prof() { if [ $1 = new ]; then python3 $P --out $O/$2 > $O/$2.log 2>&1
         else (cd /tmp/$1 && PYTHONPATH=/tmp/site:/tmp/$1 python3 $P --out $O/$2 > $O/$2.log 2>&1); fi; }
prof new new1; prof old old1; prof mid mid1; prof new new2
for f in new1 old1 mid1 new2; do echo "$f: $(grep -h '^eagle:4\|^none:0' $O/$f.log | cut -c1-60 | tr '\n' ' ')"; done
tar -czf $OUT/a.tgz -C /tmp/o a
