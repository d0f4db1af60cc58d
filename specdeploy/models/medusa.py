"""MedusaHeads: K extra decoding heads on the target's last hidden state (Cai et al. 2024, Medusa-1).

Head i (0-based) maps the feature f_j at position j (the input of the target's lm_head,
whose own prediction is t_{j+1}) to a guess of t_{j+2+i}: a residual block
f + SiLU(W_i f + b_i) followed by the target's frozen lm_head. W_i starts at zero, so
every head starts as the lm_head itself. The artifact also stores the sparse token tree
chosen from the heads' measured top-k accuracies (`tree`, rank paths; see runtime.tree).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from specdeploy.errors import SpecDeployError
from specdeploy.models import artifacts
from specdeploy.models.draft_vocab import draft_vocab_tensors, pop_draft_vocab


class ResBlock(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class MedusaHeads(nn.Module):
    """draft_vocab: [N] int64 ascending token ids the heads draft from (models/draft_vocab.py), None for all."""

    def __init__(self, hidden_size: int, num_heads: int, draft_vocab: torch.Tensor | None = None) -> None:
        super().__init__()
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.heads = nn.ModuleList(ResBlock(hidden_size) for _ in range(num_heads))
        self.register_buffer("draft_vocab", draft_vocab, persistent=False)  # saved apart: an integer tensor

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features: [..., H] -> [num_heads, ..., H]; apply the target's lm_head for logits."""
        return torch.stack([head(features) for head in self.heads])


def save(heads: MedusaHeads, folder: Path, manifest: dict, tree: list[tuple[int, ...]],
         dtype: torch.dtype = torch.bfloat16) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in heads.state_dict().items()}
    save_file(tensors | draft_vocab_tensors(heads.draft_vocab), str(folder / artifacts.WEIGHTS))
    config = {"architecture": "MedusaHeads", "hidden_size": heads.hidden_size, "num_heads": heads.num_heads,
              "tree": [list(p) for p in tree]}
    artifacts.write_json(folder / artifacts.CONFIG, config)
    artifacts.write_json(folder / artifacts.MANIFEST, {"kind": "medusa", **manifest})


def load(folder: str | Path | None, target) -> tuple[MedusaHeads, list[tuple[int, ...]], dict]:
    """Load a Medusa artifact (default: the shipped one): heads, tree shape, manifest."""
    folder = artifacts.resolve("medusa", folder)
    manifest = artifacts.read_manifest(folder, "medusa")
    artifacts.check_target(manifest, folder, target.source_hash, target.tokenizer)
    config = json.loads((folder / artifacts.CONFIG).read_text())
    if config["hidden_size"] != target.model.config.hidden_size:
        raise SpecDeployError(f"{folder}: Medusa heads of hidden size {config['hidden_size']} do not fit the "
                              f"target's {target.model.config.hidden_size}")
    weights = load_file(str(folder / artifacts.WEIGHTS))
    heads = MedusaHeads(config["hidden_size"], config["num_heads"], pop_draft_vocab(weights, target, folder))
    heads.load_state_dict(weights)
    param = next(target.model.parameters())
    return heads.to(param.device, param.dtype).eval(), [tuple(p) for p in config["tree"]], manifest
