"""Compiled runners: a lean Llama forward over a static KV cache, replayed as CUDA graphs.

Why: on a GPU a small model's eager forward costs the Python dispatch and launch of about a
thousand kernels, not arithmetic (SmolLM2-135M on an H100: ~30 ms eager; its bf16 weights are
read in ~0.1 ms). This module

1. runs the forward of any Hugging Face ``LlamaForCausalLM`` from that model's own weights, with
   the q/k/v and gate/up projections fused and the residual adds folded into the output GEMMs
   (gpt-fast style; no modeling file is copied);
2. keeps keys and values in a preallocated cache, ``[layers, batch, kv_heads, 2, positions,
   head_dim]`` (`StaticKVCache`); rolling back is a length update: a query at position p attends only keys at
   positions <= p, and the same or an earlier forward wrote all of those, so stale entries past
   the length are never read. Token trees: node i is written at slot base + i but rotated at
   position base + depth_i, and sees the cache below base plus its ancestors' slots; keeping the
   accepted branch gathers its slots down behind the prefix (`CudaGraphRunner.keep_path`);
3. runs each decoder layer as six fused Triton kernels where Triton runs (`kernels.py`; on an
   H200 a one-token step of SmolLM2's shape took 1.09 ms against 1.64 ms for the torch layers,
   results/gpu/run12_kernels_final.log), else as torch operations (`choose_kernels`);
4. captures one CUDA graph per (query-length bucket, KV-length bucket) at load and replays it.
   Query lengths are padded up to their bucket; the padding writes cache entries past the new
   length (never read, see 2) and its logits are dropped. Chains and trees share the graphs:
   the ancestry and depths are static inputs like the tokens.

On CPU (or with ``use_graphs=False``) the same code runs eagerly: that is what CI tests, against
the Hugging Face model's logits and through ``speculative_generate``. The batched engine in
``batch.py`` drives the same `LeanLlama.forward` with its own buffers and graphs.
"""
from __future__ import annotations

import gc
import logging
import os
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from specdeploy.config import HEAD_METHODS
from specdeploy.errors import SpecDeployError
from specdeploy.models.draft_vocab import DraftVocabLMHead, draft_logits
from specdeploy.runtime import kernels as fused_kernels
from specdeploy.runtime.runner import ids_on, path_needs_move
from specdeploy.runtime.tree import ancestor_matrix, check_parents
from specdeploy.runtime.types import Step

log = logging.getLogger(__name__)

DEFAULT_QUERY_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
ROPE_SLACK = 1024  # rope table rows past max_position_embeddings, for padded and scratch positions


def bucket(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n (buckets sorted ascending)."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} is over the largest bucket {buckets[-1]}")


def context_length(dims: "LlamaDims", max_length: int | None = None) -> int:
    """A compiled runner's context in tokens: `max_length`, else the model's, capped at 4096."""
    return int(max_length or min(dims.max_positions, 4096))


def kv_buckets_for(positions: int, smallest: int = 256) -> tuple[int, ...]:
    """KV-length buckets: powers of two from `smallest` below `positions`, then `positions` itself.

    Attention reads only the first bucket-many cache entries, so a short context does not pay for
    a long cache: one graph per bucket.
    """
    out, b = [], smallest
    while b < positions:
        out.append(b)
        b *= 2
    return (*out, positions)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ + mask) v with q already scaled: q [R, H, M, D], k / v [R, H, K, D] (any strides),
    mask [R, 1, M, K] additive -> [R, H, M, D]. Scores in the model dtype, softmax in float32, as HF's
    eager attention.

    Why not `scaled_dot_product_attention`: with a mask, its memory-efficient kernel gives a decode
    step one thread block per KV head; on an H100 that took 27 µs at 512 keys and 179 µs at 2048,
    against 14 / 25 µs for these three kernels (results/gpu/run6_attn_micro.json).
    """
    if q.shape[0] == 1:  # one row: 3-D GEMMs over the heads, the mask added in the GEMM's epilogue
        scores = torch.baddbmm(mask[0], q[0], k[0].transpose(1, 2))  # [H, M, K]
        return torch.bmm(torch.softmax(scores, -1, dtype=torch.float32).to(v.dtype), v[0])[None]
    scores = torch.matmul(q, k.transpose(-1, -2)).add_(mask)  # [R, H, M, K]
    return torch.matmul(torch.softmax(scores, -1, dtype=torch.float32).to(v.dtype), v)


def rope_tables(inv_freq: torch.Tensor, positions: int, dtype: torch.dtype,
                scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sign-folded sin), each [positions, head_dim] in `dtype`, as HF's LlamaRotaryEmbedding:
    angles in float32, cos/sin scaled, then cast. inv_freq: [head_dim / 2]."""
    device = inv_freq.device
    freqs = torch.arange(positions, device=device, dtype=torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)  # [positions, head_dim]
    cos = (emb.cos() * scale).to(dtype)
    sin = (emb.sin() * scale).to(dtype)
    half = emb.shape[-1] // 2
    # rotate_half(x) * sin == roll(x, half) * [-sin_low, sin_high]: one roll instead of neg + cat
    return cos, torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)


