"""Token trees: shapes, greedy tree verification, and the sampling distribution through trees.

The statistical tests reuse the bigram target of test_sampling_distribution (sequence
probabilities known in closed form) with tree-shaped drafts: children drawn WITHOUT
replacement from a draft distribution (recursive rejection sampling with probs), top-k
children (point masses), lookup chains mixed with trees step by step, and a multi-draft merge.
A chi-square test compares whole
3-token continuations with the exact distribution; a deliberately wrong tree rule
(after a rejected child, keep the target distribution instead of the residual) must fail
the same test, or the test could not catch a real bug.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch

import specdeploy.runtime.verify as verify_module
from specdeploy.config import SamplingParams
from specdeploy.runtime.loop import StopCondition, _fit, speculative_generate
from specdeploy.runtime.proposers import NGramProposer
from specdeploy.runtime.head_proposers import LookupFirstProposer, MultiDraftProposer
from specdeploy.runtime.tree import ancestor_matrix, draft_paths, merge_drafts, shape_parents, sparse_tree
from specdeploy.runtime.types import Context, Draft
from specdeploy.runtime.verify import sampling_probs, verify
from table_runner import BigramRunner

from test_sampling_distribution import NEW, _exact, _tables, chi_square_pvalue  # one statistical check for chains and trees

N = 2000
class TreeBigramRunner(BigramRunner):
    """The bigram target scoring token trees: a token's logits depend on that token only."""

    supports_tree = True

    def forward(self, tokens, tree_parents=None):
        return super().forward(tokens)

    def keep_path(self, keep: int, path: list[int]) -> None:
        self.tokens = self.tokens[:keep] + [self.tokens[p] for p in path]


class SampledTree:
    """Draws `width` children per node without replacement from a bigram draft, `depth` levels deep."""

    def __init__(self, table: torch.Tensor, width: int, depth: int, with_probs: bool = True) -> None:
        self.table, self.width, self.depth, self.with_probs = table, width, depth, with_probs

    def reset(self) -> None:
        pass

    def propose(self, ctx: Context, k: int) -> Draft:
        tokens, parents, probs = [], [], []
        level = [(-1, ctx.token_ids[-1])]
        for _ in range(min(k, self.depth)):
            nxt = []
            for node, tok in level:
                q = sampling_probs(self.table[tok][None], ctx.params)[0]
                left = q.clone()
                for _ in range(self.width):
                    if float(left.sum()) <= 0:
                        break
                    child = int(torch.multinomial(left / left.sum(), 1, generator=ctx.generator))
                    left[child] = 0.0
                    tokens.append(child)
                    parents.append(node)
                    probs.append(q)
                    nxt.append((len(tokens) - 1, child))
            level = nxt
        return Draft(torch.tensor(tokens, dtype=torch.long), torch.stack(probs) if self.with_probs else None,
                     torch.tensor(parents, dtype=torch.long))


class TopTree(SampledTree):
    """Deterministic: the `width` most likely draft tokens under each node (no probs: point masses)."""

    def propose(self, ctx: Context, k: int) -> Draft:
        tokens, parents = [], []
        level = [(-1, ctx.token_ids[-1])]
        for _ in range(min(k, self.depth)):
            nxt = []
            for node, tok in level:
                for c in self.table[tok].topk(self.width).indices.tolist():
                    tokens.append(c)
                    parents.append(node)
                    nxt.append((len(tokens) - 1, c))
            level = nxt
        return Draft(torch.tensor(tokens, dtype=torch.long), parents=torch.tensor(parents, dtype=torch.long))


def _sample(proposer, prompt: list[int], params: SamplingParams, n: int, k: int) -> Counter:
    target, _ = _tables()
    runner = TreeBigramRunner(target)
    counts: Counter = Counter()
    for i in range(n):
        p = SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, seed=i, max_new_tokens=NEW)
        counts[tuple(speculative_generate(runner, proposer, prompt, p, StopCondition(frozenset(), NEW), k=k).token_ids)] += 1
    return counts


# ---------------------------------------------------------------- shapes

def test_ancestor_matrix_and_order():
    anc = ancestor_matrix(torch.tensor([-1, 0, 0, 1, -1]))
    assert anc[3].tolist() == [True, True, False, True, False]
    assert anc[4].tolist() == [False, False, False, False, True]
    with pytest.raises(ValueError):
        ancestor_matrix(torch.tensor([1, -1]))


