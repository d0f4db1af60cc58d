#!/usr/bin/env bash
# Session 28, after the full bench (results/bench, whose 470 s budget ran out before its T=0.7 policy row and batched
# T=0.7 rows): the full bench's call (session17/call_c.sh) at T=0.7 alone, for plain, EAGLE at k 4 / 6 / 8 and the
# advised policy, no HF peers (TOKENS new tokens, 128 by default). After the GGUF parts on a warm machine; writes
# $OUT/bench_t07.tgz.
NAME=bench_t07 METHODS=none,eagle,policy K=4,6,8 TEMPS=0.7 PEERS= LIMIT=${LIMIT:-330} BUDGET=${BUDGET:-270} \
  exec bash results/gpu/session17/call_c.sh
