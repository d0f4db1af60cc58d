#!/usr/bin/env bash
# Session 29, after 9ffff83 (the advisor scales L(k) by what the timing prompts' runs at k measured): the EAGLE and
# policy rows at T=0.7 and greedy (plain, EAGLE k 4 / 6 / 8, the policy; batch 1, 8, 32; 256 new tokens), each its
# own run through session17/call_c.sh, to set the new advisor's policy beside EAGLE at fixed k on the same machine.
# After the GGUF parts on a warm machine; writes $OUT/t07_advisor.tgz and $OUT/t0_advisor.tgz.
for t in 0.7 0; do
  NAME=t${t/./}_advisor METHODS=none,eagle,policy K=4,6,8 TEMPS=$t PEERS= TOKENS=256 LIMIT=${LIMIT:-200} BUDGET=${BUDGET:-160} \
    bash results/gpu/session17/call_c.sh
done
