"""Proposers that draft from the target's own hidden states (Medusa, EAGLE), alone or behind an n-gram lookup.

They read `ctx.target_hidden` (the target's last hidden state at every committed position
but the pending one), which the loop fills when the runner returns hidden states;
`needs_hidden = True` tells the engine to ask for them, and `max_nodes` (the largest tree a
proposer drafts, 0 for chains) lets a compiled runner size its query buckets.

- MedusaProposer: a fixed sparse tree of the heads' top-k candidates (deterministic).
- EagleProposer: EAGLE-1 chains, or EAGLE-2 dynamic trees: expand the `topk` most
  confident nodes at each depth, then keep the `tree_size` nodes of highest cumulative
  draft log-probability (a parent always scores at least as high as its children). It drafts
  through one `EagleStep` (features, tokens -> features, logits): `TorchEagleStep` here (head,
  embedding, lm_head), `OrtEagleHead` (onnx_heads.py) for the exported graph.
- LookupFirstProposer (method multi): the n-gram lookup's chain where it matches, else the EAGLE tree.
- MultiDraftProposer (method specinfer): SpecInfer's multi-draft tree, the n-gram chain and the
  EAGLE tree merged into one tree verified in one pass (EAGLE drafts every step).

Tree drafts are deterministic (``probs is None``): the verifier treats each candidate as
a point mass, which is lossless whatever the candidates (EAGLE's own choice too).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn

from specdeploy.config import check_confidence
from specdeploy.models.draft_vocab import with_draft_vocab
from specdeploy.models.eagle import EagleHead
from specdeploy.models.medusa import MedusaHeads
from specdeploy.runtime.proposers import Proposer
from specdeploy.runtime.tree import best_nodes, merge_drafts, shape_parents
from specdeploy.runtime.types import Context, Draft
from specdeploy.runtime.verify import sample, sampling_probs


# pending token + 63 nodes = the 64-token query bucket of `CudaGraphRunner`, which a verify forward of
# 33 to 64 tokens costs alike (results/gpu/step_profile: 1.32 ms at 64 against 1.13 at 1). 127 nodes accept
# 18% more at depth 6 but cost 21-24% more a step: fewer tokens/s (results/gpu/session24/eagle_ab)
COMPILED_TREE_NODES = 63
EAGER_GPU_TREE_NODES = 48


def _last_feature(ctx: Context) -> torch.Tensor | None:
    h = ctx.target_hidden
    return None if h is None or h.shape[0] == 0 else h[-1]


class MedusaProposer:
    """Medusa-1: head d guesses the token d + 1 places after the pending token; candidates form a sparse tree.

    min_confidence: a node is drafted only where the product of its heads' probabilities along
    its path (a path's chance as the heads see it) reaches this; 0 drafts the whole tree.
    """

    needs_hidden = True

    def __init__(self, heads: MedusaHeads, lm_head: nn.Module, tree: Sequence[tuple[int, ...]] | None = None,
                 min_confidence: float = 0.0) -> None:
        self.heads, self.lm_head = heads, lm_head
        # None: a chain of each head's top-1 guess
        self.tree = list(tree) if tree else None
        self.parents = shape_parents(self.tree) if self.tree else None
        self.max_rank = 1 + max((r for p in self.tree for r in p), default=0) if self.tree else 1
        self.max_nodes = len(self.tree) if self.tree else 0  # largest tree drafted (0: chains)
        self.min_confidence = check_confidence(min_confidence)

    def reset(self) -> None:
        pass

    @torch.inference_mode()
    def propose(self, ctx: Context, k: int) -> Draft:
        feature = _last_feature(ctx)
        if feature is None or k <= 0:
            return Draft.empty()
        depth = min(k, self.heads.num_heads)
        logits = self.lm_head(self.heads(feature[None])[:depth, 0])  # [depth, vocab]
        top_logp, top = torch.log_softmax(logits.float(), -1).topk(self.max_rank, dim=-1)  # [depth, max_rank]
        top = top.tolist()
        paths = self.tree or [(0,) * (d + 1) for d in range(depth)]  # the chain: each head's top-1
        keep = [i for i, p in enumerate(paths) if len(p) <= depth]  # parents precede children
        if self.min_confidence:  # a path's log-probability never exceeds its parent's: the cut keeps a tree
            logp, floor = top_logp.tolist(), math.log(self.min_confidence)
            keep = [i for i in keep if sum(logp[d][r] for d, r in enumerate(paths[i])) >= floor]
        tokens = [top[len(paths[i]) - 1][paths[i][-1]] for i in keep]
        if not tokens:
            return Draft.empty()
        if self.tree is None:
            return Draft(tokens=torch.tensor(tokens, dtype=torch.long))
        index = {old: new for new, old in enumerate(keep)}
        parents = [index.get(self.parents[i], -1) for i in keep]
        return Draft(tokens=torch.tensor(tokens, dtype=torch.long), parents=torch.tensor(parents, dtype=torch.long))


KVCache = tuple[torch.Tensor, torch.Tensor]  # (keys, values) [1, kv_heads, L, head_dim] each


class EagleStep(Protocol):
    """One EAGLE drafting step: (feature, next token) pairs through the head, over its KV cache.

    features: [n, H] the target's (or the head's own predicted) feature at each position;
    tokens: [n] the token after each; positions: [n] rotary positions; allowed: [n, L + n] bool,
    the cache entries and new rows each row attends to; cache: None when empty. Returns the
    predicted features [n, H], their draft logits [n, vocab] ([1, vocab], the last row's only,
    when `last_only`) and the cache with the n new entries appended.
    """

    def __call__(self, features: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
                 allowed: torch.Tensor, cache: KVCache | None, last_only: bool = False,
                 ) -> tuple[torch.Tensor, torch.Tensor, KVCache]: ...


class TorchEagleStep:
    """`EagleStep` of the torch head: features ++ embed(tokens) -> head -> features; lm_head -> logits."""

    def __init__(self, head: EagleHead, embed: nn.Module, lm_head: nn.Module) -> None:
        self.head, self.embed, self.lm_head = head, embed, with_draft_vocab(lm_head, head.draft_vocab)

    def __call__(self, features, tokens, positions, allowed, cache, last_only=False):
        out, cache = self.head(features[None], self.embed(tokens)[None], positions, allowed, cache)
        out = out[0]  # [n, H]
        # last_only: no lm_head over the prompt's rows; [H] in, as GraphEagleProposer's root step
        logits = self.lm_head(out[-1])[None] if last_only else self.lm_head(out)  # [1 or n, vocab]
        return out, logits, cache


class EagleProposer:
    """EAGLE drafting with a KV cache of its own over the committed (feature, next token) pairs."""

    needs_hidden = True

    def __init__(self, step: EagleStep, tree_size: int = EAGER_GPU_TREE_NODES, topk: int = 8) -> None:
        self.step = step
        self.tree_size, self.topk = tree_size, topk  # tree_size 0: chains
        self.max_nodes = max(tree_size, 0)  # largest tree drafted (0: chains)
        self.reset()

    @classmethod
    def from_head(cls, head: EagleHead, embed: nn.Module, lm_head: nn.Module, **kw) -> "EagleProposer":
        return cls(TorchEagleStep(head, embed, lm_head), **kw)

    def reset(self) -> None:
        self._cache: KVCache | None = None
        self._fed = 0  # committed pairs whose entries the cache holds
        self._root: tuple[torch.Tensor, torch.Tensor] | None = None  # ([H] feature, [vocab] logits), pending position

    def _cache_len(self) -> int:
        return 0 if self._cache is None else self._cache[0].shape[2]

    def _forward(self, features, tokens, positions, allowed, last_only=False):
        """Feed pairs (features [n, H], tokens [n]) at `positions` [n]; allowed: [n, L + n] bool.
        Returns the predicted features [n, H] and their logits [n or 1, vocab]."""
        out, logits, self._cache = self.step(features, tokens, positions, allowed, self._cache, last_only)
        return out, logits

    def _sync(self, ctx: Context) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Bring the cache to every committed pair; (predicted feature [H], its logits [vocab]) at the pending slot."""
        n_pairs = len(ctx.token_ids) - 1
        hidden = ctx.target_hidden
        if n_pairs <= 0 or hidden is None or hidden.shape[0] < n_pairs:
            return None
        if self._cache is not None:  # drop the previous step's draft entries
            self._cache = (self._cache[0][:, :, : self._fed], self._cache[1][:, :, : self._fed])
        device = hidden.device
        new = n_pairs - self._fed
        if new <= 0:  # nothing committed since the last call
            return self._root
        positions = torch.arange(self._fed, n_pairs, device=device)
        tokens = torch.tensor(ctx.token_ids[self._fed + 1 : n_pairs + 1], dtype=torch.long, device=device)
        allowed = torch.ones(new, self._fed + new, dtype=torch.bool, device=device).tril(self._fed)
        out, logits = self._forward(hidden[self._fed : n_pairs], tokens, positions, allowed, last_only=True)
        self._fed = n_pairs
        self._root = (out[-1], logits[-1])
        return self._root

    @torch.inference_mode()
    def propose(self, ctx: Context, k: int) -> Draft:
        root = self._sync(ctx)
        if root is None or k <= 0:
            return Draft.empty()
        if self.tree_size <= 0:
            return self._chain(ctx, *root, k)
        return self._tree(*root, k)

    def _chain(self, ctx: Context, feature: torch.Tensor, logits: torch.Tensor, k: int) -> Draft:
        """feature: [H] at the pending position; logits: [vocab] its draft logits."""
        device = feature.device
        tokens: list[torch.Tensor] = []  # [1] each, kept on the device: no sync per draft token
        probs: list[torch.Tensor] = []
        for i in range(k):
            logits = logits.float()  # [vocab]
            if ctx.params.greedy:
                token = logits.argmax()[None]
            else:
                q = sampling_probs(logits[None], ctx.params)[0]
                token = sample(q, ctx.generator)[None]
                probs.append(q)
            tokens.append(token)
            if i == k - 1:
                break
            allowed = torch.ones(1, self._cache_len() + 1, dtype=torch.bool, device=device)
            pos = torch.tensor([self._fed + i], device=device)
            out, out_logits = self._forward(feature[None], token, pos, allowed, last_only=True)
            feature, logits = out[0], out_logits[0]
        return Draft(tokens=torch.cat(tokens).cpu(), probs=torch.stack(probs) if probs else None)

    def _tree(self, root: torch.Tensor, root_logits: torch.Tensor, depth: int) -> Draft:
        """EAGLE-2: expand the `topk` best nodes per depth, keep the `tree_size` best overall.
        root: [H] the predicted feature at the pending position; root_logits: [vocab].

        Everything stays on the device (one sync at the end): nodes are numbered in creation
        order, so a parent's number is below its children's; a node's score (cumulative draft
        log-probability) is never below a child's.
        """
        device, k = root.device, self.topk
        logp = torch.log_softmax(root_logits.float(), -1)  # [vocab]
        top = logp.topk(k)
        tok, score = [top.indices], [top.values]  # per depth: [nodes]
        parent = [torch.full((k,), -1, device=device)]
        front_id = torch.arange(k, device=device)  # node numbers of the frontier
        front_tok, front_score = top.indices, top.values
        feats = root[None].expand(k, -1)  # [k, H] the parent's (predicted) feature of each frontier node
        anc = torch.zeros(k, 0, dtype=torch.bool, device=device)  # frontier x tree entries in the head's cache
        n_nodes = k
        for d in range(1, depth):
            allowed = torch.cat([torch.ones(k, self._fed, dtype=torch.bool, device=device), anc,
                                 torch.eye(k, dtype=torch.bool, device=device)], dim=1)
            positions = torch.full((k,), self._fed - 1 + d, device=device)
            out, logits = self._forward(feats, front_tok, positions, allowed)  # [k, H], [k, vocab]
            anc = torch.cat([anc, torch.eye(k, dtype=torch.bool, device=device)], dim=1)
            top = torch.log_softmax(logits.float(), -1).topk(k, dim=-1)  # [k, k]
            cand = (front_score[:, None] + top.values).flatten()  # [k * k]
            tok.append(top.indices.flatten())
            score.append(cand)
            parent.append(front_id.repeat_interleave(k))
            best = cand.topk(k).indices  # [k] next frontier
            front_id = n_nodes + best
            front_tok, front_score = top.indices.flatten()[best], cand[best]
            feats, anc = out[best // k], anc[best // k]
            n_nodes += k * k
        flat = best_nodes(torch.cat(tok), torch.cat(score), torch.cat(parent), self.tree_size).cpu()  # the one sync
        return Draft(tokens=flat[0].clone(), parents=flat[1].clone())


class LookupFirstProposer:
    """The n-gram lookup's chain where the context repeats itself, else the model proposer's draft.

    SAM-Decoding's rule (Hu et al., 2024): a matched suffix means copied text, drafted for free and
    verified by a short query; a model tree costs a draft pass and a wide verify, and pays where
    nothing repeats. The model proposer catches up on the tokens of lookup steps at its next draft.
    Lossless either way: the choice depends only on the committed tokens.
    """

    def __init__(self, lookup: Proposer, model: Proposer) -> None:
        self.lookup, self.model = lookup, model
        self.needs_hidden = getattr(model, "needs_hidden", False)
        self.max_nodes = getattr(model, "max_nodes", 0)  # largest tree drafted

    def reset(self) -> None:
        self.lookup.reset()
        self.model.reset()

    def propose(self, ctx: Context, k: int) -> Draft:
        draft = self.lookup.propose(ctx, k)
        return draft if draft.k else self.model.propose(ctx, k)

    def close(self) -> None:
        """Release the model proposer's graphs, where it holds some (GraphEagleProposer)."""
        if hasattr(self.model, "close"):
            self.model.close()


class MultiDraftProposer:
    """SpecInfer's multi-draft tree: several proposers' drafts merged into one tree, verified in one pass.

    Accepts the longest prefix any of them drafted, at the price of every proposer's drafting
    and a wider verify each step (`multi` drafts one of them per step instead).
    """

    def __init__(self, proposers: Sequence[Proposer], budget: int) -> None:
        self.proposers, self.budget = list(proposers), budget
        self.max_nodes = budget  # largest tree drafted
        self.needs_hidden = any(getattr(p, "needs_hidden", False) for p in self.proposers)

    def reset(self) -> None:
        for p in self.proposers:
            p.reset()

    def propose(self, ctx: Context, k: int) -> Draft:
        return merge_drafts([p.propose(ctx, k) for p in self.proposers], self.budget)

    def close(self) -> None:
        """Release its proposers' graphs, where they hold some (GraphEagleProposer)."""
        for p in self.proposers:
            if hasattr(p, "close"):
                p.close()


def default_tree_size(spec, device: torch.device, compiled: bool) -> int | None:
    """Token-tree nodes a head method drafts when `spec.tree_size` is None (None: Medusa's artifact tree).

    Trees pay where a verify forward costs about as much for 64 tokens as for one: on a GPU, where a
    step is launch-bound. On a CPU every verified token costs: a 48-node EAGLE tree's verify takes
    2.9 plain steps, and every tree method ran slower than its own chain there
    (results/cpu/cpu_step_cost), so heads draft chains of k tokens (0 nodes) on an eager CPU runner.
    """
    if spec.tree_size is not None:
        return spec.tree_size
    if device.type == "cpu" and not compiled:  # (the compiled runner runs on a CPU only under test)
        return 0
    if spec.method == "medusa":
        return None
    if compiled:  # fill the verify forward's query bucket
        return COMPILED_TREE_NODES - (spec.k if spec.method == "specinfer" else 0)
    return EAGER_GPU_TREE_NODES


def build_head_proposer(spec, target, graph_max_length: int | None = None, *,
                        medusa_heads: tuple | None = None, eagle_step: EagleStep | None = None) -> Proposer:
    """The medusa / eagle / multi / specinfer proposer a SpecConfig names, from its artifact (default: shipped).

    graph_max_length: EAGLE trees drafted by `GraphEagleProposer` (static cache, CUDA graphs where
    the model is on CUDA) over that many committed tokens, `spec.k` levels deep; None: eager.
    medusa_heads (heads, lm_head, full tree) or eagle_step: heads built elsewhere (the ORT graphs
    of onnx_heads.py), drafting instead of the torch head of `spec.draft`; eagle_step drafts eagerly.
    """
    from specdeploy.models import eagle, medusa
    from specdeploy.runtime.proposers import NGramProposer

    embed, lm_head = target.model.get_input_embeddings(), target.model.get_output_embeddings()
    size = default_tree_size(spec, embed.weight.device, graph_max_length is not None)
    if spec.method == "medusa":
        if medusa_heads is None:
            heads, tree, _ = medusa.load(spec.draft, target)
            lm_head = with_draft_vocab(lm_head, heads.draft_vocab)
        else:
            heads, lm_head, tree = medusa_heads
        if size is not None:
            tree = tree[:size]  # breadth-first: any prefix is a tree
        return MedusaProposer(heads, lm_head, tree or None, min_confidence=spec.confidence)
    head = None if eagle_step is not None else eagle.load(spec.draft, target)[0]
    if eagle_step is not None:
        eagle_proposer = EagleProposer(eagle_step, tree_size=size, topk=spec.tree_topk)
    elif graph_max_length is not None and size > 0:
        from specdeploy.runtime.eagle_graphs import GraphEagleProposer

        eagle_proposer = GraphEagleProposer.from_head(head, embed, lm_head, tree_size=size, topk=spec.tree_topk,
                                                      max_depth=spec.k, max_length=graph_max_length)
    else:
        eagle_proposer = EagleProposer.from_head(head, embed, lm_head, tree_size=size, topk=spec.tree_topk)
    if spec.method == "eagle":
        return eagle_proposer
    lookup = NGramProposer(spec.ngram_min, spec.ngram_max)
    if spec.method == "specinfer":
        return MultiDraftProposer([lookup, eagle_proposer], budget=(size or spec.k) + spec.k)  # size 0: an EAGLE chain
    return LookupFirstProposer(lookup, eagle_proposer)
