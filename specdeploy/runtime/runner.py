"""Runners: a model that scores tokens against a KV cache it owns.

The loop only sees the `Runner` protocol, so in-process torch, ONNX Runtime and remote
Triton models are interchangeable. Contract: `forward(tokens)` appends len(tokens)
entries to the cache and returns the logits at each of those positions; `rollback(keep)`
drops every entry past the first `keep`.

Token trees (optional, `supports_tree = True`): `forward(tokens, tree_parents)` scores a
tree in one pass, token i attending to the cache and to its ancestors only, at position
(cache length + its depth); `keep_path(keep, path)` then keeps the accepted branch.

Staging (optional, `CudaGraphRunner`): `stage(tokens, tree_parents)` writes the next forward's
inputs, still on the device, before the host knows the cache length, and `forward_staged()` runs it
once the length is set; `gather_path(keep, src)` is `keep_path`'s move from positions on the device,
the length left for a `rollback` to set. With these the loop queues everything but the replay
before it reads a verdict decided on the device (`verify.DeviceVerdict`).
"""
from __future__ import annotations

import inspect
import threading
from typing import Callable, Protocol, runtime_checkable

import torch
from transformers import DynamicCache, PreTrainedModel

from specdeploy.runtime.types import Step


@runtime_checkable
class Runner(Protocol):
    device: torch.device
    vocab_size: int
    max_length: int  # context window in tokens

    @property
    def length(self) -> int:
        """Entries in the KV cache."""

    def reset(self) -> None:
        """Empty the KV cache (a new request)."""

    def forward(self, tokens: torch.Tensor) -> Step:  # tokens: [m] int64
        """Append `tokens` to the cache; logits [m, vocab] for each position."""

    def rollback(self, keep: int) -> None:
        """Drop cache entries past the first `keep`."""


def ids_on(device: torch.device | str, ids: list[int]) -> torch.Tensor:
    """ids as an int64 tensor on `device`. To a GPU through pinned memory and without waiting: a copy
    from pageable memory (`torch.tensor(ids, device=...)`) waits for the work queued before it."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.tensor(ids, dtype=torch.long)
    if len(ids) > _PinnedRing.width:
        return torch.tensor(ids, dtype=torch.long).pin_memory().to(device, non_blocking=True)
    return _ring(device).copy(ids)


def to_host(t: torch.Tensor) -> Callable[[], list[int]]:
    """Start copying a small int64 tensor (at most `_PinnedRing.width` values) to the host now; the returned function waits for
    that copy alone and gives its values. On a GPU the copy goes to pinned memory behind the work
    queued so far, so work queued after this call keeps running while the host reads the values
    (`.tolist()` would wait for it too)."""
    if t.device.type == "cpu":
        return t.tolist
    if t.numel() > _PinnedRing.width:
        raise ValueError(f"to_host copies at most {_PinnedRing.width} values, not {t.numel()}")
    return _ring(t.device).fetch(t)


def _ring(device: torch.device) -> "_PinnedRing":
    rings = _rings.__dict__.setdefault("by_device", {})
    return rings.get(device) or rings.setdefault(device, _PinnedRing(device))


class _PinnedRing:
    """Pinned rows reused in turn for `ids_on`: pinning a fresh tensor per call (`torch.tensor` +
    `pin_memory` + `.to`) took 64 µs a call under cProfile on the GPU machine, several calls a decoding
    step (results/gpu/step_profile/after_323d993).
    A row is written again only after the copy that read it has run (its event)."""

    slots, width = 64, 512

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.inference_mode(False):  # `fetch` writes rows in place, in inference mode or not
            self.rows = torch.empty(self.slots, self.width, dtype=torch.long).pin_memory()
        self.view = self.rows.numpy()
        self.events: list[torch.cuda.Event | None] = [None] * self.slots
        self.next = 0

    def copy(self, ids: list[int]) -> torch.Tensor:
        i, event = self._take()
        n = len(ids)
        self.view[i, :n] = ids
        out = self.rows[i, :n].to(self.device, non_blocking=True)
        self._record(event)
        return out

    def fetch(self, src: torch.Tensor) -> Callable[[], list[int]]:
        """`to_host`: src [n] int64 on this ring's device into a row, read once its copy has run."""
        i, event = self._take()
        n = src.numel()
        self.rows[i, :n].copy_(src, non_blocking=True)
        self._record(event)

        def read() -> list[int]:
            event.synchronize()
            return self.view[i, :n].tolist()
        return read

    def _take(self) -> tuple[int, torch.cuda.Event]:
        """The next row, once the copy that last used it has run (long done in practice: the ring
        holds many steps' copies), and its event."""
        i = self.next
        self.next = (i + 1) % self.slots
        event = self.events[i]
        if event is None:
            event = self.events[i] = torch.cuda.Event()
        else:
            event.synchronize()
        return i, event

    def _record(self, event: torch.cuda.Event) -> None:
        # the copy's stream: the current one of the copy's device (`current_stream(device)` costs ~10 µs)
        event.record(None if torch.cuda.current_device() == self.index else torch.cuda.current_stream(self.device))


