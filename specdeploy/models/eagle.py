"""EagleHead: EAGLE's feature-level draft (Li et al. 2024), one decoder layer on the target's features.

Input at position j: the target's last hidden state f_j (after its final norm, the input
of its lm_head) and the embedding of token t_{j+1}; `fc` maps their concatenation
[2H] to H, one Llama decoder layer follows, and the output predicts f_{j+1}. The
target's lm_head turns a predicted feature into draft logits for t_{j+2}; the predicted
feature is fed back for the next draft token. Training (specdeploy.training.eagle) is
feature regression (smooth L1) plus cross-entropy against the target's own distribution.

The decoder layer is written here (RMSNorm, GQA attention with RoPE, SwiGLU MLP; the same
parameter names as a Hugging Face Llama layer, so it can start from a target layer) because
drafting a tree needs explicit masks and a KV cache we crop and extend freely.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from specdeploy.errors import SpecDeployError
from specdeploy.models import artifacts
from specdeploy.models.draft_vocab import draft_vocab_tensors, pop_draft_vocab


@dataclass(frozen=True)
class EagleConfig:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float

    @classmethod
    def from_target(cls, config) -> "EagleConfig":
        rope = getattr(config, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        heads = config.num_attention_heads
        return cls(config.hidden_size, config.intermediate_size, heads, config.num_key_value_heads,
                   getattr(config, "head_dim", None) or config.hidden_size // heads, config.rms_norm_eps, float(theta))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding as in Llama (rotate_half form). x: [batch, heads, seq, head_dim];
    positions: [seq] (shared by the batch) or [batch, seq]."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim))
    angles = positions.float()[..., None] * inv_freq  # [(batch,) seq, dim / 2]
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    if positions.dim() == 2:  # [batch, 1, seq, dim] against x's heads axis
        cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x[..., : dim // 2], x[..., dim // 2 :]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class _Attention(nn.Module):
    def __init__(self, c: EagleConfig) -> None:
        super().__init__()
        self.c = c
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)

    def forward(self, x, positions, mask, cache):
        """x: [B, T, H]; positions: [T] or [B, T]; mask: [T, L + T] or [B, 1, T, L + T] bool (True = attend)
        or None = causal;
        cache: (keys, values) [B, kv_heads, L, head_dim] or None. Returns output and the new cache."""
        c = self.c
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, c.num_attention_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        q, k = rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta)
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        rep = c.num_attention_heads // c.num_key_value_heads
        kr, vr = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if mask is None:
            if cache is not None and cache[0].shape[2]:
                raise ValueError("a causal call with a non-empty cache needs an explicit mask")
            out = F.scaled_dot_product_attention(q, kr, vr, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1)), (k, v)


class _MLP(nn.Module):
    def __init__(self, c: EagleConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """A Llama decoder layer (pre-norm attention + SwiGLU MLP), Hugging Face parameter names."""

    def __init__(self, c: EagleConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = _Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = _MLP(c)

    def forward(self, x, positions, mask=None, cache=None):
        a, cache = self.self_attn(self.input_layernorm(x), positions, mask, cache)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class EagleHead(nn.Module):
    """fc(concat(feature, next-token embedding)) -> one decoder layer -> predicted next feature.

    draft_vocab: [N] int64 ascending token ids the head drafts from (models/draft_vocab.py), None for all."""

    def __init__(self, c: EagleConfig, draft_vocab: torch.Tensor | None = None) -> None:
        super().__init__()
        self.config = c
        self.fc = nn.Linear(2 * c.hidden_size, c.hidden_size, bias=True)
        self.layer = DecoderLayer(c)
        self.register_buffer("draft_vocab", draft_vocab, persistent=False)  # saved apart: an integer tensor

    def forward(self, features, embeds, positions, mask=None, cache=None):
        """features, embeds: [B, T, H]; positions: [T] or [B, T]. Returns predicted features [B, T, H] and the cache."""
        x = self.fc(torch.cat([features, embeds.to(features.dtype)], dim=-1))
        return self.layer(x, positions, mask, cache)

    @classmethod
    def init_from_target(cls, target, layer_id: int | None = None) -> "EagleHead":
        """A head that starts as "the next feature is this feature": fc takes the feature (plus a small
        random share of the embedding), and the decoder layer is a copy of a target layer (default: the
        last) with its two output projections zeroed, so its residual branches start silent."""
        head = cls(EagleConfig.from_target(target.config))
        layers = target.model.layers
        src = layers[len(layers) - 1 if layer_id is None else layer_id]
        head.layer.load_state_dict({k: v.float() for k, v in src.state_dict().items()
                                    if not k.endswith("rotary_emb.inv_freq")}, strict=True)
        h = head.config.hidden_size
        with torch.no_grad():
            head.fc.weight.zero_()
            head.fc.weight[:, :h] = torch.eye(h)
            head.fc.weight[:, h:].normal_(0.0, 0.02)
            head.fc.bias.zero_()
            head.layer.self_attn.o_proj.weight.zero_()
            head.layer.mlp.down_proj.weight.zero_()
        return head


def save(head: EagleHead, folder: Path, manifest: dict, dtype: torch.dtype = torch.bfloat16) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in head.state_dict().items()}
    save_file(tensors | draft_vocab_tensors(head.draft_vocab), str(folder / artifacts.WEIGHTS))
    artifacts.write_json(folder / artifacts.CONFIG, {"architecture": "EagleHead", **asdict(head.config)})
    artifacts.write_json(folder / artifacts.MANIFEST, {"kind": "eagle", **manifest})


def load(folder: str | Path | None, target) -> tuple[EagleHead, dict]:
    """Load an EAGLE artifact (default: the shipped one) for the target (a LoadedModel)."""
    folder = artifacts.resolve("eagle", folder)
    manifest = artifacts.read_manifest(folder, "eagle")
    artifacts.check_target(manifest, folder, target.source_hash, target.tokenizer)
    raw = json.loads((folder / artifacts.CONFIG).read_text())
    raw.pop("architecture", None)
    config = EagleConfig(**raw)
    if config.hidden_size != target.model.config.hidden_size:
        raise SpecDeployError(f"{folder}: EAGLE head of hidden size {config.hidden_size} does not fit the target's "
                              f"{target.model.config.hidden_size}")
    weights = load_file(str(folder / artifacts.WEIGHTS))
    head = EagleHead(config, pop_draft_vocab(weights, target, folder))
    head.load_state_dict(weights)
    param = next(target.model.parameters())
    return head.to(param.device, param.dtype).eval(), manifest
