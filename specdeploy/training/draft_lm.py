"""Train a DraftLM by distillation: KL(target || draft) on the target's logits, every position.

The draft starts as copies of a few target layers (the first ones by default) plus the
target's final norm; the shared embedding and lm_head stay frozen (they are the target's,
reused at load time). Measured on SmolLM2 before training, the KL to the target is ~18
nats for layers (0, 1), ~21 for (0, 15) and ~55 for (0, 29): the last layer expects deep
features and blows up on shallow ones, so the first layers are the default.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from specdeploy.config import DRAFT_VOCAB_COVERAGE
from specdeploy.models import artifacts, draft_lm
from specdeploy.models.loader import LoadedModel
from specdeploy.training.common import (Batch, DistillData, TrainConfig, artifact_manifest, choose_draft_vocab, evaluate,
                                        init_record, masked_mean, plot_curve, target_features, train_loop)


def train_draft(target: LoadedModel, data: DistillData, out: Path, cfg: TrainConfig, num_layers: int = 2,
                init_layers: list[int] | None = None, command: str = "", log=print,
                init: str | Path | None = None, draft_vocab_coverage: float = DRAFT_VOCAB_COVERAGE) -> dict:
    """Train and save a DraftLM artifact under `out` (from target layers, or continuing the artifact
    `init`), with the draft vocabulary (models/draft_vocab.py) covering `draft_vocab_coverage` of the
    data's answer tokens (0: the whole vocabulary); returns its manifest."""
    device = next(target.model.parameters()).device
    target.model.requires_grad_(False)
    if init is None:
        layer_ids, started = init_layers or list(range(num_layers)), None
        draft = draft_lm.init_from_target(target.model, layer_ids)
    else:
        draft = draft_lm.load(init, target, draft_vocab=False)  # trained over the whole vocabulary
        prior = artifacts.read_manifest(artifacts.resolve("draft_lm", init), "draft_lm")
        layer_ids, started = prior["architecture"]["init_layers"], init_record(init, prior)
    own = [p for n, p in draft.named_parameters() if not n.startswith(draft_lm.SHARED)]
    for p in own:
        p.data = p.data.float()  # fp32 master weights (autocast runs the matmuls in bf16 on GPU)
        p.requires_grad_(True)
    draft.train()
    lm_head = target.model.get_output_embeddings()

    def loss_fn(batch: Batch) -> tuple[torch.Tensor, dict]:
        teacher = F.log_softmax(lm_head(target_features(target, batch.ids)).float(), -1)  # [B, T, V]
        student = F.log_softmax(draft(input_ids=batch.ids, use_cache=False).logits.float(), -1)  # [B, T, V]
        kl = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)  # [B, T]
        agree = (student.argmax(-1) == teacher.argmax(-1)).float()
        return masked_mean(kl, batch.valid), {"kl": masked_mean(kl, batch.valid), "top1_agree": masked_mean(agree, batch.valid)}

    result, val_idx = train_loop(own, loss_fn, data, cfg, device)
    draft.eval()
    result.val = evaluate(loss_fn, data, val_idx, cfg, device)
    log(f"draft: {result.steps} steps in {result.seconds:.0f} s; final {result.final}; validation {result.val}")
    vocab, vocab_record = choose_draft_vocab(target, data, draft_vocab_coverage)
    manifest = artifact_manifest(target, data, cfg, result, command, architecture={
        "num_layers": len(layer_ids), "init_layers": layer_ids, "shared_with_target": ["embed_tokens", "lm_head"]},
        init_from=started, draft_vocab=vocab_record)
    draft_lm.save(draft, out, manifest, draft_vocab=vocab)
    plot_curve(result.curve, out / "loss.png", f"DraftLM ({len(layer_ids)} layers) distillation")
    return manifest