_rings = threading.local()  # a ring per thread and device: Triton serves requests from several threads


def path_needs_move(keep: int, path: list[int], length: int) -> bool:
    """Check a `keep_path(keep, path)` request against a cache of `length` entries (ValueError if
    it asks for entries out of range); False when the path already sits right behind `keep`."""
    if not 0 <= keep <= length or any(not keep <= p < length for p in path):
        raise ValueError(f"cannot keep {keep} + {path} of {length} cache entries")
    return list(path) != list(range(keep, keep + len(path)))


def _cache_kwarg(model: PreTrainedModel) -> str:
    # transformers 5.x renames `past_key_values` to `cache` (the old name warns, then goes)
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class TorchRunner:
    """Eager PyTorch runner over any Hugging Face causal LM, with a DynamicCache."""

    def __init__(self, model: PreTrainedModel, *, output_hidden: bool = False) -> None:
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.vocab_size = int(model.config.vocab_size)
        self.max_length = int(getattr(model.config, "max_position_embeddings", 2048))
        self.output_hidden = output_hidden
        self.supports_tree = True
        self._cache_kw = _cache_kwarg(model)
        self.reset()

    @property
    def length(self) -> int:
        return self._length

    def reset(self) -> None:
        self._cache = DynamicCache(config=self.model.config)
        self._length = 0

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, tree_parents: torch.Tensor | None = None) -> Step:
        """tokens: [m] int64; tree_parents: [m] int64 index of each token's parent among `tokens`
        (-1 = the last cache entry), or None for a plain causal chain."""
        m = int(tokens.numel())
        if self._length + m > self.max_length:
            raise ValueError(f"KV cache would hold {self._length + m} tokens, over the context of {self.max_length}")
        tree_kwargs = {} if tree_parents is None else self._tree_inputs(tree_parents)
        out = self.model(
            input_ids=tokens.to(self.device).view(1, m),
            use_cache=True,
            output_hidden_states=self.output_hidden,
            **{self._cache_kw: self._cache},
            **tree_kwargs,
        )
        self._length += m
        hidden = out.hidden_states[-1][0] if self.output_hidden else None
        return Step(logits=out.logits[0].float(), hidden=hidden)

    def _tree_inputs(self, tree_parents: torch.Tensor) -> dict:
        """A 4D additive attention mask and position ids for a token tree after the cache."""
        from specdeploy.runtime.tree import ancestor_matrix

        anc = ancestor_matrix(tree_parents).to(self.device)  # [m, m] bool, self included
        m = anc.shape[0]
        allowed = torch.cat([torch.ones(m, self._length, dtype=torch.bool, device=self.device), anc], dim=1)
        dtype = self.model.dtype
        mask = torch.zeros(1, 1, m, self._length + m, dtype=dtype, device=self.device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        position_ids = (self._length - 1 + anc.sum(-1)).view(1, m)  # cache length + depth (root depth 0)
        return {"attention_mask": mask, "position_ids": position_ids}

    @torch.inference_mode()
    def keep_path(self, keep: int, path: list[int]) -> None:
        """Keep the first `keep` cache entries, then the entries at positions `path` (ascending,
        all >= keep) moved down behind them; drop the rest."""
        n = len(path)
        if path_needs_move(keep, path, self._length):
            idx = torch.tensor(path, dtype=torch.long, device=self.device)
            for layer in self._cache.layers:
                layer.keys[:, :, keep : keep + n] = layer.keys.index_select(2, idx)
                layer.values[:, :, keep : keep + n] = layer.values.index_select(2, idx)
        self.rollback(keep + n)

    def rollback(self, keep: int) -> None:
        if not 0 <= keep <= self._length:
            raise ValueError(f"cannot keep {keep} of {self._length} cache entries")
        if keep < self._length:
            self._cache.crop(keep - self._length)  # negative: number of entries to drop
            self._length = keep
