#!/usr/bin/env bash
# Session 19, device call B (right after call_train.sh, same warm machine): the full bench with the head that
# call trained (/tmp/art/eagle) in place of the shipped one. Writes $OUT/bench.tgz.
[ -f /tmp/art/eagle/weights.safetensors ] || { echo "no trained head on this machine"; exit 3; }
rm -rf specdeploy/models/artifacts/smollm2-eagle && cp -r /tmp/art/eagle specdeploy/models/artifacts/smollm2-eagle
LIMIT=${LIMIT:-540} BUDGET=${BUDGET:-430} bash results/gpu/session17/call_c.sh