def test_merge_shares_prefixes_and_respects_budget():
    chain = Draft(torch.tensor([5, 6, 7]))
    tree = Draft(torch.tensor([5, 9, 6, 8]), parents=torch.tensor([-1, -1, 0, 2]))
    merged = merge_drafts([chain, tree], budget=10)
    assert sorted(map(tuple, draft_paths(merged))) == [(5, 6, 7), (5, 6, 8), (9,)]
    assert merged.k == 5  # 5, 6, 7, 9, 8: the shared prefix 5, 6 appears once
    small = merge_drafts([chain, tree], budget=4)
    assert small.k == 4 and (small.parents < torch.arange(4)).all()
    assert merge_drafts([Draft.empty(), Draft.empty()], budget=4).k == 0


def test_sparse_tree_keeps_prefixes_and_likeliest_paths():
    acc = [[0.7, 0.2, 0.05], [0.5, 0.3], [0.4]]
    shape = sparse_tree(acc, 6)
    assert len(shape) == 6 and (0,) in shape and (0, 0) in shape and (0, 0, 0) in shape
    assert all(p[:-1] in shape for p in shape if len(p) > 1)
    parents = shape_parents(shape)
    assert all(p < i for i, p in enumerate(parents))


def test_fit_cuts_depth_and_nodes():
    d = Draft(torch.tensor([1, 2, 3, 4, 5]), parents=torch.tensor([-1, 0, 1, -1, 3]))
    cut = _fit(d, max_depth=2, max_nodes=10)
    assert cut.tokens.tolist() == [1, 2, 4, 5] and cut.parents.tolist() == [-1, 0, -1, 2]
    assert _fit(d, max_depth=5, max_nodes=2).tokens.tolist() == [1, 2]
    assert d.depth == 3 and cut.depth == 2


# ---------------------------------------------------------------- greedy verification

def _onehot_logits(tokens: list[int], vocab: int = 10) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(tokens), vocab).float() * 10


def test_greedy_tree_walks_the_matching_branch():
    # pending -> {3: node0, 4: node1}; node1 -> {5: node2, 6: node3}; node3 -> {7: node4}
    d = Draft(torch.tensor([3, 4, 5, 6, 7]), parents=torch.tensor([-1, -1, 1, 1, 3]))
    # rows: after pending, after node 0..4: target wants 4, then 6, then 7, then 9 (bonus)
    logits = _onehot_logits([4, 0, 0, 0, 7, 9])
    logits[2] = _onehot_logits([6])[0]  # after node1 (token 4) the target says 6
    v = verify(d, logits, SamplingParams())
    assert v.path == (1, 3, 4) and v.num_accepted == 3 and v.next_token == 9
    assert v.emitted(d) == [4, 6, 7, 9]


def test_greedy_tree_no_match_emits_target_token():
    d = Draft(torch.tensor([3, 4]), parents=torch.tensor([-1, -1]))
    v = verify(d, _onehot_logits([8, 0, 0]), SamplingParams())
    assert v.path == () and v.emitted(d) == [8]


def _greedy_walk(tokens: list[int], parents: list[int], target: list[int]) -> tuple[list[int], int]:
    """The greedy rule, walked naively: from the pending token, the first child that is its argmax."""
    path, node = [], -1
    while True:
        nxt = next((i for i, (t, p) in enumerate(zip(tokens, parents)) if p == node and t == target[node + 1]), None)
        if nxt is None:
            return path, target[node + 1]
        path.append(nxt)
        node = nxt


def test_greedy_tree_verdicts_on_random_trees():
    """Random trees (repeated sibling tokens included) and targets: the verdict is the naive walk's."""
    g = torch.Generator().manual_seed(0)
    for trial in range(300):
        k = int(torch.randint(1, 14, (1,), generator=g))
        parents = [int(torch.randint(-1, i, (1,), generator=g)) for i in range(k)]
        tokens = torch.randint(0, 3, (k,), generator=g)  # a tiny vocab: many matches and repeats
        target = torch.randint(0, 3, (k + 1,), generator=g)
        d = Draft(tokens, parents=torch.tensor(parents))
        v = verify(d, torch.nn.functional.one_hot(target, 3).float(), SamplingParams())
        path, nxt = _greedy_walk(tokens.tolist(), parents, target.tolist())
        assert (list(v.path), v.next_token, v.proposed) == (path, nxt, d.depth), trial


