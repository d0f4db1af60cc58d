"""Proposers: anything that drafts tokens for the target, behind one interface.

A proposer reads the committed tokens from the `Context` and returns a `Draft` of at
most k tokens (k = 0 means "no draft"). It never sees the verifier; a proposer that keeps
state (a draft model's KV cache) re-syncs it from the context at the next `propose`.

Optional: `draft_ahead(ctx, hidden, accept, k)`, called by the loop with the step's verdict still
on the device (`verify.DeviceVerdict`) and the target's hidden states of the step; a proposer that
drafts on the device (`GraphEagleProposer`) queues its next draft from them, returns it, and hands
the same object out at the next `propose` for the same k (so the loop can stage its verify).
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch

from specdeploy.config import check_confidence
from specdeploy.runtime.runner import Runner
from specdeploy.runtime.types import Context, Draft
from specdeploy.runtime.verify import sample, sampling_probs


@runtime_checkable
class Proposer(Protocol):
    def reset(self) -> None:
        """Forget the previous request."""

    def propose(self, ctx: Context, k: int) -> Draft:
        """At most k draft tokens for the positions after ctx.token_ids."""


class NoProposer:
    """Plain decoding: every step drafts nothing and the target emits one token."""

    def reset(self) -> None:
        pass

    def propose(self, ctx: Context, k: int) -> Draft:
        return Draft.empty()


class NGramProposer:
    """Prompt lookup: find the latest earlier occurrence of the last n tokens and copy what followed.

    Tries n from `max_n` down to `min_n` (vLLM's prompt_lookup_max / prompt_lookup_min).
    """

    def __init__(self, min_n: int = 1, max_n: int = 4) -> None:
        self.min_n, self.max_n = min_n, max_n

    def reset(self) -> None:
        pass

    def propose(self, ctx: Context, k: int) -> Draft:
        ids = np.asarray(ctx.token_ids, dtype=np.int64)
        for n in range(min(self.max_n, len(ids) - 1), self.min_n - 1, -1):
            # windows over ids[:-1] so that every match has at least one token after it
            windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], n)
            hits = np.flatnonzero((windows == ids[-n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return Draft(tokens=torch.from_numpy(ids[start : start + k].copy()))
        return Draft.empty()


class DraftModelProposer:
    """Drafts up to k tokens autoregressively with a smaller model sharing the target's tokenizer.

    The draft's KV cache holds a prefix of the committed tokens; before drafting it is
    rolled back to the longest prefix still valid, so rejected drafts never leak.

    min_confidence: drafting stops before a position where the draft's path probability (the
    product of its probabilities for the tokens drafted so far and its largest one for the next)
    falls below this; 0 drafts all k. The decision precedes each sample, so every drafted token
    is still a sample of its full distribution q and verification stays lossless.
    """

    def __init__(self, runner: Runner, min_confidence: float = 0.0) -> None:
        self.runner = runner
        self.min_confidence = check_confidence(min_confidence)
        self._cached: list[int] = []  # token ids whose KV entries the runner holds

    def reset(self) -> None:
        self.runner.reset()
        self._cached = []

    def propose(self, ctx: Context, k: int) -> Draft:
        ids = ctx.token_ids
        k = min(k, self.runner.max_length - len(ids))
        if k <= 0:
            return Draft.empty()
        keep = _common_prefix(self._cached, ids, limit=len(ids) - 1)
        self.runner.rollback(keep)
        self._cached = self._cached[:keep]
        feed = ids[keep:]
        tokens: list[int] = []
        probs: list[torch.Tensor] = []
        path_p = 1.0
        for _ in range(k):
            logits = self.runner.forward(torch.tensor(feed, dtype=torch.long)).logits[-1]
            self._cached.extend(feed)
            if ctx.params.greedy and not self.min_confidence:
                token = int(logits.argmax())
            elif ctx.params.greedy:
                top_p, top = torch.softmax(logits.float(), -1).max(-1)
                top_p, top = torch.stack([top_p, top.float()]).tolist()  # one host sync (ids < 2^24)
                if path_p * top_p < self.min_confidence:
                    break
                token, path_p = int(top), path_p * top_p
            else:
                q = sampling_probs(logits[None], ctx.params)[0]
                if self.min_confidence and path_p * float(q.max()) < self.min_confidence:
                    break
                token = int(sample(q, ctx.generator))
                if self.min_confidence:  # the host sync only where the cut needs the path
                    path_p *= float(q[token])
                probs.append(q)
            tokens.append(token)
            feed = [token]
        if not tokens:
            return Draft.empty()
        return Draft(tokens=torch.tensor(tokens, dtype=torch.long), probs=torch.stack(probs) if probs else None)


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    if a[:n] == b[:n]:
        return n
    return next(i for i in range(n) if a[i] != b[i])
