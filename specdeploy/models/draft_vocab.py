"""Draft vocabularies (FR-Spec, Zhao et al. 2025): a draft scores only the token ids the target emits most often.

Every trained draft here drafts through the target's LM head (49,152 x 576 for SmolLM2): each EAGLE level, each
Medusa head, each DraftLM token reads all of it. With a draft vocabulary of N ids it reads those N rows, and every
other id scores -inf, so it is never drafted. Verification is the target's own, so output does not change; only
tokens outside the vocabulary can no longer be guessed. An artifact stores its vocabulary as the int64 tensor
`draft_vocab` (ascending ids) beside its weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from specdeploy.errors import SpecDeployError

KEY = "draft_vocab"  # the tensor's name in an artifact's weights.safetensors


class DraftVocabLMHead(nn.Module):
    """The target's LM head over a draft vocabulary: only the rows of `ids` [N] (ascending) are scored and
    every other id gets -inf (logits stay [..., vocab])."""

    def __init__(self, weight: torch.Tensor, ids: torch.Tensor) -> None:
        super().__init__()
        self.vocab_size = int(weight.shape[0])
        self.register_buffer("ids", ids.to(weight.device), persistent=False)
        self.weight = nn.Parameter(weight.detach()[self.ids].contiguous(), requires_grad=False)  # [N, H]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return draft_logits(F.linear(h, self.weight), self.ids, self.vocab_size)


def draft_logits(sub: torch.Tensor, ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Logits over a draft vocabulary, sub [..., N] for ids [N] -> [..., vocab_size], -inf at every other id."""
    full = sub.new_full((*sub.shape[:-1], vocab_size), float("-inf"))
    return full.scatter(-1, ids.expand_as(sub), sub)


def with_draft_vocab(lm_head: nn.Module, ids: torch.Tensor | None) -> nn.Module:
    """The LM head a draft drafts with: `lm_head` itself (ids None), or its rows of `ids`."""
    return lm_head if ids is None else DraftVocabLMHead(lm_head.weight, ids)


def check_draft_vocab(ids: torch.Tensor, vocab_size: int, where: object) -> torch.Tensor:
    """ids as an int64 draft vocabulary of a `vocab_size` vocabulary, or a clear error: non-empty,
    ascending without repeats, every id in range."""
    if ids.dim() != 1 or ids.numel() == 0 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise SpecDeployError(f"{where}: {KEY} must be a non-empty 1-D tensor of token ids, got {tuple(ids.shape)} {ids.dtype}")
    ids = ids.long()
    if not bool((ids[1:] > ids[:-1]).all()) or int(ids[0]) < 0 or int(ids[-1]) >= vocab_size:
        raise SpecDeployError(f"{where}: {KEY} must hold ascending, distinct ids in [0, {vocab_size})")
    return ids


def pop_draft_vocab(weights: dict[str, torch.Tensor], target, where: object) -> torch.Tensor | None:
    """Take an artifact's draft vocabulary out of its loaded weights, checked against the target's vocabulary."""
    ids = weights.pop(KEY, None)
    return None if ids is None else check_draft_vocab(ids, target.model.get_output_embeddings().weight.shape[0], where)


def draft_vocab_tensors(ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """What an artifact's weights file holds of a draft vocabulary (nothing for None)."""
    return {} if ids is None else {KEY: ids.detach().to("cpu", torch.long).contiguous()}


def frequent_ids(counts: torch.Tensor, coverage: float) -> torch.Tensor:
    """The fewest ids whose `counts` [vocab] cover `coverage` of the total, ascending: a draft vocabulary
    from how often the target emits each token."""
    if not 0.0 < coverage <= 1.0:
        raise SpecDeployError(f"draft vocabulary coverage must be in (0, 1], got {coverage}")
    if int(counts.sum()) <= 0:
        raise SpecDeployError("no answer tokens to choose a draft vocabulary from")
    order = counts.argsort(descending=True, stable=True)
    covered = counts[order].cumsum(0).double() / counts.sum()
    n = int((covered < coverage).sum()) + 1
    return order[: min(n, counts.numel())].sort().values
