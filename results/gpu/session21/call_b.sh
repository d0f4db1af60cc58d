#!/usr/bin/env bash
# Session 21, device call B (right after call A, same warm machine): waits for the background training, then
# returns the head ($OUT/eagle.tgz) and the training log's last lines ($OUT/train.log).
while [ ! -f /tmp/logs/train.done ]; do sleep 5; done
tr '\r' '\n' < /tmp/logs/train_eagle.log | grep -v "it/s\]$" | grep -v "step/s, reg1" | tail -30 > $OUT/train.log
tail -6 $OUT/train.log
tar czf $OUT/eagle.tgz -C /tmp/art eagle
echo "call B done at $SECONDS s"