@dataclass(frozen=True)
class LlamaDims:
    """The shape numbers of a Llama model, read from its HF config."""

    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    max_positions: int  # max_position_embeddings

    @property
    def group(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_config(cls, config) -> "LlamaDims":
        if getattr(config, "model_type", "llama") not in ("llama",):
            raise SpecDeployError(f"the compiled runner supports Llama-family models, not {config.model_type!r}")
        if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
            raise SpecDeployError("the compiled runner does not support attention or MLP biases")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise SpecDeployError(f"the compiled runner supports silu MLPs, not {config.hidden_act!r}")
        heads = int(config.num_attention_heads)
        return cls(
            num_layers=int(config.num_hidden_layers),
            hidden=int(config.hidden_size),
            num_heads=heads,
            num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // heads),
            vocab=int(config.vocab_size),
            eps=float(config.rms_norm_eps),
            max_positions=int(getattr(config, "max_position_embeddings", 2048)),
        )


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer's weights, fused for fewer GEMMs (no copies of the norms)."""

    attn_norm: torch.Tensor  # [hidden]
    wqkv: torch.Tensor  # [(heads + 2 * kv_heads) * head_dim, hidden]: q, then k, then v rows
    wo: torch.Tensor  # [hidden, heads * head_dim]
    mlp_norm: torch.Tensor  # [hidden]
    w_gate_up: torch.Tensor  # [2 * intermediate, hidden]: gate rows, then up rows
    w_down: torch.Tensor  # [hidden, intermediate]


# fused weights per HF decoder layer, so that a layerskip draft (the target's first layers)
# shares the target's fused tensors instead of concatenating its own copies
_FUSED: "weakref.WeakKeyDictionary[nn.Module, LayerWeights]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def fuse_layer(layer: nn.Module) -> LayerWeights:
    """Fused weights of an HF LlamaDecoderLayer (made once per layer module and dtype)."""
    attn, mlp = layer.self_attn, layer.mlp
    cached = _FUSED.get(layer)
    if cached is not None and cached.wqkv.dtype == attn.q_proj.weight.dtype and cached.wqkv.device == attn.q_proj.weight.device:
        return cached
    fused = LayerWeights(
        attn_norm=layer.input_layernorm.weight,
        wqkv=torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).contiguous(),
        wo=attn.o_proj.weight,
        mlp_norm=layer.post_attention_layernorm.weight,
        w_gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).contiguous(),
        w_down=mlp.down_proj.weight,
    )
    _FUSED[layer] = fused
    return fused


