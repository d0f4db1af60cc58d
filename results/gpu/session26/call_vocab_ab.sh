#!/usr/bin/env bash
# For a device session (not run yet): the shipped drafts' draft vocabulary (FR-Spec, session 26) against the whole
# vocabulary, on the GPU. Needs the GGUF at /tmp/smollm2 (scripts/device_model.sh first). ~420 s.
# 1. The CUDA tests of the kernels it touches: logits_topk's id map, the fused EAGLE drafter with a draft vocabulary,
#    graph replay against eager; the batched engine's sampling in CUDA graphs with and without a draft vocabulary
#    (chi-square; tests_vocab_cuda.log).
# 2. step_profile.py alternately with the shipped artifact (15,570-id draft vocabulary) and a copy without it (the
#    same weights), twice each: EAGLE (none:0, eagle:4, eagle:8; also the GPU ms of a depth-4 draft), then the
#    DraftLM (draft:4). Writes $OUT/vocab_ab/{tests_vocab_cuda.log,<method>_{vocab,whole}{1,2}/}.
set -u
export PYTHONPATH=/tmp/site:$PWD SPECDEPLOY_CACHE=/tmp/sdcache PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
O=$OUT/vocab_ab
mkdir -p $O
nvidia-smi --query-gpu=name --format=csv,noheader | tee $O/tests_vocab_cuda.log
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_fused_kernels.py -k "logits_topk or graph_eagle" \
  tests/test_eagle.py::test_graph_eagle_replay_matches_eager_on_cuda 2>&1 | tail -5 >> $O/tests_vocab_cuda.log
timeout 120 python3 -m pytest -q -p no:cacheprovider \
  tests/test_sampling_distribution.py::test_batched_sampling_in_cuda_graphs_matches_target 2>&1 | tail -5 >> $O/tests_vocab_cuda.log
python3 - <<'PY'
import shutil
from safetensors.torch import load_file, save_file
for kind in ("eagle", "draft"):
    src, dst = f"specdeploy/models/artifacts/smollm2-{kind}", f"/tmp/whole_{kind}"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    w = load_file(f"{dst}/weights.safetensors")
    print(kind, "draft vocabulary removed:", w.pop("draft_vocab").numel(), "ids")
    save_file(w, f"{dst}/weights.safetensors")
PY
T=/tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
for m in eagle draft; do
  C=none:0,eagle:4,eagle:8; [[ $m == draft ]] && C=draft:4
  for run in vocab1 whole1 vocab2 whole2; do
    extra=""; [[ $run == whole* ]] && extra="--draft /tmp/whole_$m"
    timeout 150 python3 scripts/step_profile.py --target $T --out $O/${m}_$run --configs $C --per-task 1 $extra \
      > $O/${m}_$run.log 2>&1
    echo "$m $run"; grep -E "tok/s|EAGLE draft depth" $O/${m}_$run.log | head -8
  done
done
