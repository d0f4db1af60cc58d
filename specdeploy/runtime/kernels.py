"""Fused Llama decoder-layer kernels in Triton (the GPU kernel language, not the inference server).

Why: a compiled step of a small model is a chain of tiny launches, each a few microseconds
whatever it computes (SmolLM2-135M: ~17 kernels a layer, 30 layers, results/gpu/run6_kernels.md).
These kernels do one layer in six launches over `StaticKVCache`'s layout:

1. `qkv_rope`: RMSNorm -> fused q/k/v projection -> rotary embedding; q (scaled by
   1/sqrt(head_dim)) to a buffer, k and v straight into the KV cache;
2. `attention`: split-KV decode attention ("flash-decoding"): a program scores one 64-key block
   of one KV head against every query that shares it (GQA) under the boolean `allowed` mask,
   then a combine kernel merges the blocks' softmax partials in key order;
3. `linear(residual=h)`: the output projection added to the residual stream;
4. `gate_up`: RMSNorm -> gate/up projection -> silu(gate) * up;
5. `linear(residual=h)`: the down projection.

`linear(norm=...)` also serves the LM head. The rest are a speculative step's bookkeeping, each one
launch where the torch ops take several: EAGLE drafting (`eagle_input`, `tree_level_mask`, `logits_topk`,
`eagle_frontier`, `best_nodes`), the verify's tree ancestry (`tree_ancestry`) and the verdict (`tree_accept`).

Row independence: every matrix product tiles the token rows by 16 with a fixed reduction order over the inner dimension, and attention splits keys
at fixed 64-key boundaries (extra all-masked blocks add exact zeros), so a token's outputs do not
depend on how many other tokens share the launch, nor on the KV bucket. Accumulation is float32;
float32 models multiply in IEEE float32 (no TF32).

Off CUDA the kernels run under Triton's interpreter (TRITON_INTERPRET=1, CPU tensors): that is
how CI checks them against the torch forward of cuda_runner.py.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass

import torch

BLOCK_M = 16  # token rows per program: the smallest tile of Triton's dot, fixed for row independence
KEY_BLOCK = 64  # keys per attention program; also the split of the combine (fixed: see module docstring)


@dataclass(frozen=True)
class Tile:
    """Launch shape of one matrix kernel: output columns and inner-dimension step per program."""

    block_n: int  # qkv_rope: dims of each half of a head per program
    block_k: int
    warps: int = 4
    stages: int = 3


# scripts/kernel_bench.py's variant "n16k128w2": on an H200 the lowest summed step time over its seven
# shapes (1-64 tokens, 1-32 rows: 9.77 ms against 9.99-12.39 for the others, results/gpu/run11_kernels.json);
# narrow column blocks for more programs, 128-wide inner steps, two warps
TILES = {"qkv": Tile(16, 64, 2), "linear": Tile(16, 128, 2), "lm_head": Tile(128, 64), "gate_up": Tile(16, 128, 2)}


def available(device: torch.device) -> bool:
    """Whether the fused kernels can run for tensors on `device`: CUDA with Triton installed, or any
    device under Triton's interpreter."""
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _kernels():
    """The jitted kernels, defined on first use (importing Triton costs ~1 s and is optional)."""
    from specdeploy.runtime import _triton_kernels

    return _triton_kernels


def _ieee(dtype: torch.dtype) -> bool:
    return dtype == torch.float32


