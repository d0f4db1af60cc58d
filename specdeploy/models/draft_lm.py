"""DraftLM: a small Llama that shares the target's tokenizer, embedding and lm_head.

The draft is a regular Hugging Face causal LM of a few decoder layers with the target's
hidden size, so it runs through the same `TorchRunner` as any draft. Its embedding and
lm_head ARE the target's modules (tied at load time, never stored), which keeps the
artifact to the layers and the final norm: 2 layers of SmolLM2 = 7.1 M parameters,
14 MB in bf16, against 28 M parameters for the embedding alone.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from specdeploy.errors import SpecDeployError
from specdeploy.models import artifacts
from specdeploy.models.draft_vocab import DraftVocabLMHead, draft_vocab_tensors, pop_draft_vocab

SHARED = ("model.embed_tokens.", "lm_head.")  # parameter prefixes reused from the target



def _draft_config(target: PreTrainedModel, num_layers: int):
    config = copy.deepcopy(target.config)
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:num_layers]
    return config


def _attach_shared(draft: PreTrainedModel, target: PreTrainedModel) -> PreTrainedModel:
    draft.model.embed_tokens = target.model.embed_tokens
    draft.lm_head = target.lm_head
    draft.model.rotary_emb = target.model.rotary_emb  # same rope config (checked by the caller)
    draft.generation_config = target.generation_config
    return draft


def init_from_target(target: PreTrainedModel, layer_ids: list[int]) -> PreTrainedModel:
    """A draft whose layers are copies of the target's `layer_ids` and whose final norm is the target's."""
    layers = target.model.layers
    if not layer_ids or any(not 0 <= i < len(layers) for i in layer_ids):
        raise SpecDeployError(f"draft layers {layer_ids} out of range for a target of {len(layers)} layers")
    with torch.device("meta"):
        draft = AutoModelForCausalLM.from_config(_draft_config(target, len(layer_ids)))
    draft.model.layers = nn.ModuleList(copy.deepcopy(layers[i]) for i in layer_ids)
    for new_idx, layer in enumerate(draft.model.layers):  # the KV cache is indexed by layer_idx
        layer.self_attn.layer_idx = new_idx
    draft.model.norm = copy.deepcopy(target.model.norm)
    return _attach_shared(draft, target)


def own_state_dict(draft: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The draft's own weights: everything but the target's shared embedding and lm_head."""
    return {k: v for k, v in draft.state_dict().items() if not k.startswith(SHARED)}


def save(draft: PreTrainedModel, folder: Path, manifest: dict, dtype: torch.dtype = torch.bfloat16,
         draft_vocab: torch.Tensor | None = None) -> None:
    """The draft's own weights, config and manifest; `draft_vocab`: the ids it drafts from (None: all)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in own_state_dict(draft).items()}
    save_file(tensors | draft_vocab_tensors(draft_vocab), str(folder / artifacts.WEIGHTS))
    config = draft.config.to_dict()
    config.pop("quantization_config", None)
    artifacts.write_json(folder / artifacts.CONFIG, config)
    artifacts.write_json(folder / artifacts.MANIFEST, {"kind": "draft_lm", **manifest})


def load(folder: str | Path | None, target, device: str | torch.device | None = None,
         draft_vocab: bool = True) -> PreTrainedModel:
    """Load a DraftLM artifact (default: the shipped one) onto the target (a LoadedModel). With its draft
    vocabulary, if it has one, its lm_head scores those ids only (models/draft_vocab.py); `draft_vocab=False`
    gives the target's whole lm_head (to train it further)."""
    folder = artifacts.resolve("draft_lm", folder)
    manifest = artifacts.read_manifest(folder, "draft_lm")
    artifacts.check_target(manifest, folder, target.source_hash, target.tokenizer)
    config = AutoConfig.for_model(**_read_config(folder))
    tcfg = target.model.config
    for name in ("hidden_size", "vocab_size", "num_attention_heads", "num_key_value_heads", "head_dim", "rope_theta",
                 "rope_parameters"):
        if getattr(config, name, None) != getattr(tcfg, name, None):
            raise SpecDeployError(f"{folder}: draft {name} {getattr(config, name, None)} does not fit the target's "
                                  f"{getattr(tcfg, name, None)}")
    with torch.device("meta"):
        draft = AutoModelForCausalLM.from_config(config)
    weights = load_file(str(folder / artifacts.WEIGHTS))
    vocab = pop_draft_vocab(weights, target, folder)
    dtype = target.model.dtype
    device = device or next(target.model.parameters()).device
    state = {k: v.to(device, dtype) for k, v in weights.items()}
    missing = [k for k in own_state_dict(draft) if k not in state]
    if missing:
        raise SpecDeployError(f"{folder}: weights missing {missing[:3]}")
    draft.load_state_dict(state, strict=False, assign=True)
    draft = _attach_shared(draft, target.model)
    if draft_vocab and vocab is not None:
        draft.lm_head = DraftVocabLMHead(target.model.lm_head.weight, vocab)
    return draft.eval()


def _read_config(folder: Path) -> dict:
    import json

    return json.loads((folder / artifacts.CONFIG).read_text())
