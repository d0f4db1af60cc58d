"""Train an EAGLE head on the frozen target: feature regression + token cross-entropy (EAGLE-1).

Pass 1 (EAGLE-1): at every position j the head sees (f_j + noise, embedding of t_{j+1})
and predicts f_{j+1}; loss = smooth L1 to the target's feature + `ce_weight` x
cross-entropy of lm_head(prediction) against the target's own distribution for t_{j+2}.

With `unroll=s > 1` (as HASS / EAGLE-3's "training-time test"), pass p = 2 .. s feeds the head
its own pass p - 1 prediction with the next token, attending to the true-feature entries of
pass 1, its ancestors in passes 2 .. p - 1 and itself: exactly what the head sees when drafting
its p-th token of a chain or tree path. Pass p's loss is weighted 0.8^(p - 1).

The head is trained over the whole vocabulary; its draft vocabulary (models/draft_vocab.py: the ids the
target emits most often in the data's answers, `draft_vocab_coverage` of them) is chosen afterwards.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from specdeploy.config import DRAFT_VOCAB_COVERAGE
from specdeploy.errors import SpecDeployError
from specdeploy.models import eagle
from specdeploy.models.loader import LoadedModel
from specdeploy.training.common import (Batch, DistillData, TrainConfig, artifact_manifest, choose_draft_vocab, evaluate,
                                        init_record, masked_mean, plot_curve, target_features, train_loop)


def unrolled_predictions(head: eagle.EagleHead, features: torch.Tensor, embeds: torch.Tensor,
                         unroll: int) -> list[torch.Tensor]:
    """The head's predictions of passes 1 .. unroll over one batch.

    features [B, T-1, H] (f_0 .. f_{T-2}, the target's), embeds [B, T, H] (of t_0 .. t_{T-1}).
    Pass 1 returns [B, T-1, H], row j ~ f_{j+1}; pass p returns [B, T-p, H], row j ~ f_{j+p}, from
    the head's own pass p - 1 row j at position j + p - 1, attending to pass 1's rows 0 .. j (true
    features), its ancestors (row j of passes 2 .. p - 1) and itself. Shorter sequences end early.
    """
    t, device = embeds.shape[1], features.device
    pred, cache = head(features, embeds[:, 1:], torch.arange(t - 1, device=device))
    preds, widths = [pred], []
    for step in range(1, unroll):
        m = pred.shape[1] - 1
        if m < 1:
            break
        blocks = [torch.ones(m, t - 1, dtype=torch.bool, device=device).tril()]
        blocks += [torch.eye(m, w, dtype=torch.bool, device=device) for w in widths]  # ancestors
        blocks.append(torch.eye(m, dtype=torch.bool, device=device))  # itself
        pred, cache = head(pred[:, :-1], embeds[:, step + 1 : step + 1 + m],
                           torch.arange(step, step + m, device=device), torch.cat(blocks, dim=1), cache)
        preds.append(pred)
        widths.append(m)
    return preds


def eagle_loss(target: LoadedModel, head: eagle.EagleHead, batch: Batch, ce_weight: float = 0.1,
               noise: float = 0.2, unroll: int = 2) -> tuple[torch.Tensor, dict]:
    """One batch's training loss (every pass's weighted sum) and its metrics per pass."""
    embed, lm_head = target.model.get_input_embeddings(), target.model.get_output_embeddings()
    feats = target_features(target, batch.ids)  # [B, T, H] f_j: the target's feature after t_j
    with torch.no_grad():
        teacher = F.softmax(lm_head(feats).float(), -1)  # [B, T, V] row j: distribution of t_{j+1}
        embeds = embed(batch.ids)  # [B, T, H]
    x = feats[:, :-1].float()
    if head.training and noise > 0:
        x = x + (torch.rand_like(x) - 0.5) * noise
    total, metrics = 0.0, {}
    for step, pred in enumerate(unrolled_predictions(head, x, embeds, unroll), start=1):
        n = pred.shape[1]  # pred_j ~ f_{j + step}
        want, mask = feats[:, step : step + n].float(), batch.valid[:, step : step + n]
        reg = masked_mean(F.smooth_l1_loss(pred, want, reduction="none").mean(-1), mask)
        logp = F.log_softmax(lm_head(pred.to(feats.dtype)).float(), -1)
        ce = masked_mean(-(teacher[:, step : step + n] * logp).sum(-1), mask)
        acc = masked_mean((logp.argmax(-1) == teacher[:, step : step + n].argmax(-1)).float(), mask)
        total = total + 0.8 ** (step - 1) * (reg + ce_weight * ce)
        metrics.update({f"reg{step}": reg, f"ce{step}": ce, f"top1_{step}": acc})
    return total, metrics


def train_eagle(target: LoadedModel, data: DistillData, out: Path, cfg: TrainConfig, ce_weight: float = 0.1,
                noise: float = 0.2, unroll: int = 2, command: str = "", log=print, init: str | Path | None = None,
                draft_vocab_coverage: float = DRAFT_VOCAB_COVERAGE) -> dict:
    """Train and save an EAGLE head under `out` (from the target's last layer, or from the artifact
    `init`), with the draft vocabulary covering `draft_vocab_coverage` of the data's answer tokens
    (0: the whole vocabulary); returns its manifest."""
    if unroll < 1:
        raise SpecDeployError(f"--unroll must be at least 1, got {unroll}")
    device = next(target.model.parameters()).device
    target.model.requires_grad_(False)
    if init is None:
        head, started = eagle.EagleHead.init_from_target(target.model).to(device), None
    else:
        head, prior = eagle.load(init, target)
        head, started = head.float().train(), init_record(init, prior)

    def loss_fn(batch: Batch) -> tuple[torch.Tensor, dict]:
        return eagle_loss(target, head, batch, ce_weight, noise, unroll)

    result, val_idx = train_loop(list(head.parameters()), loss_fn, data, cfg, device)
    head.eval()
    result.val = evaluate(loss_fn, data, val_idx, cfg, device)
    log(f"eagle: {result.steps} steps in {result.seconds:.0f} s; final {result.final}; validation {result.val}")
    head.draft_vocab, vocab_record = choose_draft_vocab(target, data, draft_vocab_coverage)
    manifest = artifact_manifest(target, data, cfg, result, command, architecture={
        "layers": 1, "init_layer": len(target.model.model.layers) - 1, "ce_weight": ce_weight, "noise": noise,
        "unroll": unroll}, init_from=started, draft_vocab=vocab_record)
    eagle.save(head, out, manifest)
    plot_curve(result.curve, out / "loss.png", "EAGLE head: feature regression + cross-entropy")
    return manifest
