"""EAGLE-2 tree drafting over a static KV cache, every step a CUDA graph replay.

`GraphEagleProposer` drafts the same trees as `EagleProposer` (head_proposers.py): expand the
`topk` best nodes at each depth, keep the `tree_size` nodes of highest cumulative draft
log-probability. The eager proposer grows its cache by concatenation and builds masks of
growing width, so each level costs ~1 ms of Python and kernel launches on a GPU; here every
shape is fixed and a draft is two graph replays:

1. sync (per query bucket, KV bucket): the committed (feature, next token) pairs not yet in the
   head's cache, causal, padded to a query bucket as in `CudaGraphRunner`; the last real output
   is the root feature (the prediction at the pending position);
2. draft (per depth, KV bucket), one graph of
   - root: the root's top-k tokens open the tree (level 0);
   - levels d = 1 .. depth - 1: the k frontier nodes of level d - 1 go through the head at rotary
     position fed - 1 + d, written at cache slots fed + (d - 1) k + i, each seeing the committed
     cache and its ancestors' slots; their top-k children are scored and the k best become level
     d. Per-level state lives in [max_depth, ...] buffers, read at d - 1 and written at d through
     views (d is static in the graph);
   - select: the `tree_size` best nodes, renumbered parents first, left on the device.

Where the loop decides a step's verdict on the device (`verify.DeviceVerdict`), `draft_ahead` runs both
replays from it before the host has read it: the sync takes the committed rows and tokens the verdict
left on the device, padded to the most it can commit, and the next tree is drafted while the host takes
in the step; `propose` then hands that tree out.

Committed entries sit at slots [0, fed); tree entries past fed are scratch, overwritten by the
next sync, so nothing is ever cropped. The head's decoder layer runs through
`LeanLlama.run_layers`, its weights fused like the target's; the fc input layer, rotary
table (the head's own theta) and LM head are the head's and target's tensors, never copied.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from specdeploy.errors import SpecDeployError
from specdeploy.models.draft_vocab import DraftVocabLMHead
from specdeploy.models.eagle import EagleHead
from specdeploy.runtime import kernels as fused_kernels
from specdeploy.runtime.cuda_runner import (DEFAULT_QUERY_BUCKETS, CapturedFn, LeanLlama, LlamaDims, bucket,
                                            fuse_layer, graphs_default, kv_buckets_for, rope_tables)
from specdeploy.runtime.runner import ids_on
from specdeploy.runtime.tree import best_nodes
from specdeploy.runtime.types import Context, Draft
from specdeploy.runtime.verify import DeviceVerdict


class LeanEagleHead:
    """An EAGLE head over a static KV cache: fc([feature, embed(token)]), then the head's decoder layer
    as a one-layer `LeanLlama` (weights fused like the target's) with the head's own rotary table
    over `positions`. The fc weights, embedding and LM head are the head's and target's tensors,
    never copied. Shared by `GraphEagleProposer` (one request, trees) and the batched engine (chains)."""

    def __init__(self, head: EagleHead, embed: torch.Tensor, lm_head: torch.Tensor, positions: int) -> None:
        c = head.config
        self.hidden = c.hidden_size
        self.fc_weight, self.fc_bias = head.fc.weight, head.fc.bias  # [H, 2H], [H]
        dims = LlamaDims(num_layers=1, hidden=c.hidden_size, num_heads=c.num_attention_heads,
                         num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim, vocab=int(lm_head.shape[0]),
                         eps=c.rms_norm_eps, max_positions=positions)
        # the head's own rotary embedding (models/eagle.py `rope`): plain theta, float32 angles
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, device=embed.device, dtype=torch.float32) / c.head_dim))
        cos, sin = rope_tables(inv_freq, positions, embed.dtype)
        norm = torch.ones(c.hidden_size, device=embed.device, dtype=embed.dtype)  # unused: the head has no final norm
        self.lean = LeanLlama(dims, embed, [fuse_layer(head.layer)], norm, lm_head, cos, sin)

    def new_cache(self, batch: int, positions: int):
        return self.lean.new_cache(batch, positions)

    def __call__(self, cache, features: torch.Tensor, tokens: torch.Tensor, pos: torch.Tensor, rope_pos: torch.Tensor,
                 allowed: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Pairs (features [R, m, H] or [R*m, H], the token after each: tokens [R, m]) written at cache
        slots `pos` [R, m], rotated at `rope_pos` [R, m], attending `allowed` [R, m, kv_len];
        rows: [R] cache rows, None for every row in order. Returns the predicted features [R*m, H]."""
        features, tokens = features.reshape(-1, self.hidden), tokens.reshape(-1)
        if self.lean.kernels == "fused":
            x = fused_kernels.eagle_input(features, tokens, self.lean.embed, self.fc_weight, self.fc_bias)
        else:
            x = torch.cat([features, F.embedding(tokens, self.lean.embed).to(features.dtype)], dim=-1)
            x = F.linear(x, self.fc_weight, self.fc_bias)
        return self.lean.run_layers(cache, x, pos, rope_pos, allowed, rows)


class GraphEagleProposer:
    """EAGLE-2 token trees (deterministic, `probs is None`) from static buffers and captured steps.

    Trees are at most `max_depth` deep: a request for more draft tokens gets a `max_depth`-deep
    tree (still lossless, only shallower). Chains (tree_size 0) stay on `EagleProposer`.
    """

    needs_hidden = True

    def __init__(self, head: EagleHead, embed: torch.Tensor, lm_head: torch.Tensor, *, tree_size: int = 48,
                 topk: int = 8, max_depth: int = 8, max_length: int = 2048,
                 query_buckets: Sequence[int] = DEFAULT_QUERY_BUCKETS, use_graphs: bool | None = None,
                 capture: bool = True) -> None:
        if tree_size <= 0 or topk <= 0 or max_depth <= 0:
            raise SpecDeployError("GraphEagleProposer drafts trees: tree_size, topk and max_depth must be > 0")
        c = head.config
        self.tree_size, self.topk, self.max_depth = tree_size, topk, max_depth
        self.max_nodes = tree_size  # largest tree drafted
        self.device, self.dtype = embed.device, embed.dtype
        # the head's draft vocabulary (its rows of the LM head, and their ids), or the whole LM head
        vocab = None if head.draft_vocab is None else DraftVocabLMHead(lm_head, head.draft_vocab)
        self.vocab_ids = None if vocab is None else vocab.ids  # [N]
        self.lm_head = lm_head if vocab is None else vocab.weight.data  # [N or vocab, H]
        self.query_buckets = tuple(sorted(set(query_buckets)))
        k, maxq = topk, self.query_buckets[-1]
        self.scratch = (max_depth - 1) * k  # cache slots of the tree levels, after the committed pairs
        self.max_length = max_length
        positions = max_length + max(self.scratch, maxq)
        self.head = LeanEagleHead(head, embed, lm_head, positions)
        self.lean = self.head.lean
        self.cache = self.lean.new_cache(1, positions)
        self.kv_buckets = kv_buckets_for(positions)
        H, D, S = c.hidden_size, max_depth, max(self.scratch, 1)
        n_nodes = k + (max_depth - 1) * k * k
        dev = self.device
        self._keys = torch.arange(positions, device=dev)  # [positions]
        self._offsets = torch.arange(max(maxq, k * k, S), device=dev)
        # sync inputs
        self._feat_in = torch.zeros(maxq, H, device=dev, dtype=self.dtype)  # [maxq, H] committed features
        self._tok_in = torch.zeros(maxq, dtype=torch.long, device=dev)  # [maxq] the token after each
        self._fed = torch.zeros(1, dtype=torch.long, device=dev)  # [1] first slot of this step's entries
        self._root = torch.zeros(H, device=dev, dtype=self.dtype)  # [H] predicted feature, pending position
        # per-level frontier state, level 0 .. max_depth - 1 (level 0's ids and ancestors never change)
        self._front_feat = torch.zeros(D, k, H, device=dev, dtype=self.dtype)  # parent feature of each node
        self._front_tok = torch.zeros(D, k, dtype=torch.long, device=dev)
        self._front_score = torch.zeros(D, k, device=dev)  # cumulative draft log-probability
        self._front_id = torch.arange(k, device=dev).repeat(D, 1)  # [D, k] node number
        self._front_anc = torch.zeros(D, k, S, dtype=torch.bool, device=dev)  # which scratch slots are ancestors
        # level d's own scratch columns, (d - 1) k .. d k - 1: [D, k, S] bool, row d - 1 for level d
        self._own = torch.zeros(D, k, S, dtype=torch.bool, device=dev)
        for d in range(1, D):
            self._own[d - 1, :, (d - 1) * k : d * k] = torch.eye(k, dtype=torch.bool, device=dev)
        self._slots = torch.zeros(S, dtype=torch.long, device=dev)  # [S] cache slots of the scratch, fed + i
        self._rope = torch.zeros(D, k, dtype=torch.long, device=dev)  # [D, k] rotary position of level d, fed - 1 + d
        self._levels = torch.arange(D, device=dev)[:, None].repeat(1, k)  # [D, k] d
        # every node in creation order: parents are numbered before their children
        self._node_tok = torch.zeros(n_nodes, dtype=torch.long, device=dev)
        self._node_score = torch.zeros(n_nodes, device=dev)
        self._node_parent = torch.full((n_nodes,), -1, dtype=torch.long, device=dev)
        self.use_graphs = graphs_default(self.device) if use_graphs is None else use_graphs
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._stream = torch.cuda.Stream(self.device) if self.use_graphs else None
        self._fns: dict[tuple, CapturedFn] = {}
        self._fed_host = 0  # committed pairs in the cache
        self._ahead: tuple[int, DeviceVerdict, int, Draft] | None = None  # (pairs before, verdict, depth, draft)
        if capture and self.use_graphs:
            self.capture_all()

    @classmethod
    def from_head(cls, head: EagleHead, embed: torch.nn.Module, lm_head: torch.nn.Module, **kw) -> "GraphEagleProposer":
        return cls(head, embed.weight, lm_head.weight, **kw)

    def capture_all(self) -> None:
        """Capture every step now (at load): a draft step changes state, so it must not be warmed up
        in the middle of a request."""
        for q in self.query_buckets:
            for kv in self.kv_buckets:
                if kv >= q:
                    self._fn("sync", q, kv)
        for depth in range(1, self.max_depth + 1):
            for kv in self._draft_kv_buckets(depth):
                self._fn("draft", depth, kv)
        if fused_kernels.available(self.device):  # where the loop decides this proposer's verdicts on the device
            fused_kernels.warm_tree_accept(self.device, self.max_nodes)

    def _draft_kv_buckets(self, depth: int) -> tuple[int, ...]:
        """KV buckets a `depth`-deep draft can run at: one-level trees attend nothing (any one will do);
        deeper ones read the committed pairs and the scratch behind them."""
        return self.kv_buckets[:1] if depth == 1 else tuple(kv for kv in self.kv_buckets if kv > self.scratch)

    @property
    def num_graphs(self) -> int:
        return sum(f.graph is not None for f in self._fns.values())

    def close(self) -> None:
        self._fns.clear()

    def reset(self) -> None:
        self._fed_host = 0
        self._ahead = None

    # ---- the captured steps -------------------------------------------------------------
    def _head(self, features: torch.Tensor, tokens: torch.Tensor, slots: torch.Tensor, rope_pos: torch.Tensor,
              allowed: torch.Tensor) -> torch.Tensor:
        """features [n, H], tokens [n], slots / rope_pos [n], allowed [n, kv_len] -> predicted features [n, H]."""
        return self.head(self.cache, features, tokens[None], slots[None], rope_pos[None], allowed[None])

    def _sync_step(self, q: int, kv: int) -> torch.Tensor:
        slots = self._fed + self._offsets[:q]  # [q]
        allowed = self._keys[:kv][None, :] <= slots[:, None]  # [q, kv] causal
        return self._head(self._feat_in[:q], self._tok_in[:q], slots, slots, allowed)  # [q, H]

    def _root_step(self) -> None:
        """Level 0: the root's top-k tokens; and the scratch slots and rotary positions of this draft."""
        k = self.topk
        torch.add(self._offsets[: self._slots.numel()], self._fed, out=self._slots)
        torch.add(self._levels, self._fed - 1, out=self._rope)
        self._top(self._root[None], None, (self._node_score[:k], self._node_tok[:k]))
        self._front_tok[0].copy_(self._node_tok[:k])
        self._front_score[0].copy_(self._node_score[:k])
        self._front_feat[0].copy_(self._root[None].expand(k, -1))

    def _level_step(self, d: int, kv: int) -> None:
        """Level d from level d - 1's frontier. d is static (a draft graph runs every level), so the
        per-level state is read and written through views."""
        k = self.topk
        feats, tok, score, ids = self._front_feat[d - 1], self._front_tok[d - 1], self._front_score[d - 1], self._front_id[d - 1]
        if self.lean.kernels == "fused":  # one launch
            anc = torch.empty_like(self._own[d - 1])
            allowed = torch.empty(k, kv, dtype=torch.bool, device=self.device)
            fused_kernels.tree_level_mask(self._front_anc[d - 1], self._own[d - 1], self._fed, anc, allowed)
        else:
            anc = self._front_anc[d - 1] | self._own[d - 1]  # [k, S]: ancestors + self
            allowed = self._keys[:kv].expand(k, kv) < self._fed  # [k, kv] the committed pairs
            allowed.scatter_(1, self._slots.expand(k, -1), anc)  # and the tree's slots
        own = self._slots[(d - 1) * k : d * k]  # [k] this level's cache slots
        out = self._head(feats, tok, own, self._rope[d], allowed)  # [k, H]
        at = slice(k + (d - 1) * k * k, k + d * k * k)  # node numbers of the children
        self._top(out, score, (self._node_score[at], self._node_tok[at]))  # each node's k best children
        if self.lean.kernels == "fused":  # the rest in one launch
            fused_kernels.eagle_frontier(self._node_score[at], self._node_tok[at], ids, out, anc, at.start, k, out=(
                self._node_parent[at], self._front_id[d], self._front_tok[d], self._front_score[d], self._front_feat[d],
                self._front_anc[d]))
            return
        cand = self._node_score[at]  # [k * k] their cumulative scores
        self._node_parent[at].view(k, k).copy_(ids[:, None].expand(k, k))
        best = cand.topk(k).indices  # [k] the next frontier
        rows = best // k  # [k] their parents' frontier rows
        torch.add(best, at.start, out=self._front_id[d])
        torch.index_select(self._node_tok[at], 0, best, out=self._front_tok[d])
        torch.index_select(cand, 0, best, out=self._front_score[d])
        torch.index_select(out, 0, rows, out=self._front_feat[d])
        torch.index_select(anc, 0, rows, out=self._front_anc[d])

    def _top(self, h: torch.Tensor, score: torch.Tensor | None, out: tuple[torch.Tensor, torch.Tensor]) -> None:
        """The `topk` best next tokens of each row of h [n, H] by draft log-probability (+ the row's
        cumulative `score` [n]) into out = (scores, tokens), [n * topk] each, row by row."""
        if self.lean.kernels == "fused":
            fused_kernels.logits_topk(h, self.lm_head, self.topk, bias=score, out=out, ids=self.vocab_ids)
            return
        top = torch.log_softmax(F.linear(h, self.lm_head).float(), -1).topk(self.topk, dim=-1)  # [n, topk]
        values = top.values if score is None else score[:, None] + top.values
        out[0].copy_(values.view(-1))
        out[1].copy_((top.indices if self.vocab_ids is None else self.vocab_ids[top.indices]).view(-1))

    def _select_step(self, depth: int) -> torch.Tensor:
        """[2, nodes]: tokens and parents of the `tree_size` best nodes of a `depth`-deep draft."""
        n = self.topk + (depth - 1) * self.topk * self.topk
        if self.lean.kernels == "fused":  # one launch
            return fused_kernels.best_nodes(self._node_tok[:n], self._node_score[:n], self._node_parent[:n], self.tree_size)
        return best_nodes(self._node_tok[:n], self._node_score[:n], self._node_parent[:n], self.tree_size)

    def _draft_step(self, depth: int, kv: int) -> torch.Tensor:
        """A whole `depth`-deep draft, one graph: root, levels, select."""
        self._root_step()
        for d in range(1, depth):
            self._level_step(d, kv)
        return self._select_step(depth)

    def _fn(self, kind: str, *shape: int) -> CapturedFn:
        key = (kind, *shape)
        fn = self._fns.get(key)
        if fn is None:
            step = {"sync": self._sync_step, "draft": self._draft_step}[kind]
            fn = self._fns[key] = CapturedFn(lambda: step(*shape), self.use_graphs, self._pool, self._stream)
        return fn

    # ---- the proposer -------------------------------------------------------------------
    def _sync(self, ctx: Context, n_pairs: int) -> None:
        """Feed the committed pairs [fed, n_pairs) in query-bucket chunks; the last output is the root."""
        maxq = self.query_buckets[-1]
        start = self._fed_host
        while start < n_pairs:
            c = min(maxq, n_pairs - start)
            q = bucket(c, self.query_buckets)
            self._feat_in[:c].copy_(ctx.target_hidden[start : start + c])  # padding keeps old (finite) rows
            self._tok_in[:c].copy_(ids_on(self.device, ctx.token_ids[start + 1 : start + c + 1]))
            self._fed.fill_(start)
            out = self._fn("sync", q, bucket(start + q, self.kv_buckets))()
            self._root.copy_(out[c - 1])
            start += c
        self._fed_host = n_pairs
        self._fed.fill_(n_pairs)

    def _settle(self) -> tuple[Draft | None, int]:
        """Count the pairs a draft ahead synced (the loop has read its verdict by now); its draft and depth."""
        if self._ahead is None:
            return None, 0
        start, accept, depth, draft = self._ahead
        self._ahead = None
        self._fed_host = start + accept.verdict().num_accepted + 1
        return draft, depth

    @torch.inference_mode()
    def draft_ahead(self, ctx: Context, hidden: torch.Tensor | None, accept: DeviceVerdict, k: int) -> Draft | None:
        """Queue the next step's draft from this step's verdict while it is still on the device:
        sync the committed pairs (padded to the most the verdict can commit; the count is read on the
        device) and draft `k` levels deep. Returns that draft (None if none was queued); `propose`
        hands out the same object when the loop, having committed the verdict's tokens, asks for the
        same depth. ctx holds the tokens before this step's."""
        self._settle()
        start, m = len(ctx.token_ids) - 1, accept.max_count
        depth = min(k, self.max_depth)
        if (hidden is None or depth <= 0 or start != self._fed_host or start + m > self.max_length
                or m > self.query_buckets[-1]):
            return None
        q = bucket(m, self.query_buckets)
        torch.index_select(hidden, 0, accept.rows, out=self._feat_in[:m])
        self._tok_in[:m].copy_(accept.after)
        self._fed.fill_(start)
        out = self._fn("sync", q, bucket(start + q, self.kv_buckets))()
        torch.index_select(out, 0, accept.last, out=self._root[None])
        self._fed.add_(accept.count)
        draft = self._draft(start + m, depth)
        self._ahead = (start, accept, depth, draft)
        return draft

    def _draft(self, n_pairs: int, depth: int) -> Draft:
        """A `depth`-deep tree after (at most) `n_pairs` committed pairs, left on the device."""
        kv = self.kv_buckets[0] if depth == 1 else bucket(n_pairs + self.scratch + 1, self.kv_buckets)
        flat = self._fn("draft", depth, kv)()
        # copies: the graph's output is overwritten by the next replay
        return Draft(tokens=flat[0].clone(), parents=flat[1].clone(), max_depth=depth)

    @torch.inference_mode()
    def propose(self, ctx: Context, k: int) -> Draft:
        ahead, ahead_depth = self._settle()
        n_pairs = len(ctx.token_ids) - 1
        if ahead is not None and n_pairs == self._fed_host and min(k, self.max_depth) == ahead_depth:
            return ahead
        hidden = ctx.target_hidden
        if n_pairs <= 0 or hidden is None or hidden.shape[0] < n_pairs:
            return Draft.empty()
        if n_pairs > self.max_length:
            raise ValueError(f"{n_pairs} committed tokens, over the drafter's context of {self.max_length}")
        if n_pairs > self._fed_host:
            self._sync(ctx, n_pairs)
        if k <= 0:
            return Draft.empty()
        # left on the device, no sync: the loop queues the verify forward behind this draft
        return self._draft(n_pairs, min(k, self.max_depth))
