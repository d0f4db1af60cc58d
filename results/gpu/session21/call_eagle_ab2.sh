#!/usr/bin/env bash
# For a later session (not run): session 20's call_eagle_ab.sh reordered after session 21's attempt, whose branch
# tests used up their 240 s before any profile ran: step profiles only (none:0, eagle:6 at 63 and at 127 nodes; session 22
# put eagle:6:127 in place of eagle:4, which no decision needs), each tree twice
# while under 240 s (at most ~360 s). The branch's GPU tests take longer than that, and time nothing: they run
# during the next training (call_collect_next.sh), from the /tmp/newtree this call leaves. Carry .ab as that
# script's header says. Writes $OUT/eagle_ab.tgz.
PROFILES_FIRST=1 STOP_AFTER=240 TESTS_UNTIL=0 CONFIGS=none:0,eagle:6,eagle:6:127 bash results/gpu/session20/call_eagle_ab.sh