def _skip_without_cpu_kernels() -> None:
    """The device verdict's kernel on CPU tensors needs Triton's interpreter (conftest.py sets it where
    there is no GPU; test_cuda_runner.py runs the kernel on the GPU)."""
    from specdeploy.runtime import kernels

    if not kernels.available(torch.device("cpu")):
        pytest.skip("Triton's interpreter is off (a GPU machine) or Triton is missing")


@pytest.mark.parametrize("chain", [False, True], ids=["trees", "chains"])
@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_device_verdicts_are_the_host_verdicts(chain, temperature):
    """`DeviceVerdict` (one Triton launch after the draws; CPU: the interpreter) on random trees and chains
    of point-mass tokens (repeated siblings included; empty chains are plain steps): its verdict is `verify`'s from the same generator
    state (greedy: also the naive walk's), and its device views (what a proposer drafts ahead from) hold
    the committed rows and the token after each, 0-padded to the most a step can commit."""
    _skip_without_cpu_kernels()
    from specdeploy.runtime.verify import DeviceVerdict

    params = SamplingParams(temperature=temperature)
    g = torch.Generator().manual_seed(1)
    for trial in range(40):
        k = int(torch.randint(0 if chain else 1, 32, (1,), generator=g))
        parents = list(range(-1, k - 1)) if chain else [int(torch.randint(-1, i, (1,), generator=g)) for i in range(k)]
        tokens = torch.randint(0, 3, (k,), generator=g)  # a tiny vocab: many matches and repeats
        logits = torch.randn(k + 1, 3, generator=g) * 2
        d = Draft(tokens) if chain else Draft(tokens, parents=torch.tensor(parents), max_depth=k if trial % 2 else None)
        seed = int(torch.randint(0, 2**31, (1,), generator=g))
        accept = DeviceVerdict(d, logits, params, torch.Generator().manual_seed(seed))
        v = accept.verdict()
        assert v == verify(d, logits, params, torch.Generator().manual_seed(seed)), trial
        path = list(v.path) if v.path is not None else list(range(v.num_accepted))
        if params.greedy:
            assert (path, v.next_token) == _greedy_walk(tokens.tolist(), parents, logits.argmax(-1).tolist())
        c = len(path) + 1
        assert accept.count.tolist() == [c] and accept.last.tolist() == [c - 1] and accept.max_count == d.depth_bound + 1
        pad = [0] * (accept.max_count - c)
        assert accept.rows.tolist() == [0] + [1 + i for i in path] + pad, trial
        assert accept.after.tolist() == tokens[path].tolist() + [v.next_token] + pad, trial
        assert accept.pending().tolist() == [v.next_token], trial  # the next step's first input


def test_device_verdict_skips_repeated_siblings():
    """The sampled rule on a hand-made node: children A, A, B. The repeated A is skipped and its mass not
    removed again, so B (u = 0.8, p 0.3) is tried against 1 - p(A) = 0.5: 0.8 * 0.5 >= 0.3, rejected."""
    _skip_without_cpu_kernels()
    from specdeploy.runtime import kernels

    tokens, parents = torch.tensor([5, 5, 7]), torch.tensor([-1, -1, -1])
    recovered = torch.tensor([9, 1, 2, 3])
    for u_b, want in ((0.8, (1, 9)), (0.5, (2, 7))):  # 0.5 * 0.5 < 0.3: B accepted, then the token recovered after it
        out, b = kernels.tree_accept(tokens, parents, recovered, torch.tensor([0.5, 0.5, 0.3]), torch.tensor([0.99, 0.0, u_b]))
        c = int(out[0])
        assert (c, int(out[2 + b])) == (want[0], want[1] if c == 1 else 7), u_b
        if c == 2:
            assert out[2 : 2 + c].tolist() == [0, 3] and out[2 + b : 2 + b + c].tolist() == [7, 3]


