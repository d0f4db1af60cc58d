#!/usr/bin/env bash
# Serve SmolLM2 through the real tritonserver on the GPU machine and time it against the
# in-process engine (`specdeploy latency`). Run from the repository root:
#
#   scripts/triton_gpu_run.sh [--cpu] [OUTDIR]        (OUTDIR default: $OUT, else results/triton_gpu/out)
#
# What it expects (see results/triton_gpu/README.md for the device calls that provide it):
#   $SD_MODEL            the GGUF (default /tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf, made by
#                        scripts/device_model.sh in the two calls before this one)
#   $SD_TRITON_TAR       pytriton/tritonserver + nvidia_pytriton.libs packed from a venv
#                        (default .carry/triton/tritonserver.tar.xz); skipped if SPECDEPLOY_TRITONSERVER is set
#   $SD_NP_WHEELS        folder with a numpy<2 wheel for the models' Python (default .carry/np), installed to $SD_NP1
#   $SD_CLIENT_WHEELS    tritonclient + missing deps (default .carry/tw), installed to /tmp/site
#   PYTHONPATH           must hold /tmp/site (the gguf wheel, tritonclient) and the repo root
#   $SD_DTYPE            float32 | bfloat16 | float16 for `specdeploy repo --dtype` (default: bfloat16 on the
#                        GPU, float32 on the CPU); float32 is the one whose outputs match in-process exactly
#   $SD_MAX_TOKENS, $SD_REPEATS (32, 2); $SD_HIDE_SCIPY=1 hides scipy/sklearn from the models even where they import
# --cpu rehearses the same steps with the models and the in-process engine on the CPU (float32).
set -euo pipefail

