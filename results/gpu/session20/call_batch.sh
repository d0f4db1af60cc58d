#!/usr/bin/env bash
# Session 20, device call D (after the GGUF parts were carried; not run: no machine was lent): a DraftLM joining
# while the batched engine decodes plain is no longer prefilled (this tree) against 1611c76's batch.py
# (`.ab/batch_1611c76.py`, carried: `git show 1611c76:specdeploy/runtime/batch.py`) in a copy of this tree,
# alternately, through session 19's A/B harness: the bench's batch-32 rows (none, ngram and the DraftLM at k=4,
# switch on and auto; each speculative row now paired pass by pass with a plain engine), three passes each;
# first tests/test_batch.py on the GPU. Writes $OUT/batch2.tgz.
OLD_BATCH=.ab/batch_1611c76.py STOP_AFTER=${STOP_AFTER:-240} bash results/gpu/session19/call_batch2.sh
