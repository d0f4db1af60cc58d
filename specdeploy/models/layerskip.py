"""A zero-training self-speculative draft: the target's first N layers + final norm + lm_head.

The shallow model is a regular Hugging Face causal LM built on the meta device whose
modules ARE the target's (no weight is copied), so it runs through the same runner as
any draft. Early-exit drafting as in LayerSkip / Draft & Verify, without their training.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from specdeploy.errors import SpecDeployError


def layerskip_layers(total: int, requested: int | None = None) -> int:
    """Layers of a layerskip draft of a `total`-layer target: `requested`, or a quarter (at least 1)."""
    n = requested or max(1, total // 4)
    if not 1 <= n < total:
        raise SpecDeployError(f"layerskip needs 1 <= layers < {total}, got {n}")
    return n


def layerskip_model(target: PreTrainedModel, num_layers: int | None = None) -> PreTrainedModel:
    """A model of the target's first `num_layers` layers (default: a quarter, at least 1)."""
    layers = target.model.layers
    n = layerskip_layers(len(layers), num_layers)
    config = copy.deepcopy(target.config)
    config.num_hidden_layers = n
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:n]
    with torch.device("meta"):
        shallow = AutoModelForCausalLM.from_config(config)
    shallow.model.embed_tokens = target.model.embed_tokens
    shallow.model.layers = nn.ModuleList(layers[:n])
    shallow.model.norm = target.model.norm
    shallow.model.rotary_emb = target.model.rotary_emb
    shallow.lm_head = target.lm_head
    shallow.generation_config = target.generation_config
    return shallow.eval()
