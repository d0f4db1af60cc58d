"""SequenceCaches: the served side of TritonRunner, one TorchRunner (KV cache) per sequence.

Used by the `verify` and `draft` models; pure torch, so tests drive it in-process too.
Caches are evicted oldest-first past `max_sequences`, so a client that never releases
cannot exhaust memory; a step for an evicted or unknown sequence is an error.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import torch
from transformers import PreTrainedModel

from specdeploy.runtime.runner import TorchRunner
from specdeploy.triton_repo.runner import RESET, KVRequest


class SequenceCaches:
    def __init__(self, model: PreTrainedModel, max_sequences: int = 256) -> None:
        self.model = model
        self.max_sequences = max_sequences
        self.vocab_size = int(model.config.vocab_size)
        self._runners: OrderedDict[int, TorchRunner] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._runners)

    def step(self, req: KVRequest) -> np.ndarray:
        """Apply `keep`, append `tokens`, then free the cache if `release`; logits [m, vocab] float32."""
        with self._lock:
            if req.keep == RESET:
                runner = self._runners.pop(req.sequence_id, None) or TorchRunner(self.model)
                runner.reset()
                self._runners[req.sequence_id] = runner
                while len(self._runners) > self.max_sequences:
                    self._runners.popitem(last=False)
            else:
                runner = self._runners.get(req.sequence_id)
                if runner is None:
                    if req.release and req.tokens.size == 0:  # ending a sequence already gone: nothing to do
                        return np.zeros((0, self.vocab_size), dtype=np.float32)
                    raise KeyError(f"unknown sequence_id {req.sequence_id} (never started with keep=-1, released or evicted)")
                self._runners.move_to_end(req.sequence_id)
                if req.keep > runner.length:
                    raise ValueError(f"sequence {req.sequence_id}: keep={req.keep} but the cache holds {runner.length} entries")
                runner.rollback(req.keep)
            if req.release:
                self._runners.pop(req.sequence_id, None)
        if req.tokens.size == 0:
            return np.zeros((0, self.vocab_size), dtype=np.float32)
        step = runner.forward(torch.from_numpy(np.ascontiguousarray(req.tokens, dtype=np.int64)))
        return step.logits.float().cpu().numpy()
