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
    if draft.is_tree:
        return verify_tree(draft, target_logits, params, generator)
    k = draft.k
    tokens = draft.tokens.to(target_logits.device)
    if params.greedy:
        target_tokens = target_logits.argmax(-1)  # [k + 1]
        mismatch = (target_tokens[:k] != tokens).to(torch.int8)
        # index of the first mismatch, or k when the whole draft matched
        n = torch.cat([mismatch, mismatch.new_ones(1)]).argmax()
        n, next_token = torch.stack([n, target_tokens[n]]).tolist()  # the one host sync
        return Verdict(num_accepted=n, next_token=next_token, proposed=k)

    target_probs = sampling_probs(target_logits, params)  # [k + 1, vocab]
    draft_probs = None if draft.probs is None else draft.probs.to(target_probs)[None]  # [1, k, vocab]
    n, next_token = sampled_accept_batch(tokens[None], None, draft_probs, target_probs[None], generator)
    n, next_token = torch.cat([n, next_token]).tolist()  # the one host sync
    return Verdict(num_accepted=n, next_token=next_token, proposed=k)


def sampled_accept_batch(
    draft_tokens: torch.Tensor,  # [B, k] int64 (entries past draft_lens are ignored)
    draft_lens: torch.Tensor | None,  # [B] int64 usable draft tokens per row, <= k; None: all k
    draft_probs: torch.Tensor | None,  # [B, k, vocab] the distribution each draft token was drawn from; None: point masses
    target_probs: torch.Tensor,  # [B, k + 1, vocab] the target's sampling distribution after pending, d_1 .. d_k
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling for rows of chains, on the device: (num_accepted [B], next_token [B]).

    d_i is kept with probability min(1, p(d_i) / q(d_i)) until the first rejection; the next token is
    drawn from the residual norm(max(0, p - q)) at a rejection, from p after the row's last usable draft
    token. The token after each possible n is drawn before n is known, so that one host copy (or none,
    in the batched engine's graphs) ends the step.
    """
    B, k = draft_tokens.shape
    if k == 0:
        return torch.zeros(B, dtype=torch.long, device=target_probs.device), sample(target_probs[:, 0], generator)
    p = target_probs[:, :k]  # [B, k, vocab]
    q = draft_probs if draft_probs is not None else torch.zeros_like(p).scatter_(-1, draft_tokens[..., None], 1.0)
    p_tok = p.gather(-1, draft_tokens[..., None])[..., 0]  # [B, k]
    q_tok = q.gather(-1, draft_tokens[..., None])[..., 0]
    ok = torch.rand(B, k, generator=generator, device=p.device) * q_tok < p_tok  # accept iff u < p/q
    residual = (p - q).clamp_min(0.0)
    if draft_lens is not None:
        usable = torch.arange(k, device=p.device)[None, :] < draft_lens[:, None]
        ok &= usable
        residual = torch.where(usable[..., None], residual, p)  # past the row's draft: p itself
    n = ok.long().cumprod(dim=1).sum(dim=1)
    dist = torch.cat([residual, target_probs[:, k:]], 1)
    dist = torch.where(dist.sum(-1, keepdim=True) > 0.0, dist, target_probs)  # p == q up to rounding: keep p
    return n, sample(dist, generator).gather(1, n[:, None])[:, 0]


def verify_tree(
    draft: Draft,
    target_logits: torch.Tensor,  # [k + 1, vocab] target scores after pending (row 0) and each node i (row i + 1)
    params: SamplingParams,
    generator: torch.Generator | None = None,
) -> Verdict:
    """The accepted root-to-leaf path of a token tree and the token that follows it."""
    from specdeploy.runtime.tree import children_of

    k = draft.k
    if params.greedy:  # the target's choices and the tree (which may still be on the device) in one host copy
        device = target_logits.device
        host = torch.cat([target_logits.argmax(-1), draft.tokens.to(device), draft.parents.to(device)]).tolist()
        target_tokens, tokens, parents = host[: k + 1], host[k + 1 : 2 * k + 1], host[2 * k + 1 :]
    elif draft.probs is None:
        return _verify_point_tree(draft, sampling_probs(target_logits, params), generator)
    else:
        tokens, parents = draft.tokens.tolist(), draft.parents.tolist()
    path: list[int] = []
    node = -1
    if params.greedy:
        child = {}  # (parent, token) -> the first such node: the one a greedy walk takes
        for i in range(k - 1, -1, -1):
            child[parents[i], tokens[i]] = i
        while True:
            want = target_tokens[node + 1]
            node = child.get((node, want))
            if node is None:
                return _tree_verdict(path, tokens, parents, want)
            path.append(node)

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


def _verify_point_tree(draft: Draft, target_probs: torch.Tensor, generator: torch.Generator | None) -> Verdict:
    """Sampled verification of a deterministic tree (point-mass children) with one host copy.

    At a node whose tried children left mass `removed`, child c (token t, not tried yet) is accepted
    with probability p(t) / (1 - removed): p renormalised without the tried tokens. The recovered
    token at a node where every child failed comes from p without all its children's tokens, which
    is known before the walk: it is drawn on the device for every node, with the uniforms of every
    child, so that the walk needs the host copy of those draws and the children's probabilities only.
    """
    from specdeploy.runtime.tree import children_of

    k = draft.k
    tokens, parents, p_child, u, recovered = _point_draws(draft.tokens, draft.parents, target_probs, generator)
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


def _point_draws(tokens: torch.Tensor, parents: torch.Tensor, target_probs: torch.Tensor,
                 generator: torch.Generator | None) -> tuple[torch.Tensor, ...]:
    """What sampled verification of point-mass children draws, on the device: (tokens, parents, p_child
    [k] each node's token under its parent's distribution, u [k] uniforms, recovered [k + 1] the token
    drawn at each node from p without its children's tokens)."""
    device = target_probs.device
    tokens, parents = tokens.to(device), parents.to(device)
    p_child = target_probs[parents + 1, tokens]
    u = torch.rand(tokens.numel(), generator=generator, device=device)
    left = target_probs.index_put((parents + 1, tokens), torch.zeros_like(p_child))  # [k + 1, vocab]
    left = torch.where(left.sum(-1, keepdim=True) > 0.0, left, target_probs)  # children hold all the mass: never drawn
    return tokens, parents, p_child, u, sample(left, generator)


class DeviceVerdict:
    """A verdict decided on the device (one `kernels.tree_accept` launch after the draws) and copied to
    the host without waiting for the work queued after it: a proposer can queue the next draft from it
    (`draft_ahead`) before the host reads it (`verdict()`). Greedy, or sampled with point-mass draft
    tokens (`draft.probs is None`: n-gram chains, top-k trees), with the same draws in the same order
    as `verify`, so the verdicts are `verify`'s.

    Device views, valid once the kernel has run: `count` [1] committed positions c (accepted nodes +
    1), `last` [1] c - 1, `rows` [max_count] the target rows of the committed positions (0: the
    pending token) and `after` [max_count] the token after each, 0 past c; `pending()` [1] the last
    of them, the next step's first input. An empty draft (a plain step) commits the target's token.
    """

    def __init__(self, draft: Draft, target_logits: torch.Tensor, params: SamplingParams,
                 generator: torch.Generator | None = None) -> None:
        from specdeploy.runtime import kernels

        if not (params.greedy or draft.probs is None):
            raise ValueError("a device verdict samples point-mass drafts only (draft.probs is None)")
        k, device = draft.k, target_logits.device
        parents = draft.parents if draft.is_tree else torch.arange(-1, k - 1, device=device)
        if params.greedy:
            self.out, self.block = kernels.tree_accept(draft.tokens.to(device), parents.to(device),
                                                       target_logits.argmax(-1))
        else:
            tokens, parents, p_child, u, recovered = _point_draws(draft.tokens, parents,
                                                                  sampling_probs(target_logits, params), generator)
            self.out, self.block = kernels.tree_accept(tokens, parents, recovered, p_child, u)
        b = self.block
        self.count, self.last = self.out[0:1], self.out[1:2]
        self.max_count = 1 + draft.depth_bound
        self.rows, self.after = self.out[2 : 2 + self.max_count], self.out[2 + b : 2 + b + self.max_count]
        self._read = to_host(self.out[: 2 + 2 * b + k] if draft.is_tree else self.out[: 2 + 2 * b])
        self._k, self._tree = k, draft.is_tree
        self._verdict: Verdict | None = None

    def pending(self) -> torch.Tensor:
        """[1] int64 on the device: the token the verdict ends with (fed first in the next step)."""
        return self.after.index_select(0, self.last)

    def verdict(self) -> Verdict:
        """The verdict on the host: waits for the kernel's copy (not for work queued after it)."""
        if self._verdict is None:
            host, b, k = self._read(), self.block, self._k
            c = host[0]
            after = host[2 + b : 2 + b + c]
            if not self._tree:
                self._verdict = Verdict(num_accepted=c - 1, next_token=after[-1], proposed=k)
            else:
                path = tuple(r - 1 for r in host[3 : 2 + c])
                self._verdict = Verdict(num_accepted=len(path), next_token=after[-1], path=path,
                                        path_tokens=tuple(after[:-1]), proposed=max(node_depths(host[2 + 2 * b :]), default=0))
        return self._verdict


def _tree_verdict(path: list[int], tokens: list[int], parents: list[int], next_token: int) -> Verdict:
    """A tree's verdict: the accepted path, its tokens, the token after it; proposed = the tree's depth."""
    return Verdict(num_accepted=len(path), next_token=next_token, path=tuple(path),
                   path_tokens=tuple(tokens[i] for i in path), proposed=max(node_depths(parents), default=0))
