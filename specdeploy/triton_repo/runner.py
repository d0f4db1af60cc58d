"""TritonRunner: the Runner protocol over BLS calls to a served `verify` or `draft` model.

The served model keeps one KV cache per sequence. Each `forward` is one BLS request
carrying the tokens and `keep`, the number of cache entries to keep first: the runner's
pending `reset()` or `rollback(keep)` travels with the next forward instead of costing a
call of its own. `release()` frees the served cache.

The sequence is a Triton sequence (the models use the sequence batcher, see
`pbtxt.sequence_batching`): the request's correlation ID is the sequence id, its first
request carries the SEQUENCE_START flag (keep = RESET) and `release()` the SEQUENCE_END
flag, so Triton routes all of a sequence's steps to the model instance holding its cache.

    request  correlation_id = sequence id, flags START/END; tokens INT64 [m], keep INT64 [1]
             (the model sees the flags and the id as its START, END, CORRID control inputs)
    response logits FP32 [m, vocab]

The transport is a callable, so the same runner runs in-process in tests (`LocalTransport`).
"""
from __future__ import annotations

import itertools
import os
import random
import threading
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch

from specdeploy.runtime.types import Step

RESET = -1  # `keep` value that starts a new sequence


@dataclass(frozen=True)
class KVRequest:
    """One call to a served runner model."""

    sequence_id: int  # the Triton correlation ID
    tokens: np.ndarray  # [m] int64
    keep: int  # cache entries to keep before appending; RESET = new sequence (SEQUENCE_START)
    release: bool = False  # free the cache after this request (SEQUENCE_END)

    @classmethod
    def dummy(cls) -> "KVRequest":
        return cls(sequence_id=0, tokens=np.zeros(1, dtype=np.int64), keep=RESET)


class Transport(Protocol):
    def __call__(self, model: str, request: KVRequest) -> np.ndarray:  # -> logits [m, vocab] float32
        ...


_ids = itertools.count(1)
_ids_lock = threading.Lock()
_id_base = (os.getpid() & 0xFFFF) << 40 | random.getrandbits(16) << 24


def new_sequence_id() -> int:
    """Unique across this process's requests (and, with high odds, across instances)."""
    with _ids_lock:
        return _id_base | (next(_ids) & 0xFFFFFF)


class TritonRunner:
    """A served model's KV cache, driven through `transport` (BLS inside the stub)."""

    def __init__(self, model: str, vocab_size: int, max_length: int, transport: Transport | None = None,
                 sequence_id: int | None = None) -> None:
        self.model = model
        self.device = torch.device("cpu")  # logits arrive as host memory
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.transport = transport or bls_transport
        self.sequence_id = new_sequence_id() if sequence_id is None else sequence_id
        self._length = 0
        self._keep: int | None = RESET  # what the next forward asks the server to keep first
        self._opened = False  # the server holds a cache for this sequence

    @property
    def length(self) -> int:
        return self._length

    def reset(self) -> None:
        self._length = 0
        # a sequence starts once: a reset after the first forward keeps 0 entries of the same one
        self._keep = 0 if self._opened else RESET

    def forward(self, tokens: torch.Tensor) -> Step:  # tokens: [m] int64
        m = int(tokens.numel())
        if self._length + m > self.max_length:
            raise ValueError(f"KV cache would hold {self._length + m} tokens, over the context of {self.max_length}")
        keep = self._length if self._keep is None else self._keep
        self._opened = True  # from the first request on, the server may hold the sequence: release() ends it
        logits = self.transport(self.model, KVRequest(self.sequence_id, tokens.cpu().numpy().astype(np.int64), keep))
        if logits.shape != (m, self.vocab_size):
            raise RuntimeError(f"{self.model} returned logits of shape {logits.shape}, expected ({m}, {self.vocab_size})")
        self._keep = None
        self._length += m
        return Step(logits=torch.from_numpy(logits))

    def rollback(self, keep: int) -> None:
        if not 0 <= keep <= self._length:
            raise ValueError(f"cannot keep {keep} of {self._length} cache entries")
        if keep < self._length:
            self._length = keep
            self._keep = keep if self._keep is None else min(self._keep, keep)

    def release(self) -> None:
        """Free the served cache (best effort: the server also evicts the oldest caches)."""
        if self._opened:
            self._opened = False
            self.transport(self.model, KVRequest(self.sequence_id, np.zeros(0, dtype=np.int64), 0, release=True))


def bls_transport(model: str, request: KVRequest) -> np.ndarray:
    """One BLS inference request from inside a Python-backend model."""
    import triton_python_backend_utils as pb_utils

    inputs = [pb_utils.Tensor("tokens", request.tokens), pb_utils.Tensor("keep", np.array([request.keep], dtype=np.int64))]
    flags = 0
    if request.keep == RESET:
        flags |= pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START
    if request.release:
        flags |= pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END
    response = pb_utils.InferenceRequest(model_name=model, inputs=inputs, requested_output_names=["logits"],
                                         correlation_id=request.sequence_id, flags=flags).exec()
    if response.has_error():
        raise RuntimeError(f"BLS call to {model} failed: {response.error().message()}")
    return np.array(pb_utils.get_output_tensor_by_name(response, "logits").as_numpy(), dtype=np.float32)


class LocalTransport:
    """In-process stand-in for BLS: `SequenceCaches` per model name (tests, debugging)."""

    def __init__(self, caches: dict[str, "object"]) -> None:
        self.caches = caches  # model name -> SequenceCaches
        self.calls: dict[str, int] = {}

    def __call__(self, model: str, request: KVRequest) -> np.ndarray:
        self.calls[model] = self.calls.get(model, 0) + 1
        return self.caches[model].step(request)


def failing_transport(message: str) -> Callable[[str, KVRequest], np.ndarray]:
    def call(model: str, request: KVRequest) -> np.ndarray:
        raise RuntimeError(message)

    return call
