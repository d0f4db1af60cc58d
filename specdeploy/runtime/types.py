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


def node_depths(parents: list[int]) -> list[int]:
    """Depth of each node of a flat tree (parents first; -1 = the pending token, depth 1 below it)."""
    out: list[int] = []
    for p in parents:
        out.append(1 if p < 0 else out[p] + 1)
    return out


@dataclass(frozen=True)
class Draft:
    """Draft tokens proposed for the positions after the pending token: a chain or a token tree.

    "No draft" is an empty tensor (k = 0), never None. ``probs is None`` means the
    draft is deterministic (n-gram lookup, top-k trees): verification treats each token
    as a point mass.

    A token tree sets ``parents``: node i continues node parents[i] (-1 = the pending
    token), parents[i] < i, so nodes come in topological order. Siblings are tried in
    index order; with ``probs``, they were drawn one after the other WITHOUT replacement
    from the same parent distribution (probs rows of siblings are equal), which is what
    the verifier assumes. ``parents is None`` is a chain (parents[i] = i - 1).
    """

    tokens: torch.Tensor  # [k] int64
    probs: torch.Tensor | None = None  # [k, vocab] the draft distribution each token was sampled from
    parents: torch.Tensor | None = None  # [k] int64 parent node index, -1 = pending token; None = chain
    max_depth: int | None = None  # a tree left on the device: a bound on its depth its proposer knows

    @property
    def k(self) -> int:
        return int(self.tokens.numel())

    @property
    def is_tree(self) -> bool:
        return self.parents is not None

    def depths(self) -> list[int]:
        """Depth of each node (1 = a child of the pending token)."""
        if self.parents is None:
            return list(range(1, self.k + 1))
        return node_depths(self.parents.tolist())

    @property
    def depth_bound(self) -> int:
        """The most draft tokens one step can accept, without reading a tree on the device."""
        return min(self.k, self.max_depth) if self.max_depth is not None else self.k

    @property
    def depth(self) -> int:
        """Longest root-to-leaf path: the most draft tokens one step can accept."""
        return max(self.depths(), default=0)

    @classmethod
    def empty(cls) -> "Draft":
        return cls(tokens=torch.zeros(0, dtype=torch.long))


@dataclass(frozen=True)
class Verdict:
    """The verifier's decision for one step."""

    num_accepted: int  # leading draft tokens kept (nodes on the accepted path of a tree)
    next_token: int  # recovered token (after a rejection) or bonus token (all accepted)
    proposed: int  # draft tokens one step could accept: a chain's length, a tree's depth (no default: stats rely on it)
    path: tuple[int, ...] | None = None  # tree drafts: accepted node indices, root to leaf
    path_tokens: tuple[int, ...] = ()  # tree drafts: the tokens of those nodes

    def emitted(self, draft: Draft) -> list[int]:
        """Tokens this step commits, in order."""
        if self.path is not None:
            return [*self.path_tokens, self.next_token]
        return draft.tokens[: self.num_accepted].tolist() + [self.next_token]


@dataclass
class Context:
    """What a proposer may look at: the committed token ids (prompt + generated)."""

    token_ids: list[int]
    prompt_len: int
    params: "object"  # SamplingParams; typed loosely to keep this module import-free
    generator: torch.Generator | None = None
    # target's last hidden state (after the final norm) at every position fed to it so far,
    # i.e. for token_ids[:-1]; set only when the runner returns hidden states (EAGLE, Medusa)
    target_hidden: torch.Tensor | None = None  # [len(token_ids) - 1, hidden]
