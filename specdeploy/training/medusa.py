"""Train Medusa-1 heads on the frozen target, then choose their sparse tree from measured accuracies.

Head i at position j learns the target's own distribution for t_{j+2+i} (its logits at
position j+1+i, a soft label: self-distillation) by KL, weighted 0.8^i as in Medusa.
After training, top-k accuracies of each head against the target's greedy token are
measured on held-out sequences, and `runtime.tree.sparse_tree` picks the tree.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from specdeploy.config import DRAFT_VOCAB_COVERAGE
from specdeploy.models import medusa
from specdeploy.models.loader import LoadedModel
from specdeploy.runtime.tree import sparse_tree
from specdeploy.training.common import (Batch, DistillData, TrainConfig, artifact_manifest, choose_draft_vocab, evaluate,
                                        init_record, make_batch, masked_mean, plot_curve, target_features, train_loop)

TOP_RANKS = 10  # candidates per head whose accuracy is measured


def train_medusa(target: LoadedModel, data: DistillData, out: Path, cfg: TrainConfig, num_heads: int = 4,
                 tree_size: int = 48, decay: float = 0.8, command: str = "", log=print,
                 init: str | Path | None = None, draft_vocab_coverage: float = DRAFT_VOCAB_COVERAGE) -> dict:
    """Train and save Medusa heads under `out` (fresh, or continuing the artifact `init`, whose head
    count wins over `num_heads`); the tree is chosen again from the new accuracies, the draft vocabulary
    (models/draft_vocab.py) covers `draft_vocab_coverage` of the data's answer tokens (0: the whole
    vocabulary). Returns the manifest."""
    device = next(target.model.parameters()).device
    target.model.requires_grad_(False)
    lm_head = target.model.get_output_embeddings()
    if init is None:
        heads, started = medusa.MedusaHeads(target.model.config.hidden_size, num_heads).to(device), None
    else:
        heads, _, prior = medusa.load(init, target)
        heads, started, num_heads = heads.float().train(), init_record(init, prior), heads.num_heads

    def loss_fn(batch: Batch) -> tuple[torch.Tensor, dict]:
        feats = target_features(target, batch.ids)  # [B, T, H]
        with torch.no_grad():
            teacher = F.log_softmax(lm_head(feats).float(), -1)  # [B, T, V]: row j predicts t_{j+1}
        out = heads(feats.float())  # [K, B, T, H]
        total, metrics = 0.0, {}
        for i in range(num_heads):
            shift = 1 + i
            student = F.log_softmax(lm_head(out[i][:, :-shift].to(feats.dtype)).float(), -1)  # predicts t_{j+2+i}
            want = teacher[:, shift:]
            mask = batch.valid[:, shift:]
            kl = masked_mean(F.kl_div(student, want, log_target=True, reduction="none").sum(-1), mask)
            total = total + decay**i * kl
            metrics[f"kl{i}"] = kl
            metrics[f"top1_{i}"] = masked_mean((student.argmax(-1) == want.argmax(-1)).float(), mask)
        return total, metrics

    result, val_idx = train_loop(list(heads.parameters()), loss_fn, data, cfg, device)
    heads.eval()
    result.val = evaluate(loss_fn, data, val_idx, cfg, device)
    accuracy = head_accuracy(target, heads, data, val_idx, cfg, device)
    tree = sparse_tree(accuracy, tree_size)
    log(f"medusa: {result.steps} steps in {result.seconds:.0f} s; top-1 accuracy per head "
        f"{[round(a[0], 3) for a in accuracy]}; tree of {len(tree)} nodes, depth {max(len(p) for p in tree)}")
    heads.draft_vocab, vocab_record = choose_draft_vocab(target, data, draft_vocab_coverage)
    manifest = artifact_manifest(target, data, cfg, result, command, head_accuracy=accuracy,
                                 architecture={"num_heads": num_heads, "tree_size": len(tree), "loss_decay": decay},
                                 init_from=started, draft_vocab=vocab_record)
    medusa.save(heads, out, manifest, tree)
    plot_curve(result.curve, out / "loss.png", f"Medusa-1 heads (K={num_heads}) distillation")
    return manifest


@torch.no_grad()
def head_accuracy(target: LoadedModel, heads: medusa.MedusaHeads, data: DistillData, val_idx: list[int],
                  cfg: TrainConfig, device: torch.device) -> list[list[float]]:
    """accuracy[i][r]: how often head i's rank-r candidate is the target's greedy token."""
    lm_head = target.model.get_output_embeddings()
    hits = torch.zeros(heads.num_heads, TOP_RANKS)
    counts = torch.zeros(heads.num_heads)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    for start in range(0, min(len(val_idx), cfg.val_batches * cfg.batch_size), cfg.batch_size):
        batch = make_batch(data, val_idx[start : start + cfg.batch_size], cfg.seq_len, device)
        with autocast:
            feats = target_features(target, batch.ids)
            greedy = lm_head(feats).argmax(-1)  # [B, T]
            out = heads(feats.float())
            for i in range(heads.num_heads):
                shift = 1 + i
                top = lm_head(out[i][:, :-shift].to(feats.dtype)).topk(TOP_RANKS, -1).indices  # [B, T-shift, R]
                match = (top == greedy[:, shift:, None]) & batch.valid[:, shift:, None]
                hits[i] += match.sum((0, 1)).float().cpu()
                counts[i] += batch.valid[:, shift:].sum().float().cpu()
    return (hits / counts.clamp_min(1)[:, None]).tolist()
