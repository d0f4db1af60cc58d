#!/usr/bin/env bash
# For a device session (not run yet): the EAGLE head's draft vocabulary (FR-Spec, session 26) against the whole
# vocabulary, on the GPU. Needs the GGUF at /tmp/smollm2 (scripts/device_model.sh first). ~300 s.
# 1. The CUDA tests of the kernels it touches: logits_topk's id map, the fused EAGLE drafter with a draft vocabulary,
#    graph replay against eager (tests_vocab_cuda.log).
# 2. step_profile.py alternately with the shipped head (15,570-id draft vocabulary) and the same head without it
#    (/tmp/eagle_whole: the same weights), twice each: ms a step, acceptance length, and the GPU ms of a depth-4 draft.
# Writes $OUT/vocab_ab/{tests_vocab_cuda.log,vocab1,whole1,vocab2,whole2}.
set -u
export PYTHONPATH=/tmp/site:$PWD SPECDEPLOY_CACHE=/tmp/sdcache PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
O=$OUT/vocab_ab
mkdir -p $O
nvidia-smi --query-gpu=name --format=csv,noheader | tee $O/tests_vocab_cuda.log
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_fused_kernels.py -k "logits_topk or graph_eagle" \
  tests/test_eagle.py::test_graph_eagle_replay_matches_eager_on_cuda 2>&1 | tail -5 >> $O/tests_vocab_cuda.log
python3 - <<'PY'
import shutil
from safetensors.torch import load_file, save_file
src, dst = "specdeploy/models/artifacts/smollm2-eagle", "/tmp/eagle_whole"
shutil.rmtree(dst, ignore_errors=True)
shutil.copytree(src, dst)
w = load_file(f"{dst}/weights.safetensors")
print("draft vocabulary removed:", w.pop("draft_vocab").numel(), "ids")
save_file(w, f"{dst}/weights.safetensors")
PY
T=/tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
C=${CONFIGS:-none:0,eagle:4,eagle:8}
for run in vocab1 whole1 vocab2 whole2; do
  extra=""; [[ $run == whole* ]] && extra="--draft /tmp/eagle_whole"
  timeout 150 python3 scripts/step_profile.py --target $T --out $O/$run --configs $C --per-task 1 $extra > $O/$run.log 2>&1
  grep -E "tok/s|EAGLE draft depth" $O/$run.log | head -8
done
