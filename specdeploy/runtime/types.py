"""Small frozen records that cross module boundaries in the runtime."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Step:
    """What a runner returns for the tokens it was fed."""

    logits: torch.Tensor  # [num_tokens, vocab] float32
    hidden: torch.Tensor | None = None  # [num_tokens, hidden] last hidden state, if asked for

    @classmethod
    def dummy(cls, num_tokens: int, vocab: int) -> "Step":
        return cls(logits=torch.zeros(num_tokens, vocab))


@dataclass(frozen=True)
class Draft:
    """Draft tokens proposed for the positions after the pending token.

    "No draft" is an empty tensor (k = 0), never None. ``probs is None`` means the
    draft is deterministic (n-gram lookup): verification treats it as a point mass.
    """

    tokens: torch.Tensor  # [k] int64
    probs: torch.Tensor | None = None  # [k, vocab] the draft distribution each token was sampled from

    @property
    def k(self) -> int:
        return int(self.tokens.numel())

    @classmethod
    def empty(cls) -> "Draft":
        return cls(tokens=torch.zeros(0, dtype=torch.long))


@dataclass(frozen=True)
class Verdict:
    """The verifier's decision for one step."""

    num_accepted: int  # leading draft tokens kept
    next_token: int  # recovered token (after a rejection) or bonus token (all accepted)

    def emitted(self, draft: Draft) -> list[int]:
        """Tokens this step commits, in order."""
        return draft.tokens[: self.num_accepted].tolist() + [self.next_token]


@dataclass
class Context:
    """What a proposer may look at: the committed token ids (prompt + generated)."""

    token_ids: list[int]
    prompt_len: int
    params: "object"  # SamplingParams; typed loosely to keep this module import-free
    generator: torch.Generator | None = None
    target_hidden: torch.Tensor | None = None  # [hidden] target's last hidden state, for EAGLE/Medusa