def qkv_rope(x: torch.Tensor, norm_w: torch.Tensor, eps: float, wqkv: torch.Tensor, cos: torch.Tensor,
             sin: torch.Tensor, rope_pos: torch.Tensor, kv: torch.Tensor, cache_rows: torch.Tensor,
             pos: torch.Tensor, num_heads: int, num_kv_heads: int, tokens_per_row: int) -> torch.Tensor:
    """RMSNorm, q/k/v projection and rope for x [M, hidden] (M = rows * tokens_per_row); returns q
    [M, heads, head_dim] scaled by 1/sqrt(head_dim) and writes k / v into `kv`, one layer of the
    cache [batch, kv_heads, 2, positions, head_dim], at cache row cache_rows [rows] and position
    pos [M] of each token. cos / sin: [rope_positions, head_dim] (sin sign-folded as
    `rope_tables` gives it); rope_pos: [M] int64 rotary position of each token. The index tensors
    must be contiguous (the kernel reads them by offset): make them so once per forward, not here
    once per layer."""
    if not (pos.is_contiguous() and rope_pos.is_contiguous() and cache_rows.is_contiguous()):
        raise ValueError("qkv_rope: pos, rope_pos and cache_rows must be contiguous")
    x = x.contiguous()
    M, hidden = x.shape
    hd = kv.shape[-1]
    q = torch.empty(M, num_heads, hd, device=x.device, dtype=x.dtype)
    t = TILES["qkv"]
    block_h = min(t.block_n, hd // 2)
    grid = (_cdiv(M, BLOCK_M), (num_heads + 2 * num_kv_heads) * (hd // 2 // block_h))
    _kernels().qkv_rope_kernel[grid](
        x, norm_w, wqkv, cos, sin, rope_pos, q, kv, cache_rows, pos,
        M, hidden, eps, hd**-0.5, tokens_per_row, num_heads, num_kv_heads,
        cos.stride(0), kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3),
        HALF=hd // 2, BLOCK_H=block_h, BLOCK_M=BLOCK_M, BLOCK_K=t.block_k, IEEE=_ieee(x.dtype),
        num_warps=t.warps, num_stages=t.stages)
    return q


def attention(q: torch.Tensor, kv: torch.Tensor, cache_rows: torch.Tensor, allowed: torch.Tensor,
              num_kv_heads: int) -> torch.Tensor:
    """softmax(q kᵀ + mask) v for q [rows * m, heads, head_dim] (already scaled) against one layer
    of the cache kv [batch, kv_heads, 2, positions, head_dim], rows' cache rows `cache_rows` [rows],
    allowed [rows, m, kv_len] bool -> [rows * m, heads * head_dim]."""
    R, m, kv_len = allowed.shape
    _, heads, hd = q.shape
    g = heads // num_kv_heads
    gm = g * m  # the queries of the g heads sharing a KV head, stacked
    block_q = 16  # fixed, like BLOCK_M: a query's softmax sums must not depend on how many share the launch
    q_blocks = _cdiv(gm, block_q)
    splits = _cdiv(kv_len, KEY_BLOCK)
    part_o = torch.empty(R * num_kv_heads, splits, q_blocks * block_q, hd, device=q.device, dtype=torch.float32)
    part_ml = torch.empty(R * num_kv_heads, splits, 2, q_blocks * block_q, device=q.device, dtype=torch.float32)
    k = _kernels()
    k.attn_partial_kernel[(R * num_kv_heads, splits, q_blocks)](
        q, kv, cache_rows, allowed.contiguous().view(torch.uint8), part_o, part_ml,
        m, kv_len, num_kv_heads, g, splits,
        kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3),
        HD=hd, BLOCK_Q=block_q, BLOCK_N=KEY_BLOCK, IEEE=_ieee(q.dtype), num_warps=4, num_stages=2)
    out = torch.empty(R * m, heads * hd, device=q.device, dtype=q.dtype)
    k.attn_combine_kernel[(R * num_kv_heads, q_blocks)](
        part_o, part_ml, out, m, num_kv_heads, g, splits,
        HD=hd, BLOCK_Q=block_q, UNROLL=4, num_warps=4)
    return out


def linear(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor | None = None,
           norm_w: torch.Tensor | None = None, eps: float = 0.0, out: torch.Tensor | None = None) -> torch.Tensor:
    """[residual +] rmsnorm?(x) @ wᵀ: x [M, K], w [N, K], residual [M, N] -> [M, N] (into `out`,
    which may be `residual` itself: each element is read before it is written, by one program)."""
    x = x.contiguous()
    M, K = x.shape
    N = w.shape[0]
    if out is None:
        out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    t = TILES["linear" if N <= 4096 else "lm_head"]
    grid = (_cdiv(M, BLOCK_M), _cdiv(N, t.block_n))
    _kernels().linear_kernel[grid](
        x, w, residual if residual is not None else out, norm_w if norm_w is not None else w, out,
        M, N, K, eps,
        HAS_RES=residual is not None, HAS_NORM=norm_w is not None,
        BLOCK_M=BLOCK_M, BLOCK_N=t.block_n, BLOCK_K=t.block_k, IEEE=_ieee(x.dtype),
        num_warps=t.warps, num_stages=t.stages)
    return out


def gate_up(x: torch.Tensor, norm_w: torch.Tensor, eps: float, w_gate_up: torch.Tensor) -> torch.Tensor:
    """silu(g) * u where [g | u] = rmsnorm(x) @ w_gate_upᵀ: x [M, hidden], w_gate_up [2 * I, hidden]
    (gate rows, then up rows) -> [M, I]."""
    x = x.contiguous()
    M, K = x.shape
    inter = w_gate_up.shape[0] // 2
    out = torch.empty(M, inter, device=x.device, dtype=x.dtype)
    t = TILES["gate_up"]
    grid = (_cdiv(M, BLOCK_M), _cdiv(inter, t.block_n))
    _kernels().gate_up_kernel[grid](
        x, norm_w, w_gate_up, out, M, inter, K, eps,
        BLOCK_M=BLOCK_M, BLOCK_N=t.block_n, BLOCK_K=t.block_k, IEEE=_ieee(x.dtype),
        num_warps=t.warps, num_stages=t.stages)
    return out


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def logits_topk(x: torch.Tensor, w: torch.Tensor, k: int, bias: torch.Tensor | None = None,
                out: tuple[torch.Tensor, torch.Tensor] | None = None,
                ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of log_softmax(x @ wᵀ) per row, plus bias: x [M, K], w [V, K], bias [M] float32 ->
    (values [M, k] float32, indices [M, k] int64), best first, ties to the lowest index; into `out`
    (contiguous, M * k elements each) if given. ids [V] int64 (contiguous): the token id of each row
    of w (a draft vocabulary's rows of an LM head), returned instead of the row index.

    Two launches, where `torch.log_softmax(F.linear(x, w).float(), -1).topk(k)` takes a dozen (the
    multi-block top-k alone is most of them): each program scores one BLOCK_V slice of the
    vocabulary and keeps its k best and its softmax partials; one program per row merges them.
    Logits are rounded to the model dtype before the softmax, as a linear layer's output is."""
    x = x.contiguous()
    M, K = x.shape
    V = w.shape[0]
    nb = _cdiv(V, LOGITS_BLOCK_V)
    part_val = torch.empty(M, nb, k, device=x.device, dtype=torch.float32)
    part_idx = torch.empty(M, nb, k, device=x.device, dtype=torch.int32)
    part_ml = torch.empty(M, nb, 2, device=x.device, dtype=torch.float32)
    kern = _kernels()
    kern.logits_topk_partial_kernel[(_cdiv(M, BLOCK_M), nb)](
        x, w, part_val, part_idx, part_ml, M, V, K,
        TOPK=k, BLOCK_M=BLOCK_M, BLOCK_V=LOGITS_BLOCK_V, BLOCK_K=64, IEEE=_ieee(x.dtype), num_warps=4, num_stages=3)
    values, indices = out if out is not None else (torch.empty(M, k, device=x.device, dtype=torch.float32),
                                                   torch.empty(M, k, device=x.device, dtype=torch.long))
    if not (values.is_contiguous() and indices.is_contiguous() and values.numel() == indices.numel() == M * k):
        raise ValueError("logits_topk: out must be two contiguous tensors of M * k elements")
    if ids is not None and not (ids.is_contiguous() and ids.dtype == torch.long and ids.numel() == V):
        raise ValueError(f"logits_topk: ids must be a contiguous int64 tensor of {V} token ids")
    kern.logits_topk_combine_kernel[(M,)](
        part_val, part_idx, part_ml, bias if bias is not None else part_ml, ids if ids is not None else part_idx,
        values, indices, nb, TOPK=k, HAS_BIAS=bias is not None, HAS_IDS=ids is not None,
        BLOCK_C=_pow2(nb * k), BLOCK_NB=_pow2(nb), num_warps=8)
    return values, indices


def eagle_frontier(cand_score: torch.Tensor, cand_tok: torch.Tensor, ids: torch.Tensor, feats: torch.Tensor,
                   anc: torch.Tensor, start: int, k: int, out: tuple[torch.Tensor, ...]) -> None:
    """One EAGLE tree level's bookkeeping, one launch (the torch ops take about ten): cand_score /
    cand_tok [k * k] (children of frontier row r at r * k ..), ids [k] the frontier's node numbers,
    feats [k, H] its rows' features, anc [k, S] bool its rows' ancestor flags. Writes into
    out = (parents [k * k], then the next frontier: node numbers [k] (start + candidate), tokens [k],
    scores [k], features [k, H], ancestor flags [k, S]); the k best candidates, best first, ties to
    the lowest index (as `logits_topk`). Every tensor contiguous."""
    parents, id_out, tok_out, score_out, feat_out, anc_out = out
    tensors = (cand_score, cand_tok, ids, feats, anc, *out)
    if not all(t.is_contiguous() for t in tensors):
        raise ValueError("eagle_frontier: every tensor must be contiguous")
    H, S = feats.shape[1], anc.shape[1]
    _kernels().eagle_frontier_kernel[(1,)](
        cand_score, cand_tok, ids, feats, anc.view(torch.uint8), parents, id_out, tok_out, score_out, feat_out,
        anc_out.view(torch.uint8), start, H, S,
        K=k, BLOCK_C=_pow2(k * k), BLOCK_K=_pow2(k), BLOCK_H=_pow2(H), BLOCK_S=_pow2(S), num_warps=4)


def tree_accept(tokens: torch.Tensor, parents: torch.Tensor, target: torch.Tensor,
                p_child: torch.Tensor | None = None, u: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """A verdict over a token tree in one launch (the host walks of verify.py, whose results it equals):
    tokens / parents [n] int64 (a chain: parents i - 1); target [n + 1] int64 the target's argmax after the
    pending token and each node (greedy) or, with p_child / u [n] (sampled point-mass children: each
    node's probability under its parent's distribution, and its uniform draw), the token recovered
    there. Returns (out, B): out int64 [2 + 3B] as `tree_accept_kernel` lays it out (committed count,
    count - 1, B target rows, B tokens after them, the parents), B = the power of two > n, at least 16."""
    n = int(tokens.numel())
    block = max(_pow2(n + 1), 16)
    out = torch.empty(2 + 3 * block, dtype=torch.long, device=tokens.device)
    sampled = p_child is not None
    _kernels().tree_accept_kernel[(1,)](tokens.contiguous(), parents.contiguous(), target.contiguous(),
                                        p_child if sampled else target, u if sampled else target, out, n,
                                        SAMPLED=sampled, BLOCK=block, num_warps=1 if not sampled or block <= 32 else 4)
    return out, block


def warm_tree_accept(device: torch.device, max_nodes: int) -> None:
    """Compile `tree_accept` now for trees of up to `max_nodes` nodes, greedy and sampled (each block size
    is a variant): Triton compiles a kernel at its first launch, up to a second that would otherwise land
    in a user's first request."""
    block = 16
    while True:
        n = block - 1
        tokens = torch.zeros(n, dtype=torch.long, device=device)
        parents, target = torch.arange(-1, n - 1, device=device), torch.zeros(n + 1, dtype=torch.long, device=device)
        tree_accept(tokens, parents, target)
        tree_accept(tokens, parents, target, torch.zeros(n, device=device), torch.ones(n, device=device))
        if block > max_nodes:
            return
        block *= 2


def tree_ancestry(parents: torch.Tensor, ancestry: torch.Tensor, depth: torch.Tensor) -> None:
    """`tree.ancestor_matrix` and the depths in one launch (0.022 ms of GPU time for 64 nodes against
    0.054 for the torch ops' graph, results/gpu/session17/d): parents [q] int64 (-1: a child of the pending token) -> ancestry[:q, :q] (bool, rows contiguous) and depth[:q]
    (int64: ancestors below each node, 0 for the pending token's children)."""
    q = int(parents.numel())
    if not (parents.is_contiguous() and depth.is_contiguous() and ancestry.stride(-1) == 1):
        raise ValueError("tree_ancestry: parents, depth and ancestry's rows must be contiguous")
    block = max(_pow2(q), 16)
    _kernels().tree_ancestry_kernel[(1,)](parents, ancestry.view(torch.uint8), depth, q, ancestry.stride(0),
                                          ROUNDS=max((q - 1).bit_length(), 1), BLOCK=block,
                                          num_warps=4 if block <= 64 else 8)


def best_nodes(tok: torch.Tensor, score: torch.Tensor, parent: torch.Tensor, size: int) -> torch.Tensor:
    """`tree.best_nodes` in one launch (the torch ops took 21: a depth-1 EAGLE draft went from 29 kernels to
    9, results/gpu/session17/d): [2, min(size, n)] int64, the tokens and renumbered parents of the
    best-scoring nodes (tok, score float32, parent: [n], contiguous)."""
    n = int(tok.numel())
    size = min(size, n)
    if not (tok.is_contiguous() and score.is_contiguous() and parent.is_contiguous()):
        raise ValueError("best_nodes: tok, score and parent must be contiguous")
    block = _pow2(max(n, 16))
    out = torch.empty(2, size, dtype=torch.long, device=tok.device)
    renumber = torch.empty(block, dtype=torch.long, device=tok.device)
    _kernels().best_nodes_kernel[(1,)](tok, score, parent, renumber, out, n, size, BLOCK=block, CHUNK=16,
                                       num_warps=4 if block <= 256 else 8)
    return out


LOGITS_BLOCK_V = 128  # vocabulary entries per program of `logits_topk`


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def eagle_input(features: torch.Tensor, tokens: torch.Tensor, embed: torch.Tensor, w: torch.Tensor,
                b: torch.Tensor) -> torch.Tensor:
    """EAGLE's input layer in one launch (embedding, concatenation and a linear layer take three):
    [features | embed[tokens]] @ wᵀ + b for features [M, H], tokens [M] int64, embed [vocab, H],
    w [N, 2H], b [N] -> [M, N]."""
    features = features.contiguous()
    M, H = features.shape
    N = w.shape[0]
    if w.shape[1] != 2 * H or embed.shape[1] != H:
        raise ValueError(f"eagle_input: w must be [N, {2 * H}] and embed [vocab, {H}]")
    out = torch.empty(M, N, device=features.device, dtype=features.dtype)
    t = TILES["linear"]
    _kernels().eagle_input_kernel[(_cdiv(M, BLOCK_M), _cdiv(N, t.block_n))](
        features, tokens.contiguous(), embed, w, b, out, M, N, H,
        BLOCK_M=BLOCK_M, BLOCK_N=t.block_n, BLOCK_K=t.block_k, IEEE=_ieee(features.dtype),
        num_warps=t.warps, num_stages=t.stages)
    return out


def tree_level_mask(anc: torch.Tensor, own: torch.Tensor, fed: torch.Tensor, anc_out: torch.Tensor,
                    allowed: torch.Tensor) -> None:
    """One EAGLE tree level's attention mask, one launch (an or, a compare and a scatter in torch):
    anc / own [k, S] bool (ancestor flags and each row's own scratch slot), fed [1] int64 (the first
    scratch position). Writes anc_out = anc | own, and allowed [k, kv_len] bool: positions < fed, and
    fed + s where anc_out flags s. Every tensor contiguous."""
    if not all(t.is_contiguous() for t in (anc, own, anc_out, allowed)):
        raise ValueError("tree_level_mask: every tensor must be contiguous")
    k, S = anc.shape
    _kernels().tree_level_mask_kernel[(k,)](
        anc.view(torch.uint8), own.view(torch.uint8), fed, anc_out.view(torch.uint8), allowed.view(torch.uint8),
        S, allowed.shape[1], BLOCK_S=_pow2(S), BLOCK_KV=256, num_warps=4)
