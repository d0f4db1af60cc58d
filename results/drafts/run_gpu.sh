#!/usr/bin/env bash
# The GPU runs behind results/drafts/ and the shipped artifacts (specdeploy/models/artifacts/smollm2-*).
# On the device machine, after scripts/device_model.sh put SmolLM2's GGUF in /tmp/smollm2:
#   bash results/drafts/run_gpu.sh train      # data, then the three drafts trained side by side
#   bash results/drafts/run_gpu.sh eval [LABEL...]  # every method (or those named) on the eval prompts, greedy and T=0.7
#   bash results/drafts/run_gpu.sh retrain    # data, EAGLE + DraftLM trained again, their methods evaluated
# The same retrain over several device calls (training outlives the call that starts it):
#   bash results/drafts/run_gpu.sh data; bash results/drafts/run_gpu.sh train-bg eagle draft
#   ... later call: bash results/drafts/run_gpu.sh collect eagle draft   # waits, ships, evaluates
# CONTINUE=1 makes train/train-bg continue the shipped artifacts (`--init`) instead of starting afresh;
# DATA_DIRS="/tmp/distill /tmp/distill5" trains on several data folders (default /tmp/distill).
# Outputs go to $OUT (the device tool's return folder) or /tmp/out. Settings come from the
# environment (defaults below); results/drafts/README.md gives the settings of each shipped run.
set -euo pipefail
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
T=${TARGET:-/tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
DEV=${DEVICE:-cuda}
OUT=${OUT:-/tmp/out}
A=${ARTIFACTS:-/tmp/art}
mkdir -p "$OUT" "$A" /tmp/logs /tmp/res
train() { python -m specdeploy.training.cli "$@"; }  # the train commands alone, not the whole CLI

smoke() {  # tree attention + cache compaction on this transformers version, against plain chains
  python - "$T" "$DEV" <<'PY' 2>&1 | tee /tmp/logs/smoke.log || echo "SMOKE FAILED (trees)"
import sys, torch, transformers
from specdeploy.models.loader import load_model
from specdeploy.runtime.runner import TorchRunner
t = load_model(sys.argv[1], device=sys.argv[2], dtype=torch.bfloat16 if sys.argv[2] == "cuda" else torch.float32)
ids = t.tokenizer("The quick brown fox jumps over the", return_tensors="pt")["input_ids"][0]
r, r2 = TorchRunner(t.model, output_hidden=True), TorchRunner(t.model, output_hidden=True)
r.forward(ids[:-1]); r2.forward(ids[:-1]); base = r.length
tree = r.forward(torch.tensor([int(ids[-1]), 100, 200, 300]), tree_parents=torch.tensor([-1, 0, 0, 2]))
ref = r2.forward(torch.tensor([int(ids[-1]), 200, 300]))
d = (tree.logits[[0, 2, 3]] - ref.logits).abs().max().item()
r.keep_path(base + 1, [base + 2, base + 3])
d2 = (r.forward(torch.tensor([7])).logits - r2.forward(torch.tensor([7])).logits).abs().max().item()
print(f"transformers {transformers.__version__} torch {torch.__version__}: tree vs chain max |dlogit| {d:.3g}, after keep_path {d2:.3g}")
assert d < 0.5 and d2 < 0.5
PY
}

data() {
  train data --target "$T" --device "$DEV" --out /tmp/distill --n-per-task "${N_PER_TASK:-300}" \
    --batch-size "${DATA_BATCH:-500}" ${DATA_ARGS:-} 2>&1 | tee /tmp/logs/data.log
  cp /tmp/distill/manifest.json /tmp/logs/data_manifest.json
  tar czf "$OUT/data.tgz" -C /tmp distill
}

train_side_by_side() {  # kinds...: trained in parallel on the one GPU; CONTINUE=1: from the shipped artifacts
  for kind in "$@"; do
    local init=""
    [ -n "${CONTINUE:-}" ] && init="--init specdeploy/models/artifacts/smollm2-$kind"
    train "$kind" --target "$T" --device "$DEV" --data ${DATA_DIRS:-/tmp/distill} --out "$A/$kind" --minutes "${TRAIN_MINUTES:-4}" \
      --steps "${STEPS:-20000}" $init ${TRAIN_ARGS:-} > "/tmp/logs/train_$kind.log" 2>&1 &
  done
  wait || true
  for kind in "$@"; do grep -a "steps in\|planning" "/tmp/logs/train_$kind.log" || true; done
}

evaluate() {  # labels...: each at T=0 and T=0.7, all in parallel, ending by $DEADLINE s of this script
  local limit=$(( ${DEADLINE:-570} - SECONDS ))
  echo "evaluating $* for at most $limit s"
  job() {  # label temperature args...
    local label=$1 temp=$2; shift 2
    timeout "$limit" python -m specdeploy.training.report run --label "$label" --temperature "$temp" \
      --target "$T" --device "$DEV" --max-new-tokens "${MAX_NEW:-128}" ${EVAL_ARGS:-} \
      --out "/tmp/res/${label}_T$temp.json" "$@" > "/tmp/logs/eval_${label}_T$temp.log" 2>&1 || true
  }
  art() { [ -d "$A/$1" ] && echo --draft "$A/$1"; }  # a draft trained in this session, else the shipped one
  for temp in 0 0.7; do
    for label in "$@"; do
      case $label in
        none) [ "$temp" = 0 ] && job none "$temp" --method none & ;;
        ngram) job ngram "$temp" --method ngram --k 4 & ;;
        layerskip) job layerskip "$temp" --method layerskip --k 4 & ;;
        draft) job draft "$temp" --method draft $(art draft) --k 4 & ;;
        medusa) job medusa "$temp" --method medusa $(art medusa) --k 4 & ;;
        draft-full) job draft-full "$temp" --method draft $(art draft) --k 4 --draft-confidence 0 & ;;  # always k tokens
        medusa-full) job medusa-full "$temp" --method medusa $(art medusa) --k 4 --draft-confidence 0 & ;;  # the whole tree
        eagle) job eagle "$temp" --method eagle $(art eagle) --k 6 & ;;
        eagle-chain) job eagle-chain "$temp" --method eagle $(art eagle) --k 4 --tree-size 0 & ;;
        multi) job multi "$temp" --method multi $(art eagle) --k 6 & ;;
        specinfer) job specinfer "$temp" --method specinfer $(art eagle) --k 6 & ;;
      esac
    done
  done
  wait
  python -m specdeploy.training.report table /tmp/res/*.json --out "$OUT/results"
  tar czf "$OUT/raw.tgz" -C /tmp res logs
}

ship_eval() {  # kinds...: each trained artifact to $OUT as KIND.tgz, then its methods evaluated
  for kind in "$@"; do tar czf "$OUT/$kind.tgz" -C "$A" "$kind" || true; done
  evaluate "$@" $( [[ " $* " == *" eagle "* ]] && echo multi eagle-chain )
}

case $1 in
  train)
    smoke
    data
    train_side_by_side eagle draft medusa
    tar czf "$OUT/draft.tgz" -C "$A" draft || true
    tar czf "$OUT/heads.tgz" -C "$A" medusa eagle || true
    tar czf "$OUT/logs.tgz" -C /tmp logs ;;
  eval)
    shift
    evaluate ${*:-none ngram layerskip draft medusa eagle eagle-chain multi} ;;
  data)
    data ;;
  train-bg)  # detached: runs on after this device call returns; `collect` waits for it
    shift
    rm -f /tmp/logs/train.done
    setsid nohup bash -c "$(declare -f train train_side_by_side); T=$T DEV=$DEV A=$A CONTINUE=${CONTINUE:-} DATA_DIRS='${DATA_DIRS:-}'; train_side_by_side $*; touch /tmp/logs/train.done" \
      > /tmp/logs/train_bg.log 2>&1 < /dev/null &
    echo "training $* in the background (pid $!)" ;;
  collect)
    shift
    while [ ! -f /tmp/logs/train.done ]; do sleep 5; done
    cat /tmp/logs/train_bg.log  # train_side_by_side's summary lines
    ship_eval "$@" ;;
  retrain)
    data
    train_side_by_side eagle draft
    ship_eval eagle draft ;;
esac