class StaticKVCache:
    """Keys and values of every layer, preallocated once.

    Layout ``[layers, batch, kv_heads, 2, positions, head_dim]`` (keys, then values, per KV head):
    in one layer, batch x kv_heads is a single stride, so attention's batched GEMMs read the keys
    and values of any number of rows in place. With positions outside the heads, 32 rows cost a
    copy of every layer's K and V per step (H100: 52 vs 20 µs at 512 keys,
    results/gpu/run8_attn_micro.json).
    """

    def __init__(self, dims: LlamaDims, num_layers: int, batch: int, positions: int,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        self.batch, self.positions = batch, positions
        self.kv = torch.zeros(num_layers, batch, dims.num_kv_heads, 2, positions, dims.head_dim, device=device, dtype=dtype)
        # the rows in order, made here and not per forward: a kernel less in every captured step
        self.row_ids = torch.arange(batch, device=device)

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def write(self, layer: int, rows: torch.Tensor, pos: torch.Tensor, kv: torch.Tensor) -> None:
        """Store one step's keys and values: kv [R, m, 2 * kv_heads, head_dim] (the k heads, then
        the v heads, as the fused projection gives them) at cache rows `rows` [R, 1] and positions
        `pos` [R, m]. One indexed write through a [batch, positions, 2, kv_heads, head_dim] view."""
        R, m, _, hd = kv.shape
        view = self.kv[layer].permute(0, 3, 2, 1, 4)
        view.index_put_((rows, pos), kv.view(R, m, 2, -1, hd))

    def read(self, layer: int, kv_len: int, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of cache positions [0, kv_len), each [R, kv_heads, kv_len, head_dim]: views
        for every row in order, or gathered for `rows` [R]."""
        kv = self.kv[layer, :, :, :, :kv_len]
        if rows is not None:
            kv = kv.index_select(0, rows)
        return kv[:, :, 0], kv[:, :, 1]

    def move(self, keep: int, src: torch.Tensor) -> None:
        """Every layer and row: positions `src` [n] (ascending, >= keep) copied to keep .. keep+n."""
        self.kv[..., keep : keep + src.numel(), :] = self.kv.index_select(4, src)  # index_select copies first: overlap is safe


class LeanLlama:
    """A Llama forward written against an HF model's weight tensors (shared, never copied,
    except the fused q/k/v and gate/up concatenations)."""

    def __init__(self, dims: LlamaDims, embed: torch.Tensor, layers: list[LayerWeights], norm: torch.Tensor,
                 lm_head: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor, kernels: str | None = None,
                 vocab_ids: torch.Tensor | None = None) -> None:
        self.dims = dims
        self.kernels = choose_kernels(dims, embed.device, kernels)  # "fused" (kernels.py) or "torch"
        self.embed = embed  # [vocab, hidden]
        self.layers = layers
        self.norm = norm  # [hidden]
        self.lm_head = lm_head  # [vocab, hidden], or a draft vocabulary's rows of it: [N, hidden]
        self.vocab_ids = vocab_ids  # [N] the token ids of those rows (models/draft_vocab.py), None for all
        self.rope_cos = rope_cos  # [rope_positions, head_dim] model dtype
        self.rope_sin = rope_sin  # [rope_positions, head_dim] sign folded: [-sin_low, sin_high], model dtype
        self.device = embed.device
        self.dtype = embed.dtype

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def rope_positions(self) -> int:
        return int(self.rope_cos.shape[0])

    @classmethod
    @torch.no_grad()
    def from_hf(cls, model: nn.Module, num_layers: int | None = None, kernels: str | None = None) -> "LeanLlama":
        """From an HF LlamaForCausalLM (any dtype or device); `num_layers` keeps the first layers;
        `kernels` as `choose_kernels`."""
        dims = LlamaDims.from_config(model.config)
        inner = model.model
        layers = [fuse_layer(layer) for layer in inner.layers]
        n = num_layers or len(layers)
        if not 1 <= n <= len(layers):
            raise SpecDeployError(f"num_layers must be in [1, {len(layers)}], got {n}")
        rotary = inner.rotary_emb
        cos, sin_signed = rope_tables(rotary.inv_freq, dims.max_positions + ROPE_SLACK, inner.embed_tokens.weight.dtype,
                                      float(getattr(rotary, "attention_scaling", 1.0)))
        head = model.lm_head  # a DraftLM's may score a draft vocabulary
        return cls(dims, inner.embed_tokens.weight, layers[:n], inner.norm.weight, head.weight, cos, sin_signed,
                   kernels, head.ids if isinstance(head, DraftVocabLMHead) else None)

    def truncated(self, num_layers: int) -> "LeanLlama":
        """The first `num_layers` layers + final norm + LM head, sharing every tensor (layerskip draft)."""
        if not 1 <= num_layers <= self.num_layers:
            raise SpecDeployError(f"num_layers must be in [1, {self.num_layers}], got {num_layers}")
        return LeanLlama(self.dims, self.embed, self.layers[:num_layers], self.norm, self.lm_head, self.rope_cos,
                         self.rope_sin, self.kernels, self.vocab_ids)

    def new_cache(self, batch: int, positions: int) -> StaticKVCache:
        if positions > self.rope_positions:
            raise SpecDeployError(f"cache of {positions} positions is over the rope table ({self.rope_positions})")
        return StaticKVCache(self.dims, self.num_layers, batch, positions, self.device, self.dtype)

    @property
    def weight_bytes(self) -> int:
        seen: dict[int, int] = {}
        tensors = [self.embed, self.norm, self.lm_head]
        for w in self.layers:
            tensors += [w.attn_norm, w.wqkv, w.wo, w.mlp_norm, w.w_gate_up, w.w_down]
        for t in tensors:
            seen[t.data_ptr()] = t.numel() * t.element_size()
        return sum(seen.values())

    def forward(
        self,
        cache: StaticKVCache,
        tokens: torch.Tensor,  # [rows, m] int64
        pos: torch.Tensor,  # [rows, m] int64 cache position of each token
        rows: torch.Tensor | None,  # [rows] int64 cache rows fed, or None for every row in order
        kv_len: int,  # attention reads cache positions [0, kv_len); every pos must be < kv_len
        logits: str = "all",  # "all" | "last" | "none"
        want_hidden: bool = False,
        rope_pos: torch.Tensor | None = None,  # [rows, m] int64 rotary position of each token; None: pos
        ancestry: torch.Tensor | None = None,  # [rows, m, m] bool, [r, i, j]: token j is token i or its ancestor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Write the tokens' keys/values at `pos` and return (logits [rows, m or 1, vocab], hidden).

        Which keys a token sees: without `ancestry`, every cache position <= its own `pos` (a
        causal chain); with it (a token tree), every position below the row's first fed token
        (pos[:, 0]) and, among the fed tokens, the slots of its ancestors and itself. A chain is
        the tree whose ancestry is lower-triangular; tree nodes take `rope_pos` = base + depth.

        No host synchronisation and no data-dependent shapes: safe to capture in a CUDA graph.
        """
        d = self.dims
        R, m = tokens.shape
        h = F.embedding(tokens, self.embed).view(R * m, d.hidden)  # [R*m, hidden]
        keys = torch.arange(kv_len, device=tokens.device)
        if ancestry is None:
            allowed = keys[None, None, :] <= pos[:, :, None]  # [R, m, kv_len]
        else:
            allowed = keys[None, None, :] < pos[:, :1, None].expand(R, m, 1)  # [R, m, kv_len] the cache before
            allowed.scatter_(2, pos[:, None, :].expand(R, m, m), ancestry)  # the fed tokens' own slots
        h = self.run_layers(cache, h, pos, pos if rope_pos is None else rope_pos, allowed, rows)
        h = h.view(R, m, d.hidden)
        if logits == "last":
            h = h[:, -1:]
        if self.kernels == "fused":  # the LM head with the final norm folded in: row-independent rounding
            out = None
            if logits != "none":
                out = fused_kernels.linear(h.reshape(-1, d.hidden), self.lm_head, norm_w=self.norm, eps=d.eps)
                out = self._vocab_logits(out.view(*h.shape[:2], -1))
            return out, (F.rms_norm(h, (d.hidden,), self.norm, d.eps) if want_hidden else None)
        normed = F.rms_norm(h, (d.hidden,), self.norm, d.eps) if (logits != "none" or want_hidden) else None
        out = self._vocab_logits(normed @ self.lm_head.t()) if logits != "none" else None  # [R, m or 1, vocab]
        return out, (normed if want_hidden else None)

    def _vocab_logits(self, out: torch.Tensor) -> torch.Tensor:
        """The LM head's output over the whole vocabulary (-inf outside a draft vocabulary)."""
        return out if self.vocab_ids is None else draft_logits(out, self.vocab_ids, self.dims.vocab)

    def run_layers(
        self,
        cache: StaticKVCache,
        h: torch.Tensor,  # [R*m, hidden] the layers' input (embeddings, or EAGLE's fused features)
        pos: torch.Tensor,  # [R, m] int64 cache slot each token's keys/values are written to
        rope_pos: torch.Tensor,  # [R, m] int64 rotary position of each token
        allowed: torch.Tensor,  # [R, m, kv_len] bool: which cache slots each token attends to
        rows: torch.Tensor | None = None,  # [R] int64 cache rows fed, or None for every row in order
    ) -> torch.Tensor:
        """The decoder layers alone (no embedding, no final norm): h -> [R*m, hidden]. Capturable."""
        d = self.dims
        R, m = pos.shape
        cache_rows = rows if rows is not None else cache.row_ids[:R]  # [R]
        if self.kernels == "fused":
            return self._fused_layers(cache, h, pos, rope_pos, allowed, cache_rows)
        kv_len = allowed.shape[-1]
        g, hkv, hq, hd = d.group, d.num_kv_heads, d.num_heads, d.head_dim
        # once per forward, shared by every layer:
        # rope factors for all q/k/v heads (v heads get cos 1, sin 0: one rope pass over qkv); the
        # q heads' factors carry attention's 1/sqrt(head_dim), so q comes out of rope scaled
        cos = self.rope_cos[rope_pos][:, :, None, :]  # [R, m, 1, hd]
        sin = self.rope_sin[rope_pos][:, :, None, :]
        scale = hd**-0.5
        cos = torch.cat([cos.expand(R, m, hq, hd) * scale, cos.expand(R, m, hkv, hd), cos.new_ones(R, m, hkv, hd)], dim=2)
        sin = torch.cat([sin.expand(R, m, hq, hd) * scale, sin.expand(R, m, hkv, hd), sin.new_zeros(R, m, hkv, hd)], dim=2)
        # additive mask; queries of the g heads sharing a KV head are stacked along the query axis
        # ([R, hkv, g*m, hd]), so the mask repeats g times
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=h.device).masked_fill_(~allowed, float("-inf"))
        mask = mask[:, None].expand(R, g, m, kv_len).reshape(R, 1, g * m, kv_len)
        return self._layers(cache, h, cos, sin, mask, cache_rows[:, None], pos, rows, kv_len, R, m)

    def _fused_layers(self, cache: StaticKVCache, h: torch.Tensor, pos: torch.Tensor, rope_pos: torch.Tensor,
                      allowed: torch.Tensor, cache_rows: torch.Tensor) -> torch.Tensor:
        """`run_layers` in six fused kernels a layer (kernels.py); cache_rows: [R] the cache row of each fed row."""
        d = self.dims
        m = pos.shape[1]
        pos, rope_pos = pos.reshape(-1).contiguous(), rope_pos.reshape(-1).contiguous()  # [R*m]; callers pass expanded views
        for layer, w in enumerate(self.layers):
            kv = cache.kv[layer]
            q = fused_kernels.qkv_rope(h, w.attn_norm, d.eps, w.wqkv, self.rope_cos, self.rope_sin, rope_pos, kv, cache_rows,
                                 pos, d.num_heads, d.num_kv_heads, m)
            h = fused_kernels.linear(fused_kernels.attention(q, kv, cache_rows, allowed, d.num_kv_heads), w.wo, residual=h)
            h = fused_kernels.linear(fused_kernels.gate_up(h, w.mlp_norm, d.eps, w.w_gate_up), w.w_down, residual=h)
        return h

    def _layers(self, cache: StaticKVCache, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                row_idx: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor | None, kv_len: int, R: int, m: int) -> torch.Tensor:
        """The decoder layers: h [R*m, hidden] -> [R*m, hidden]."""
        d = self.dims
        g, hkv, hq, hd = d.group, d.num_kv_heads, d.num_heads, d.head_dim
        half = hd // 2
        for layer, w in enumerate(self.layers):
            # attention
            x = F.rms_norm(h, (d.hidden,), w.attn_norm, d.eps)
            qkv = (x @ w.wqkv.t()).view(R, m, hq + 2 * hkv, hd)
            qkv = torch.addcmul(qkv * cos, qkv.roll(half, dims=-1), sin)  # rope on q and k, v unchanged
            cache.write(layer, row_idx, pos, qkv[:, :, hq:])
            k, v = cache.read(layer, kv_len, rows)  # [R, hkv, kv_len, hd]
            q = qkv[:, :, :hq].reshape(R, m, hkv, g, hd).permute(0, 2, 3, 1, 4).reshape(R, hkv, g * m, hd)
            o = attention(q, k, v, mask)  # [R, hkv, g*m, hd]
            o = o.view(R, hkv, g, m, hd).permute(0, 3, 1, 2, 4).reshape(R * m, hq * hd)
            h = torch.addmm(h, o, w.wo.t())  # residual folded into the GEMM
            # MLP
            x = F.rms_norm(h, (d.hidden,), w.mlp_norm, d.eps)
            gate, up = (x @ w.w_gate_up.t()).chunk(2, dim=-1)
            h = torch.addmm(h, F.silu(gate) * up, w.w_down.t())
        return h