MODE=gpu
if [ "${1:-}" = "--cpu" ]; then MODE=cpu; shift; fi
OUTDIR=${1:-${OUT:-results/triton_gpu/out}}
PY=${PYTHON:-python3}
WORK=${SD_WORK:-/tmp/sdtriton}
MODEL=${SD_MODEL:-/tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
TRITON_TAR=${SD_TRITON_TAR:-.carry/triton/tritonserver.tar.xz}
NP_WHEELS=${SD_NP_WHEELS:-.carry/np}
NP1=${SD_NP1:-/tmp/np1}
CLIENT_WHEELS=${SD_CLIENT_WHEELS:-.carry/tw}
SITE=${SD_SITE:-/tmp/site}
MAX_TOKENS=${SD_MAX_TOKENS:-32}
REPEATS=${SD_REPEATS:-2}
export PYTHONUNBUFFERED=1 SPECDEPLOY_CACHE=${SPECDEPLOY_CACHE:-/tmp/sdcache}
mkdir -p "$OUTDIR" "$WORK/tmp"
# the server log goes to a mkstemp file: keep it in $WORK/tmp so that it can be copied out
export TMPDIR="$WORK/tmp"

sd() { "$PY" -c 'import sys; from specdeploy.cli import main; sys.exit(main(sys.argv[1:]))' "$@"; }
step() { echo "== $(date +%T) $*"; }
t0=$(date +%s)
[ -f "$MODEL" ] || { echo "no model at $MODEL (scripts/device_model.sh makes it)"; exit 1; }

step "1. tritonserver"
if [ -z "${SPECDEPLOY_TRITONSERVER:-}" ]; then
  if [ ! -x "$WORK/triton/pytriton/tritonserver/bin/tritonserver" ]; then
    mkdir -p "$WORK/triton"
    tar -C "$WORK/triton" -xJf "$TRITON_TAR"
  fi
  export SPECDEPLOY_TRITONSERVER="$WORK/triton/pytriton/tritonserver"
fi
echo "SPECDEPLOY_TRITONSERVER=$SPECDEPLOY_TRITONSERVER"

step "2. numpy<2 for the models' Python, client wheels"
if [ ! -d "$NP1/numpy" ] && ls "$NP_WHEELS"/numpy-*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$NP1" "$NP_WHEELS"/numpy-*.whl
fi
if ls "$CLIENT_WHEELS"/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$CLIENT_WHEELS"/*.whl
fi
[ -d "$NP1/numpy" ] || { echo "no numpy<2 at $NP1 (numpy 2 corrupts the stub's tensors)"; exit 1; }
# The GPU machine's scipy (and so sklearn) is built for numpy 2 and fails beside numpy 1.26
# (`np.long`), and transformers 5.17 imports sklearn whenever it finds it. Where that import
# fails, hide both from the models' Python: a .pth in $NP1 (the models call site.addsitedir on
# it) sets sys.modules[...] = None, so importlib.util.find_spec reports them missing.
rm -f "$NP1/specdeploy_hide.pth" "$NP1/specdeploy_hide.py"
if [ -n "${SD_HIDE_SCIPY:-}" ] || ! "$PY" -c "import sys; sys.path[:0] = ['$NP1']; import scipy.sparse" >/dev/null 2>&1; then
  printf 'import sys\nfor _m in ("scipy", "sklearn"):\n    sys.modules.setdefault(_m, None)\n' > "$NP1/specdeploy_hide.py"
  echo "import specdeploy_hide" > "$NP1/specdeploy_hide.pth"
  echo "scipy does not import beside numpy<2: hidden from the models (scipy, sklearn)"
fi

step "3. environment"
{
  "$PY" - <<'EOF'
import platform, sys
import numpy, torch, transformers, tritonclient, grpc, google.protobuf as pb
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
print("transformers", transformers.__version__, "numpy (client)", numpy.__version__)
print("tritonclient", getattr(tritonclient, "__version__", "?"), "grpcio", grpc.__version__, "protobuf", pb.__version__)
EOF
  "$PY" -c "import sys; sys.path[:0] = ['$NP1']; import numpy; print('numpy (models)', numpy.__version__, numpy.__file__)"
  if [ "$MODE" = gpu ]; then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true; fi
  sha256sum "$MODEL"
} 2>&1 | tee "$OUTDIR/env.txt"

step "4. model repository"
if [ "$MODE" = gpu ]; then KIND=(--instance-kind gpu --gpus 0); DEVICE=cuda; else KIND=(--instance-kind cpu); DEVICE=cpu; fi
rm -rf "$WORK/repo"
sd repo --target "$MODEL" --method ngram --k 4 "${KIND[@]}" ${SD_DTYPE:+--dtype "$SD_DTYPE"} \
  --python-path "$NP1" --python-path "$SITE" --out "$WORK/repo"
cp "$WORK/repo/specdeploy_repo.json" "$OUTDIR/specdeploy_repo.json"
grep -A3 instance_group "$WORK/repo/verify/config.pbtxt" || true

step "5. latency: in-process ($DEVICE) vs tritonserver (HTTP, gRPC, gRPC stream)"
rm -f "$WORK"/tmp/tritonserver-*.log
rc=0
sd latency --repo "$WORK/repo" --device "$DEVICE" --max-tokens "$MAX_TOKENS" --repeats "$REPEATS" --json \
  > "$OUTDIR/latency.jsonl" || rc=$?
for f in "$WORK"/tmp/tritonserver-*.log; do [ -f "$f" ] && cp "$f" "$OUTDIR/tritonserver.log"; done
cat "$OUTDIR/latency.jsonl"
"$PY" - "$OUTDIR" "$MODE" "$DEVICE" "$MAX_TOKENS" "$REPEATS" <<'EOF'
import json, sys
from pathlib import Path
out, mode, device, max_tokens, repeats = sys.argv[1:]
rows = [json.loads(l) for l in Path(out, "latency.jsonl").read_text().splitlines() if l.strip()]
env = Path(out, "env.txt").read_text()
Path(out, "latency.json").write_text(json.dumps(
    {"mode": mode, "device": device, "max_tokens": int(max_tokens), "repeats": int(repeats),
     "method": "ngram", "k": 4, "env": env.splitlines(), "rows": rows}, indent=2) + "\n")
f = lambda v, fmt: "-" if v is None else format(v, fmt)
lines = ["| path | requests | tokens | ms/request | ms/token | overhead ms/token | first piece ms | diff |",
         "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
for r in rows:
    lines.append(f"| {r['path']} | {r['requests']} | {r['tokens']} | {r['mean_ms']:.1f} | {r['ms_per_token']:.2f} | "
                 f"{f(r['overhead_ms_per_token'], '+.2f')} | {f(r['first_piece_ms'], '.1f')} | {r['mismatches']} |")
Path(out, "latency.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
step "done in $(( $(date +%s) - t0 )) s (latency exit code $rc)"
exit $rc
