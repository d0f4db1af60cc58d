#!/usr/bin/env bash
# For a later session (not run): session 20's call_eagle_ab.sh reordered after session 21's attempt, whose branch
# tests used up their 240 s before any profile ran: step profiles first (none:0, eagle:4, eagle:6), each tree twice
# while under 240 s, then the branch's tests, stopping at the first failure, until 540 s. Carry .ab as that
# script's header says. Writes $OUT/eagle_ab.tgz.
PROFILES_FIRST=1 STOP_AFTER=240 TESTS_UNTIL=540 CONFIGS=none:0,eagle:4,eagle:6 bash results/gpu/session20/call_eagle_ab.sh
