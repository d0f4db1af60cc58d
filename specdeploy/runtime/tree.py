"""Token trees: the shapes, masks and merges that tree drafts need (verification is in verify.py).

A tree is stored flat, as in `Draft`: node i holds one token and the index of its parent
(-1 = the pending token), parents before children. Paths are tuples of node tokens from
the pending token down. Tree *shapes* (Medusa's sparse trees) are lists of rank tuples:
(0, 2) means "the top-1 candidate at depth 1, then the top-3 candidate at depth 2".
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from specdeploy.runtime.types import Draft


def check_parents(parents: torch.Tensor) -> None:
    """ValueError unless each node's parent comes before it (-1: the pending token). parents: [m] (CPU)."""
    bad = (parents >= torch.arange(parents.numel())) | (parents < -1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"tree node {i} has parent {int(parents[i])}: parents must come first")


def ancestor_matrix(parents: torch.Tensor) -> torch.Tensor:
    """parents: [m] int64 (-1 = outside the tree) -> [m, m] bool on the parents' device,
    anc[i, j] = j is i or an ancestor of i.

    Pointer jumping: after round t each node holds its ancestors closer than 2^t and points at
    its 2^t-th one, so ceil(log2 m) rounds cover any tree of m nodes, with no host sync. Parents
    on the host are checked (parents first); parents on a GPU come from a drafter and are not,
    since checking them would cost the sync this saves.
    """
    parents = parents.detach().to(torch.long).reshape(-1)
    m, device = int(parents.numel()), parents.device
    if device.type == "cpu":
        check_parents(parents)
    # row m stands for "outside the tree": it has no ancestors and points at itself
    jump = torch.cat([torch.where(parents < 0, m, parents), parents.new_full((1,), m)])  # [m + 1]
    anc = torch.eye(m + 1, m, dtype=torch.bool, device=device)  # [m + 1, m], row m empty
    for _ in range((m - 1).bit_length()):
        anc = anc | anc[jump]
        jump = jump[jump]
    return anc[:m]


def best_nodes(tok: torch.Tensor, score: torch.Tensor, parent: torch.Tensor, size: int) -> torch.Tensor:
    """[2, nodes]: tokens and renumbered parents of the `size` best-scoring nodes of a tree whose
    nodes are numbered parents first (tok, score, parent: [n]; parent -1 = the pending token).

    A parent scores at least as high as its children; the tiny index penalty breaks ties towards
    parents, so the chosen nodes always form a tree. No host sync: capturable in a CUDA graph.
    """
    n, device = tok.numel(), tok.device
    key = score.double() - torch.arange(n, device=device, dtype=torch.float64) * 1e-9
    chosen = key.topk(min(size, n)).indices.sort().values
    renumber = torch.full((n,), -1, dtype=torch.long, device=device)
    renumber[chosen] = torch.arange(chosen.numel(), device=device)
    p = parent[chosen]
    return torch.stack([tok[chosen], torch.where(p >= 0, renumber[p.clamp_min(0)], p)])


def children_of(parents: Sequence[int]) -> dict[int, list[int]]:
    """Children of each node (and of -1, the pending token), in index order."""
    out: dict[int, list[int]] = {-1: []}
    for i, p in enumerate(parents):
        out.setdefault(p, []).append(i)
        out.setdefault(i, [])
    return out


class TreeBuilder:
    """Builds a flat token tree (a trie) from paths, sharing common prefixes."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self._index: dict[tuple[int, int], int] = {}  # (parent, token) -> node

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, parent: int, token: int) -> int:
        """The node for `token` under `parent`, created if new."""
        key = (parent, int(token))
        if key not in self._index:
            self._index[key] = len(self.tokens)
            self.tokens.append(int(token))
            self.parents.append(parent)
        return self._index[key]

    def add_path(self, path: Iterable[int], budget: int | None = None) -> None:
        """Insert a path of tokens below the pending token, stopping when the tree holds `budget` nodes."""
        node = -1
        for token in path:
            if budget is not None and (node, int(token)) not in self._index and len(self) >= budget:
                return
            node = self.add(node, token)

    def draft(self) -> Draft:
        if not self.tokens:
            return Draft.empty()
        return Draft(tokens=torch.tensor(self.tokens, dtype=torch.long),
                     parents=torch.tensor(self.parents, dtype=torch.long))


def merge_drafts(drafts: Sequence[Draft], budget: int) -> Draft:
    """One deterministic tree holding the paths of several drafts (SpecInfer's multi-draft merge).

    Drafts are inserted in order, each root-to-leaf path whole, until the tree holds
    `budget` nodes; a path that no longer fits is cut. Draft probabilities are dropped:
    the merged tree is verified as point masses, which stays lossless for any candidates.
    """
    builder = TreeBuilder()
    for d in drafts:
        for path in draft_paths(d):
            builder.add_path(path, budget)
    return builder.draft()


def draft_paths(draft: Draft) -> list[list[int]]:
    """Token paths from the pending token to each leaf (a chain gives one path)."""
    if draft.k == 0:
        return []
    tokens = draft.tokens.tolist()
    if draft.parents is None:
        return [tokens]
    parents = draft.parents.tolist()
    kids = children_of(parents)
    paths = []
    for leaf in (i for i in range(len(tokens)) if not kids[i]):
        path, node = [], leaf
        while node >= 0:
            path.append(tokens[node])
            node = parents[node]
        paths.append(path[::-1])
    return paths


def sparse_tree(accuracy: Sequence[Sequence[float]], size: int) -> list[tuple[int, ...]]:
    """Medusa's sparse tree: the `size` rank paths of highest estimated acceptance probability.

    accuracy[d][r]: measured probability that head d's rank-r candidate is the right token.
    A path's probability is the product of its ranks' accuracies; greedy expansion from the
    root keeps every chosen path's prefixes in the tree (a path is only reachable through
    them). Returned in breadth-first order, parents first.
    """
    import heapq

    chosen: list[tuple[int, ...]] = []
    frontier = [(-accuracy[0][r], (r,)) for r in range(len(accuracy[0]))]
    heapq.heapify(frontier)
    while frontier and len(chosen) < size:
        neg_p, path = heapq.heappop(frontier)
        chosen.append(path)
        d = len(path)
        if d < len(accuracy):
            for r in range(len(accuracy[d])):
                heapq.heappush(frontier, (neg_p * accuracy[d][r], path + (r,)))
    return sorted(chosen, key=lambda p: (len(p), p))


def shape_parents(shape: Sequence[tuple[int, ...]]) -> list[int]:
    """Parent node index of each rank path in a breadth-first tree shape (-1 = root)."""
    index = {path: i for i, path in enumerate(shape)}
    return [index[path[:-1]] if len(path) > 1 else -1 for path in shape]
