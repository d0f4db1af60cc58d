"""Verification: the only place that decides which draft tokens survive.

Greedy (temperature 0): accept the longest draft prefix equal to the target's argmax,
then emit the target's argmax at the first mismatch (or the bonus token).

Sampling: speculative rejection sampling (Leviathan et al. 2023; Chen et al. 2023).
Draft token d_i, drawn from draft_probs[i], is accepted with probability
min(1, target_probs[i, d_i] / draft_probs[i, d_i]); at the first rejection the recovered
token is drawn from norm(max(0, target_probs[i] - draft_probs[i])); if all k are
accepted the bonus token is drawn from target_probs[k]. A deterministic draft (n-gram,
``draft.probs is None``) is a point mass: accept with probability target_probs[i, d_i],
recover from target_probs[i] with d_i removed. Either way the emitted tokens follow the
target's own distribution exactly.

Token trees (``draft.parents`` set): the same rules along the accepted path. Greedy walks
from the pending token to the child whose token is the target's argmax, as long as one
exists. Sampling is recursive rejection sampling (SpecInfer; Yang et al. 2024; Jeon et al.
2024): at a node, the children are tried in index order; child c is accepted with
probability min(1, target_probs(c) / draft_probs(c)); after a rejection the target
distribution becomes the residual norm(max(0, target_probs - draft_probs)) and c leaves
the draft distribution (siblings were drawn without replacement, so the next one
follows draft_probs with the tried tokens removed). Each try is one ordinary
rejection-sampling round whose output follows its current target distribution, so the
token leaving the node follows target_probs. Deterministic children (``probs is None``)
are point masses: accept with probability target_probs(c), else zero c out and renormalise.
If no child is accepted the recovered token is drawn from what is left; after a leaf the
bonus token is drawn from target_probs at the leaf.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from specdeploy.config import SamplingParams
from specdeploy.runtime.runner import to_host
from specdeploy.runtime.types import Draft, Verdict, node_depths


def sampling_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p applied to logits [n, vocab] -> probs [n, vocab] (float32)."""
    logits = logits.float() / max(params.temperature, 1e-5)
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # keep a token if the mass strictly before it is < top_p (the top token always stays)
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of weights [..., n] (>= 0, every row with mass), drawn with probability
    proportional to its weight: the exponential race argmax(w / E), E ~ Exp(1) i.i.d. This is what
    `torch.multinomial(w, 1)` computes, without the validity checks it reads back to the host (two
    `.item()` calls in PyTorch's source): a sampled verify then ends in the one sync of its verdict."""
    race = torch.empty_like(weights, dtype=torch.float32).exponential_(generator=generator)
    # E = 0 has probability 2^-24 per float32 draw; w / 0 would be inf (or nan where w = 0, which argmax takes)
    return (weights / race.clamp_min_(torch.finfo(torch.float32).tiny)).argmax(-1)


def verify(
    draft: Draft,
    target_logits: torch.Tensor,  # [k + 1, vocab] target scores after pending, d_1 .. d_k
    params: SamplingParams,
    generator: torch.Generator | None = None,
) -> Verdict:
    """Decide how many draft tokens to keep and which token follows them."""
    if params.greedy:
        return accept_greedy(draft, target_logits).verdict()
    if draft.is_tree:
        return verify_tree(draft, target_logits, params, generator)
    k = draft.k
    tokens = draft.tokens.to(target_logits.device)
    target_probs = sampling_probs(target_logits, params)  # [k + 1, vocab]
    if draft.probs is None:
        draft_probs = torch.zeros_like(target_probs[:k]).scatter_(-1, tokens[:, None], 1.0)
    else:
        draft_probs = draft.probs.to(target_probs)  # [k, vocab]
    rows = torch.arange(k, device=target_probs.device)
    p_tok = target_probs[rows, tokens]  # [k]
    q_tok = draft_probs[rows, tokens]  # [k]
    u = torch.rand(k, generator=generator, device=target_probs.device)
    rejected = (u * q_tok >= p_tok).to(torch.int8)  # accept iff u < p/q
    n = torch.cat([rejected, rejected.new_ones(1)]).argmax()
    # the token after each possible n, drawn before n is known, so that one host copy ends the step:
    # the residual norm(max(0, p - q)) after a rejection, p itself after the whole draft
    dist = torch.cat([(target_probs[:k] - draft_probs).clamp_min(0.0), target_probs[k:]])
    dist = torch.where(dist.sum(-1, keepdim=True) > 0.0, dist, target_probs)  # p == q up to rounding: keep p
    after = sample(dist, generator)  # [k + 1]
    n, next_token = torch.stack([n, after[n]]).tolist()  # the one host sync
    return Verdict(num_accepted=n, next_token=next_token, proposed=k)


def verify_tree(
    draft: Draft,
    target_logits: torch.Tensor,  # [k + 1, vocab] target scores after pending (row 0) and each node i (row i + 1)
    params: SamplingParams,
    generator: torch.Generator | None = None,
) -> Verdict:
    """The accepted root-to-leaf path of a sampled token tree and the token that follows it
    (greedy trees: `accept_greedy`)."""
    from specdeploy.runtime.tree import children_of

    if draft.probs is None:
        return _verify_point_tree(draft, sampling_probs(target_logits, params), generator)
    tokens, parents = draft.tokens.tolist(), draft.parents.tolist()
    path: list[int] = []
    node = -1
    kids = children_of(parents)
    target_probs = sampling_probs(target_logits, params)  # [k + 1, vocab]
    device = target_probs.device
    while True:
        probs = target_probs[node + 1].clone()  # [vocab] current target distribution at this node
        draft_probs = None  # [vocab] current draft distribution (tried siblings removed)
        accepted = None
        for c in kids[node]:
            tok = tokens[c]
            u = float(torch.rand(1, generator=generator, device=device))
            if draft_probs is None:
                draft_probs = draft.probs[c].to(probs).clone()
            if u * float(draft_probs[tok]) < float(probs[tok]):
                accepted = c
                break
            residual = (probs - draft_probs).clamp_min(0.0)
            if float(residual.sum()) > 0.0:  # else p == q up to rounding: keep p
                probs = residual
            draft_probs[tok] = 0.0
            if float(draft_probs.sum()) > 0.0:
                draft_probs = draft_probs / draft_probs.sum()
            probs = probs / probs.sum()
        if accepted is None:
            return _tree_verdict(path, tokens, parents, int(sample(probs, generator)))
        path.append(accepted)
        node = accepted


@dataclass(frozen=True)
class GreedyAccept:
    """A greedy verdict still on the target's device, its host copy under way.

    rows [k + 1]: the rows of the verify step committed, in order (row 0 is the pending token,
    row i + 1 draft node i), the first `count` of them valid; after [k + 1]: the token that
    follows each committed row (the accepted draft tokens, then the target's next token).
    A proposer can start its next draft from these before the host has the verdict
    (`GraphEagleProposer.draft_ahead`); `verdict()` waits for the host copy only.
    """

    rows: torch.Tensor  # [k + 1] int64
    after: torch.Tensor  # [k + 1] int64
    count: torch.Tensor  # [1] int64: accepted draft tokens + 1
    depth: int  # the most draft tokens the step could accept (count <= depth + 1), known on the host
    is_tree: bool
    _host: torch.Tensor  # [3 + 2 (k + 1)] int64: count, proposed, 0, rows, after (pinned on a GPU)
    _ready: torch.cuda.Event | None

    def committed(self) -> int:
        """`count` on the host (waits for the host copy)."""
        if self._ready is not None:
            self._ready.synchronize()
        return int(self._host[0])

    def verdict(self) -> Verdict:
        """The host's Verdict (the step's one sync)."""
        if self._ready is not None:
            self._ready.synchronize()
        host = self._host.tolist()
        count, proposed, m = host[0], host[1], (len(host) - 3) // 2
        rows, after = host[3 : 3 + m], host[3 + m :]
        n = count - 1
        if not self.is_tree:
            return Verdict(num_accepted=n, next_token=after[n], proposed=proposed)
        return Verdict(num_accepted=n, next_token=after[n], proposed=proposed, path=tuple(r - 1 for r in rows[1:count]),
                       path_tokens=tuple(after[:n]))


def accept_greedy(draft: Draft, target_logits: torch.Tensor, max_depth: int | None = None) -> GreedyAccept:
    """Greedy verification on the device: the longest draft prefix (chain) or root-to-leaf path
    (tree) that equals the target's argmax, then the target's argmax after it. Its host copy is
    queued at once, so work queued after this call does not delay the verdict. max_depth: a bound
    on a tree's depth known to the caller (the depth it asked the proposer for), else its size.

    A tree node is on the greedy path when it and every ancestor is the first child of its parent
    whose token is the parent's argmax: the host walk's rule (siblings tried in index order), as
    masks over the ancestry, so no host round trip decides it.
    """
    device = target_logits.device
    target_tokens = target_logits.argmax(-1)  # [k + 1]
    k = draft.k
    tokens = draft.tokens.to(device)
    # no indexing by a 0-dim tensor below: it reads the index back to the host (a sync)
    if not draft.is_tree or k == 0:
        mismatch = (target_tokens[:k] != tokens).to(torch.int8)
        n = torch.cat([mismatch, mismatch.new_ones(1)]).argmax().view(1)  # the first mismatch, or k
        rows = torch.arange(k + 1, device=device)
        nxt = target_tokens.index_select(0, n)
        after = torch.cat([tokens, nxt]).scatter(0, n, nxt)
        depth = torch.full((1,), k, dtype=torch.long, device=device)
    else:
        from specdeploy.runtime.tree import ancestor_matrix

        parents = draft.parents.to(device)
        idx = torch.arange(k, device=device)
        match = tokens == target_tokens[parents + 1]  # [k] node i is its parent's argmax
        # a later sibling with the same token is never taken: the walk stops at the first
        same = (parents[None, :] == parents[:, None]) & match[None, :] & (idx[None, :] < idx[:, None])
        match &= ~same.any(-1)
        anc = ancestor_matrix(parents)  # [k, k]
        on_path = ~(anc & ~match[None, :]).any(-1)  # [k] it and all its ancestors match
        n = on_path.sum().view(1)
        # path nodes first, in index order (parents come before children): row 1 + node
        order = torch.where(on_path, idx, idx + k).argsort()
        rows = torch.cat([idx.new_zeros(1), order + 1])
        leaf_row = (on_path * (idx + 1)).amax().view(1)  # 0: no node accepted
        nxt = target_tokens.index_select(0, leaf_row)
        after = torch.cat([tokens[order], nxt]).scatter(0, n, nxt)
        depth = anc.sum(-1).amax().view(1)
    count = n + 1
    host, ready = to_host(torch.cat([count, depth, count.new_zeros(1), rows, after]))
    bound = min(k, max_depth) if draft.is_tree and max_depth is not None else k
    return GreedyAccept(rows, after, count, bound, draft.is_tree, host, ready)


def _verify_point_tree(draft: Draft, target_probs: torch.Tensor, generator: torch.Generator | None) -> Verdict:
    """Sampled verification of a deterministic tree (point-mass children) with one host copy.

    At a node whose tried children left mass `removed`, child c (token t, not tried yet) is accepted
    with probability p(t) / (1 - removed): p renormalised without the tried tokens. The recovered
    token at a node where every child failed comes from p without all its children's tokens, which
    is known before the walk: it is drawn on the device for every node, with the uniforms of every
    child, so that the walk needs the host copy of those draws and the children's probabilities only.
    """
    from specdeploy.runtime.tree import children_of

    k, device = draft.k, target_probs.device
    tokens, parents = draft.tokens.to(device), draft.parents.to(device)
    p_child = target_probs[parents + 1, tokens]  # [k] each node's token under its parent's distribution
    u = torch.rand(k, generator=generator, device=device)
    left = target_probs.index_put((parents + 1, tokens), torch.zeros_like(p_child))  # [k + 1, vocab]
    left = torch.where(left.sum(-1, keepdim=True) > 0.0, left, target_probs)  # children hold all the mass: never drawn
    recovered = sample(left, generator)  # [k + 1]
    host = torch.cat([x.double() for x in (tokens, parents, recovered, p_child, u)]).tolist()  # the one sync
    toks, pars = [int(x) for x in host[:k]], [int(x) for x in host[k : 2 * k]]
    rec, pc, us = host[2 * k : 3 * k + 1], host[3 * k + 1 : 4 * k + 1], host[4 * k + 1 :]
    kids = children_of(pars)
    path: list[int] = []
    node = -1
    while True:
        removed, tried, accepted = 0.0, set(), None
        for c in kids[node]:
            if toks[c] in tried:  # a repeated token was zeroed with its first try
                continue
            if pc[c] > 0.0 and us[c] * (1.0 - removed) < pc[c]:  # u < p(t) / (1 - removed)
                accepted = c
                break
            removed += pc[c]
            tried.add(toks[c])
        if accepted is None:
            return _tree_verdict(path, toks, pars, int(rec[node + 1]))
        path.append(accepted)
        node = accepted


def _tree_verdict(path: list[int], tokens: list[int], parents: list[int], next_token: int) -> Verdict:
    """A tree's verdict: the accepted path, its tokens, the token after it; proposed = the tree's depth."""
    return Verdict(num_accepted=len(path), next_token=next_token, path=tuple(path),
                   path_tokens=tuple(tokens[i] for i in path), proposed=max(node_depths(parents), default=0))