def test_greedy_tree_loop_equals_plain_decoding():
    target, draft = _tables()
    runner = TreeBigramRunner(target)
    stop = StopCondition(frozenset(), 12)
    plain = speculative_generate(runner, TopTree(draft, 1, 1), [0], SamplingParams(), stop, k=1)
    for proposer, k in ((TopTree(draft, 2, 3), 3), (TopTree(target, 2, 2), 2), (SampledTree(draft, 3, 2), 2)):
        g = speculative_generate(runner, proposer, [0], SamplingParams(seed=0), stop, k=k)
        assert g.token_ids == plain.token_ids
    perfect = speculative_generate(runner, TopTree(target, 2, 3), [0], SamplingParams(), stop, k=3)
    assert perfect.stats.acceptance_length > 3.0  # the target's own argmax is always in the tree


# ---------------------------------------------------------------- sampling distribution

PARAMS = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_k=3), SamplingParams(temperature=1.2, top_p=0.8)]


@pytest.mark.parametrize("params", PARAMS, ids=["T1", "T0.8-topk3", "T1.2-topp0.8"])
def test_sampled_tree_matches_target(params):
    _, draft = _tables()
    counts = _sample(SampledTree(draft, width=2, depth=2), [0], params, N, k=2)
    assert chi_square_pvalue(counts, _exact(_tables()[0], [0], params), N) > 1e-3


@pytest.mark.parametrize("params", PARAMS[:2], ids=["T1", "T0.8-topk3"])
def test_top_k_tree_matches_target(params):
    _, draft = _tables()
    counts = _sample(TopTree(draft, width=2, depth=3), [0], params, N, k=3)
    assert chi_square_pvalue(counts, _exact(_tables()[0], [0], params), N) > 1e-3


def test_lookup_first_matches_target():
    """Lookup chains where the context repeats, top-k trees elsewhere: each step's choice follows the
    committed tokens, so the output still follows the target's distribution."""
    _, draft = _tables()
    prompt = [0, 1, 2, 3, 0, 1, 2, 3, 0]
    params = SamplingParams(temperature=1.0)
    tree = TopTree(draft, 2, 2)
    drafted = Counter()

    class Counted(LookupFirstProposer):
        def propose(self, ctx, k):
            d = super().propose(ctx, k)
            drafted["tree" if d.is_tree else "chain" if d.k else "none"] += 1
            return d

    counts = _sample(Counted(NGramProposer(2, 3), tree), prompt, params, N, k=3)
    assert drafted["tree"] > N / 10 and drafted["chain"] > N / 10, drafted  # both kinds of step ran
    assert chi_square_pvalue(counts, _exact(_tables()[0], prompt, params), N) > 1e-3


def test_multi_draft_tree_matches_target():
    """SpecInfer's merge of a lookup chain and a top-k tree, verified as point masses."""
    _, draft = _tables()
    prompt = [0, 1, 2, 3, 0, 1, 2, 3, 0]
    params = SamplingParams(temperature=1.0)
    counts = _sample(MultiDraftProposer([NGramProposer(1, 3), TopTree(draft, 2, 2)], budget=6), prompt, params, N, k=3)
    assert chi_square_pvalue(counts, _exact(_tables()[0], prompt, params), N) > 1e-3


@pytest.mark.parametrize("point_masses", [False, True], ids=["sampled-children", "top-k-children"])
def test_wrong_tree_rule_is_caught(monkeypatch, point_masses):
    """After a rejected child, keeping the full target distribution (no residual) is biased."""
    real = verify_module.verify_tree

    def wrong(draft, target_logits, params, generator=None):
        v = real(draft, target_logits, params, generator)
        if v.num_accepted == 0:  # recover from the target itself, ignoring the rejections
            probs = sampling_probs(target_logits, params)[0]
            return type(v)(0, int(torch.multinomial(probs, 1, generator=generator)), v.proposed, path=())
        return v

    monkeypatch.setattr(verify_module, "verify_tree", wrong)
    _, draft = _tables()
    params = SamplingParams(temperature=1.0)
    tree = TopTree(draft, width=2, depth=2) if point_masses else SampledTree(draft, width=2, depth=2)
    counts = _sample(tree, [0], params, N, k=2)
    assert chi_square_pvalue(counts, _exact(_tables()[0], [0], params), N) < 1e-6