CAPTURE_FAILURES: list[str] = []  # why each failed capture of this process failed (its function runs eagerly)


@contextmanager
def no_collection() -> Iterator[None]:
    """Python's cyclic garbage collector paused (as it was before, afterwards). Engines hold their
    graphs in reference cycles, so a dropped engine's graphs are freed by a collection pass; one that
    runs during another graph's capture destroys a CUDA graph mid-capture, which invalidates that
    capture and leaves its memory pool recording, so later captures in the pool fail too, and their
    functions run eagerly. Seen in the bench logs of sessions 14, 21 and 25, each while the advisor
    built its engines; in sessions 14 and 25 the advisor's EAGLE engine then ran 2-3x slower a step."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class CapturedFn:
    """A zero-argument function over static buffers, captured once as a CUDA graph and replayed
    per call; off CUDA, or with graphs off, it is simply called.

    Warm-up runs the function twice (on a side stream, as CUDA graph capture requires), so it
    must tolerate running on whatever its buffers hold. Tensors the function returns live in the
    graph's memory: read or copy them before the next replay of any graph of the same pool.
    The garbage collector is paused while capturing (`no_collection`).
    """

    def __init__(self, fn: Callable[[], object], use_graph: bool, pool=None, stream=None) -> None:
        self.fn = fn
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: object = None
        self.error: str | None = None  # why capture failed (the function then runs eagerly)
        if use_graph:
            # one side stream per owner for warm-up and capture: cuBLAS keeps a workspace per
            # stream for the life of the process (32 MiB on an H100), so a fresh stream per graph
            # would pin 32 MiB per graph
            stream = stream or torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.no_grad(), torch.cuda.stream(stream):
                for _ in range(2):
                    fn()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            try:
                with no_collection(), torch.no_grad(), torch.cuda.graph(graph, pool=pool, stream=stream):
                    self.out = fn()
                self.graph = graph
            except RuntimeError as e:  # a kernel that cannot be captured: stay correct, run eagerly
                self.error = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                self.out = None
                CAPTURE_FAILURES.append(self.error)
                log.warning("CUDA graph capture failed, running eagerly: %s", self.error)
                torch.cuda.synchronize()

    def __call__(self):
        if self.graph is None:
            with torch.no_grad():
                return self.fn()
        self.graph.replay()
        return self.out


KERNELS = ("fused", "torch")


def choose_kernels(dims: LlamaDims, device: torch.device, requested: str | None = None) -> str:
    """Which layer implementation a `LeanLlama` runs: `requested`, else $SPECDEPLOY_KERNELS, else
    "fused" (Triton, kernels.py) on CUDA where Triton is installed and head_dim is a power of two
    >= 32, "torch" otherwise. "fused" off CUDA runs Triton's interpreter (tests only)."""
    choice = requested or os.environ.get("SPECDEPLOY_KERNELS") or None
    if choice not in (None, *KERNELS):
        raise SpecDeployError(f"kernels must be one of {', '.join(KERNELS)}, not {choice!r}")
    device = torch.device(device)
    hd = dims.head_dim
    can_run = hd >= 32 and hd & (hd - 1) == 0 and fused_kernels.available(device)
    if choice == "fused" and not can_run:
        raise SpecDeployError("fused kernels need Triton (on CUDA, or TRITON_INTERPRET=1) and a power-of-two head_dim >= 32")
    return choice or ("fused" if can_run and device.type == "cuda" else "torch")


