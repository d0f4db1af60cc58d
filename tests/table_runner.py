"""A tiny Runner with a known next-token distribution, for exact statistical tests."""
from __future__ import annotations

import torch

from specdeploy.runtime.types import Step


class BigramRunner:
    """Logits depend only on the previous token: logits = table[prev]. KV cache = token list."""

    def __init__(self, table: torch.Tensor, max_length: int = 512) -> None:  # table: [vocab, vocab] logits
        self.table = table.float()
        self.vocab_size = table.shape[0]
        self.max_length = max_length
        self.device = torch.device("cpu")
        self.tokens: list[int] = []

    @property
    def length(self) -> int:
        return len(self.tokens)

    def reset(self) -> None:
        self.tokens = []

    def forward(self, tokens: torch.Tensor) -> Step:
        self.tokens.extend(tokens.tolist())
        return Step(logits=self.table[tokens.long()])

    def rollback(self, keep: int) -> None:
        assert 0 <= keep <= len(self.tokens)
        del self.tokens[keep:]