def graphs_default(device: torch.device) -> bool:
    return device.type == "cuda"


class CudaGraphRunner:
    """Runner (see runner.py) for one request over a `LeanLlama`: static KV cache, query lengths
    bucketed, each (query bucket, KV bucket) a CUDA graph captured at load.

    `forward(tokens)` pads the tokens to the next query bucket (longer inputs go in chunks of the
    largest bucket); `rollback(keep)` only sets the length. Token trees (`supports_tree`) go
    through the same graphs: every forward reads its ancestry ([maxq, maxq] bool) and depths
    ([maxq]) from static buffers, lower-triangular and 0, 1, 2, ... for chains, overwritten by
    `forward(tokens, tree_parents)` for a tree (at most the largest query bucket of tokens).
    Token i is written at slot length + i and rotated at position length + depth_i;
    `keep_path` gathers the accepted slots' keys/values down behind the kept prefix.
    For a verdict decided on the device, `gather_path` queues that gather from device positions and
    `stage` the next forward's inputs, so that `forward_staged`, once the host knows the length, only
    sets the positions and replays (runner.py, "Staging").
    """

    supports_tree = True

    def __init__(self, model: LeanLlama, *, max_length: int | None = None,
                 query_buckets: Sequence[int] = DEFAULT_QUERY_BUCKETS, kv_buckets: Sequence[int] | None = None,
                 use_graphs: bool | None = None, output_hidden: bool = False, capture: bool = True,
                 pool=None) -> None:
        self.model = model
        self.device = model.device
        self.vocab_size = model.dims.vocab
        self.max_length = context_length(model.dims, max_length)
        self.output_hidden = output_hidden
        self.query_buckets = tuple(sorted(set(query_buckets)))
        self.positions = self.max_length + self.query_buckets[-1]  # room for the padding of a last chunk
        self.kv_buckets = tuple(sorted(kv_buckets)) if kv_buckets else kv_buckets_for(self.positions)
        if self.kv_buckets[-1] < self.positions:
            raise SpecDeployError(f"the largest KV bucket must cover {self.positions} positions")
        self.use_graphs = graphs_default(self.device) if use_graphs is None else use_graphs
        self._pool = pool if pool is not None else (torch.cuda.graph_pool_handle() if self.use_graphs else None)
        self._stream = torch.cuda.Stream(self.device) if self.use_graphs else None  # warm-up and capture
        self.cache = model.new_cache(1, self.positions)
        maxq = self.query_buckets[-1]
        self._tokens = torch.zeros(1, maxq, dtype=torch.long, device=self.device)  # [1, maxq] static input
        self._pos = torch.zeros(1, maxq, dtype=torch.long, device=self.device)  # [1, maxq] static input
        self._offsets = torch.arange(maxq, device=self.device)  # [maxq]
        self._chain_ancestry = torch.ones(maxq, maxq, dtype=torch.bool, device=self.device).tril()  # [maxq, maxq]
        self._ancestry = self._chain_ancestry.clone()[None]  # [1, maxq, maxq] static input
        self._depth = self._offsets.clone()  # [maxq] static input: depth of each fed token below the first
        self._parents = torch.full((maxq,), -1, dtype=torch.long, device=self.device)  # [maxq] a tree's parents
        self._tree_nodes = 0  # rows of _ancestry / _depth a tree overwrote (restored before a chain)
        self._staged: int | None = None  # tokens `stage` wrote for `forward_staged`
        self._fns: dict[tuple[int, int], CapturedFn] = {}
        self._tree_fns: dict[int, CapturedFn] = {}  # per query bucket: _parents -> _ancestry, _depth
        self._length = 0
        if capture and self.use_graphs:
            self.capture_all()

    @classmethod
    def from_hf(cls, model: nn.Module, num_layers: int | None = None, **kw) -> "CudaGraphRunner":
        return cls(LeanLlama.from_hf(model, num_layers), **kw)

    def capture_all(self) -> None:
        """Capture every (query bucket, KV bucket) graph now (at load), not at first use."""
        for q in self.query_buckets:
            for kv in self.kv_buckets:
                if kv >= q:
                    self._fn(q, kv)
            if q > 1:
                self._tree_fn(q)
        self._length = 0
        self._tree_nodes = self.query_buckets[-1]  # the tree steps' warm-up wrote the ancestry: the next chain restores it

    @property
    def num_graphs(self) -> int:
        return sum(f.graph is not None for f in self._fns.values())

    def close(self) -> None:
        """Drop the graphs now (their closures refer back to this runner, so only a GC pass would)."""
        self._fns.clear()
        self._tree_fns.clear()

    @property
    def length(self) -> int:
        return self._length

    def reset(self) -> None:
        self._length = 0
        self._staged = None

    def rollback(self, keep: int) -> None:
        if not 0 <= keep <= self._length:
            raise ValueError(f"cannot keep {keep} of {self._length} cache entries")
        self._length = keep

    def keep_path(self, keep: int, path: list[int]) -> None:
        """Keep the first `keep` cache entries, then the entries at positions `path` (ascending,
        all >= keep) moved down behind them; drop the rest. One gather over every layer."""
        n = len(path)
        if path_needs_move(keep, path, self._length):
            self.cache.move(keep, ids_on(self.device, path))
        self._length = keep + n

    def gather_path(self, keep: int, src: torch.Tensor) -> None:
        """`keep_path`'s move from positions on the device, queued without a host sync: the entries at
        `src` [n] (int64, >= keep; rows past the accepted ones may repeat any cached position) copied to
        keep .. keep + n, the length left as it is for `rollback(keep + accepted)` to set."""
        if keep + int(src.numel()) > self.positions:
            raise ValueError(f"cannot move {src.numel()} entries behind {keep} in a cache of {self.positions}")
        self.cache.move(keep, src)

    def stage(self, tokens: torch.Tensor, tree_parents: torch.Tensor | None = None) -> None:
        """Write the next forward's inputs (as `forward` takes them, at most the largest query bucket
        of tokens, on the device) into the static buffers now, before the cache length is known:
        `forward_staged` then only sets the positions and replays. Any other forward drops it."""
        m = int(tokens.numel())
        if not 0 < m <= self.query_buckets[-1]:
            raise ValueError(f"can stage 1 to {self.query_buckets[-1]} tokens, not {m}")
        self._set_tree(tree_parents, m)
        self._tokens[0, :m].copy_(tokens.reshape(-1), non_blocking=True)
        self._staged = m

    def forward_staged(self) -> Step:
        """`forward` of the tokens `stage` wrote, at the current cache length."""
        m, self._staged = self._staged, None
        if m is None:
            raise RuntimeError("forward_staged: nothing staged since the last forward")
        if self._length + m > self.max_length:
            raise ValueError(f"KV cache would hold {self._length + m} tokens, over the context of {self.max_length}")
        logits, hidden = self._replay(m)
        return Step(logits=logits, hidden=hidden)

    def _set_tree(self, tree_parents: torch.Tensor | None, m: int) -> None:
        """Fill the static ancestry and depth buffers for this forward (a tree, or back to a chain)."""
        if tree_parents is None:
            n = self._tree_nodes
            if n:  # device-to-device, only after a tree
                self._ancestry[0, :n, :n].copy_(self._chain_ancestry[:n, :n])
                self._depth[:n].copy_(self._offsets[:n])
                self._tree_nodes = 0
            return
        if m > self.query_buckets[-1]:
            raise ValueError(f"a token tree of {m} nodes is over the largest query bucket {self.query_buckets[-1]}")
        if tree_parents.device.type == "cpu":  # device parents come from a drafter (see ancestor_matrix)
            check_parents(tree_parents)
        q = bucket(m, self.query_buckets)
        self._parents[:q].fill_(-1)  # padding rows: roots of their own, seen by no real row
        self._parents[:m].copy_(tree_parents, non_blocking=True)
        self._tree_fn(q)()
        self._tree_nodes = max(self._tree_nodes, q)

    def _tree_fn(self, q: int) -> CapturedFn:
        """The ancestry and depths of the first q `_parents`, into the static buffers: one replay, not the
        launches of every pointer-jumping round."""
        fn = self._tree_fns.get(q)
        if fn is None:
            def step():
                if self.model.kernels == "fused":  # one launch
                    fused_kernels.tree_ancestry(self._parents[:q], self._ancestry[0], self._depth[:q])
                    return
                anc = ancestor_matrix(self._parents[:q])  # [q, q]
                self._ancestry[0, :q, :q].copy_(anc)
                self._depth[:q].copy_(anc.sum(-1) - 1)

            fn = self._tree_fns[q] = CapturedFn(step, self.use_graphs, self._pool, self._stream)
        return fn

    def _fn(self, q: int, kv: int) -> CapturedFn:
        fn = self._fns.get((q, kv))
        if fn is None:
            def step():
                pos = self._pos[:, :q]
                return self.model.forward(self.cache, self._tokens[:, :q], pos, None, kv, logits="all",
                                          want_hidden=self.output_hidden, rope_pos=pos[:, :1] + self._depth[None, :q],
                                          ancestry=self._ancestry[:, :q, :q])

            fn = self._fns[(q, kv)] = CapturedFn(step, self.use_graphs, self._pool, self._stream)
        return fn

    def forward(self, tokens: torch.Tensor, tree_parents: torch.Tensor | None = None) -> Step:
        """tokens: [m] int64; tree_parents: [m] int64 index of each token's parent among `tokens`
        (-1 = the last cache entry), or None for a plain causal chain."""
        m = int(tokens.numel())
        if m == 0:
            raise ValueError("forward needs at least one token")
        if self._length + m > self.max_length:
            raise ValueError(f"KV cache would hold {self._length + m} tokens, over the context of {self.max_length}")
        tokens = tokens.reshape(-1)
        maxq = self.query_buckets[-1]
        self._staged = None
        self._set_tree(tree_parents, m)
        logits, hidden = [], []
        for start in range(0, m, maxq):
            chunk = tokens[start : start + maxq]
            self._tokens[0, : chunk.numel()].copy_(chunk, non_blocking=True)  # padding keeps old (valid) ids
            out, hid = self._replay(int(chunk.numel()))
            logits.append(out)
            hidden.append(hid)
        return Step(logits=logits[0] if len(logits) == 1 else torch.cat(logits),
                    hidden=(torch.cat(hidden) if self.output_hidden else None))

    def _replay(self, c: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the c tokens in the static inputs at the current length (then c entries longer):
        their logits (float32) and hidden states (or None), copied before the next replay."""
        q = bucket(c, self.query_buckets)
        kv = bucket(self._length + q, self.kv_buckets)
        torch.add(self._offsets[:q], self._length, out=self._pos[0, :q])
        out, hid = self._fn(q, kv)()
        self._length += c
        return out[0, :c].to(torch.float32, copy=True), hid[0, :c].clone() if self.output_hidden else None


COMPILED_METHODS = ("none", "ngram", "layerskip", "draft", *HEAD_METHODS)


def compiled_for(spec, target, draft=None, max_length: int | None = None):
    """(target runner, proposer) for `SpecEngine` on CUDA: a `CudaGraphRunner` for the target
    (returning hidden states for Medusa / EAGLE / lookup-first multi, whose heads run as built by
    `build_head_proposer`) and one for a layerskip or draft model. (None, None) where the
    compiled path does not apply (another method, or a model family the lean forward does not
    cover): the engine then stays eager.

    spec: SpecConfig; target / draft: LoadedModel (draft None: the shipped DraftLM artifact).
    """
    from specdeploy.runtime.proposers import DraftModelProposer, NGramProposer, NoProposer

    if spec.method not in COMPILED_METHODS:
        return None, None
    try:
        lean = LeanLlama.from_hf(target.model)
    except SpecDeployError as e:
        log.warning("compiled runner not used: %s", e)
        return None, None
    if spec.method in HEAD_METHODS:
        from specdeploy.runtime.head_proposers import build_head_proposer

        length = context_length(lean.dims, max_length)
        proposer = build_head_proposer(spec, target, graph_max_length=length)  # EAGLE trees as graphs too
        # a verify forward holds the pending token + the whole tree: one query bucket must fit it
        nodes = 1 + getattr(proposer, "max_nodes", 0)
        buckets = DEFAULT_QUERY_BUCKETS
        if nodes > buckets[-1]:
            buckets = (*buckets, 1 << (nodes - 1).bit_length())
        return CudaGraphRunner(lean, max_length=length, query_buckets=buckets, output_hidden=True), proposer
    runner = CudaGraphRunner(lean, max_length=max_length)
    if spec.method == "none":
        return runner, NoProposer()
    if spec.method == "ngram":
        return runner, NGramProposer(spec.ngram_min, spec.ngram_max)
    draft_model = None
    if spec.method == "draft" and draft is not None:
        from specdeploy.models.tokenizers import check_compatible

        check_compatible(target.tokenizer, draft.tokenizer)
        draft_model = draft.model
    return runner, DraftModelProposer(CudaGraphRunner(lean_draft(spec, target, lean, draft_model), max_length=runner.max_length),
                                      spec.confidence)


def lean_draft(spec, target, lean: LeanLlama, draft_model: nn.Module | None = None) -> LeanLlama:
    """The draft of a layerskip or draft SpecConfig as a `LeanLlama`: the first layers of the target's
    `lean`, or `draft_model` (an HF model; None: the DraftLM artifact `spec.draft`, default the shipped one)."""
    if spec.method == "layerskip":
        from specdeploy.models.layerskip import layerskip_layers

        return lean.truncated(layerskip_layers(lean.num_layers, spec.layerskip_layers))
    if draft_model is None:
        from specdeploy.models import draft_lm

        draft_model = draft_lm.load(spec.draft, target)
    return LeanLlama.from_hf(draft_model)
