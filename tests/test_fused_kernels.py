"""The fused Triton layers (runtime/kernels.py) against the torch layers of the lean forward: on CPU
under Triton's interpreter (float32), and bitwise row independence where CUDA exists."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from specdeploy.config import SamplingParams
from specdeploy.errors import SpecDeployError
from specdeploy.runtime.cuda_runner import CudaGraphRunner, LeanLlama, choose_kernels
from specdeploy.runtime.loop import StopCondition, speculative_generate
from specdeploy.runtime.proposers import DraftModelProposer, NoProposer
from specdeploy.runtime.types import Draft

pytest.importorskip("triton")  # on CPU conftest.py has set TRITON_INTERPRET=1 before anything imported it

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def small_llama(layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    """A random GQA Llama with head_dim 32 (the fused kernels need a power of two >= 32)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=160, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, initializer_range=0.3)
    return LlamaForCausalLM(cfg).to(DEV).eval()


def both(model):
    return LeanLlama.from_hf(model, kernels="torch"), LeanLlama.from_hf(model, kernels="fused")


def test_kernel_choice():
    model = small_llama(layers=1)
    dims = LeanLlama.from_hf(model, kernels="torch").dims
    assert choose_kernels(dims, torch.device("cpu")) == "torch"  # the interpreter is never the default
    with pytest.raises(SpecDeployError, match="kernels must be"):
        choose_kernels(dims, torch.device("cpu"), "cuda")
    odd = LlamaConfig(vocab_size=96, hidden_size=96, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)  # head_dim 24
    with pytest.raises(SpecDeployError, match="power-of-two"):
        LeanLlama.from_hf(LlamaForCausalLM(odd), kernels="fused")


def test_fused_forward_matches_torch_prefill_ragged_and_tree():
    torch_lean, fused = both(small_llama())
    caches = [lean.new_cache(2, 96) for lean in (torch_lean, fused)]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 96, (2, 21), generator=g).to(DEV)

    def run(*args, **kw):
        outs = [lean.forward(cache, *args, **kw) for lean, cache in zip((torch_lean, fused), caches)]
        for a, b in zip(*outs):
            if a is not None:
                torch.testing.assert_close(b, a, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(caches[1].kv, caches[0].kv, atol=2e-4, rtol=1e-4)

    pos = torch.arange(21, device=DEV)[None].expand(2, 21)
    run(ids, pos, None, 96, want_hidden=True)  # prefill, both rows
    step = torch.randint(0, 96, (1, 3), generator=g).to(DEV)
    run(step, torch.tensor([[21, 22, 23]], device=DEV), torch.tensor([1], device=DEV), 64)  # row 1 alone
    ragged = torch.tensor([[30, 31], [24, 25]], device=DEV)  # rows at their own lengths
    run(torch.randint(0, 96, (2, 2), generator=g).to(DEV), ragged, None, 96)
    same = torch.tensor([[40]], device=DEV).expand(2, 1)  # a stride-0 view, as callers pass positions
    run(torch.randint(0, 96, (2, 1), generator=g).to(DEV), same, None, 96)
    # a token tree on row 0: node i at slot 21 + i, rotated at 21 + depth
    parents = [-1, 0, 0, 1, 3]
    anc = torch.eye(5, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            anc[i] |= anc[p]
    tree_pos = torch.arange(21, 26, device=DEV)[None]
    depth = anc.sum(-1).to(DEV) - 1
    run(torch.randint(0, 96, (1, 5), generator=g).to(DEV), tree_pos, torch.tensor([0], device=DEV), 64,
        rope_pos=21 + depth[None], ancestry=anc[None].to(DEV))


class _Tree:
    """A fixed-shape token tree from a draft runner's greedy chain plus one sibling per level."""

    needs_hidden = False

    def __init__(self, runner) -> None:
        self.chain = DraftModelProposer(runner)

    def reset(self) -> None:
        self.chain.reset()

    def propose(self, ctx, k: int) -> Draft:
        d = self.chain.propose(ctx, k)
        if d.k == 0:
            return d
        tokens, parents = [], []
        for i, t in enumerate(d.tokens.tolist()):  # node 2i: the chain token, 2i + 1: a sibling
            parent = 2 * (i - 1) if i else -1
            tokens += [t, (t + 1) % 96]
            parents += [parent, parent]
        return Draft(tokens=torch.tensor(tokens), probs=None, parents=torch.tensor(parents))


@pytest.mark.parametrize("method", ["draft", "tree"])
def test_fused_runner_greedy_is_lossless(method):
    """Speculation over a fused-kernel target gives the plain greedy output of the torch runner
    (one prompt: the interpreter takes ~1 s a forward; chains of a draft model and trees, the verify
    shapes n-gram lookup also uses)."""
    model = small_llama(layers=2, seed=1)
    torch_lean, fused = both(model)
    params, stop = SamplingParams(max_new_tokens=14), StopCondition(frozenset([0]), 14)
    prompt = [5, 17, 5, 17, 9, 33, 5]
    ref = speculative_generate(CudaGraphRunner(torch_lean, max_length=64, use_graphs=False), NoProposer(),
                               prompt, params, stop, k=0).token_ids
    draft_runner = CudaGraphRunner(torch_lean, max_length=64, use_graphs=False)  # the target itself, torch kernels
    proposer = {"draft": DraftModelProposer(draft_runner), "tree": _Tree(draft_runner)}[method]
    target = CudaGraphRunner(fused, max_length=64, query_buckets=(1, 4, 16), use_graphs=False)
    out = speculative_generate(target, proposer, prompt, params, stop, k=3)
    assert out.token_ids == ref
    assert out.stats.target_forwards <= len(ref) // 2  # a draft that is the target: most draft tokens accepted


@pytest.mark.skipif(not torch.cuda.is_available(), reason="row independence is a property of the GPU kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rows_are_bitwise_independent(dtype):
    """A token's logits are the same bits alone, first in a chain (another KV bucket) and beside other rows."""
    fused = LeanLlama.from_hf(small_llama().to(dtype), kernels="fused")
    prefix = torch.randint(0, 96, (1, 40), device=DEV)
    chain = torch.randint(0, 96, (1, 5), device=DEV)
    pos = torch.arange(45, device=DEV)[None]

    def prefilled(rows: int):
        cache = fused.new_cache(rows, 200)
        fused.forward(cache, prefix.expand(rows, 40), pos[:, :40].expand(rows, 40), None, 200, logits="none")
        return cache

    alone = fused.forward(prefilled(1), chain[:, :1], pos[:, 40:41], None, 64)[0][0, 0]
    in_chain = fused.forward(prefilled(1), chain, pos[:, 40:], None, 128)[0][0, 0]
    rows = torch.randint(0, 96, (5, 1), device=DEV)
    rows[2] = chain[0, 0]
    in_batch = fused.forward(prefilled(5), rows, pos[:, 40:41].expand(5, 1), None, 200)[0][2, 0]
    assert torch.equal(alone, in_chain) and torch.equal(alone, in_batch)


def test_qkv_rope_refuses_strided_index_tensors():
    """The kernel reads positions by offset: a stride-0 view would be read past its storage."""
    from specdeploy.runtime import kernels

    lean = LeanLlama.from_hf(small_llama(layers=1), kernels="fused")
    w, cache = lean.layers[0], lean.new_cache(2, 16)
    pos = torch.tensor([3], device=DEV).expand(2)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.qkv_rope(torch.zeros(2, 128, device=DEV), w.attn_norm, 1e-5, w.wqkv, lean.rope_cos, lean.rope_sin, pos,
                         cache.kv[0], torch.arange(2, device=DEV), pos, 4, 2, 1)


@pytest.mark.parametrize("rows, vocab, hidden, k", [(1, 1000, 64, 8), (8, 777, 96, 8), (3, 300, 32, 5)])
def test_logits_topk_matches_log_softmax_topk(rows, vocab, hidden, k):
    """The fused LM head + log-softmax + top-k of EAGLE drafting, with and without the rows' scores."""
    from specdeploy.runtime import kernels

    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, hidden, generator=g).to(DEV), torch.randn(vocab, hidden, generator=g).to(DEV)
    score = torch.randn(rows, generator=g).to(DEV)
    ref = torch.log_softmax(F.linear(x, w).float(), -1).topk(k)
    values, indices = kernels.logits_topk(x, w, k, bias=score)
    assert torch.equal(indices, ref.indices)
    torch.testing.assert_close(values, score[:, None] + ref.values, atol=1e-4, rtol=1e-5)
    out = (torch.empty(rows * k, device=DEV), torch.empty(rows * k, dtype=torch.long, device=DEV))
    kernels.logits_topk(x, w, k, out=out)
    assert torch.equal(out[1].view(rows, k), ref.indices)
    torch.testing.assert_close(out[0].view(rows, k), ref.values, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.logits_topk(x, w, k, out=(out[0][:-1], out[1][:-1]))


def test_logits_topk_maps_rows_to_the_draft_vocabulary_ids():
    """Over a draft vocabulary's rows of an LM head, the kernel returns token ids, not row numbers."""
    from specdeploy.runtime import kernels

    g = torch.Generator().manual_seed(7)
    x, w = torch.randn(5, 64, generator=g).to(DEV), torch.randn(1000, 64, generator=g).to(DEV)
    ids = torch.randperm(1000, generator=g)[:300].sort().values.to(DEV)
    ref = torch.log_softmax(F.linear(x, w[ids]).float(), -1).topk(8)
    values, indices = kernels.logits_topk(x, w[ids], 8, ids=ids)
    assert torch.equal(indices, ids[ref.indices])
    torch.testing.assert_close(values, ref.values, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="token ids"):
        kernels.logits_topk(x, w[ids], 8, ids=ids[:-1])


def test_logits_topk_breaks_ties_to_the_lowest_index():
    from specdeploy.runtime import kernels

    w = torch.zeros(300, 32, device=DEV)
    w[[250, 5, 200, 17]] = 1.0  # four equal best logits, in three vocabulary slices
    values, indices = kernels.logits_topk(torch.ones(1, 32, device=DEV), w, 6)
    assert indices.tolist() == [[5, 17, 200, 250, 0, 1]]
    assert values[0, :4].tolist() == [values[0, 0].item()] * 4


@pytest.mark.parametrize("vocab_step", [None, 2], ids=["whole-vocab", "draft-vocab"])
def test_fused_graph_eagle_drafts_the_torch_trees(monkeypatch, vocab_step):
    """GraphEagleProposer over the fused kernels (the CUDA path: fused layer, `logits_topk`) drafts the
    trees of its torch path, over the whole vocabulary or a draft vocabulary (every other id)."""
    from specdeploy.models import eagle
    from specdeploy.runtime.eagle_graphs import GraphEagleProposer
    from specdeploy.runtime.types import Context

    model = small_llama(layers=2, seed=3)
    torch.manual_seed(4)
    vocab = None if vocab_step is None else torch.arange(1, model.config.vocab_size, vocab_step)
    head = eagle.EagleHead(eagle.EagleConfig.from_target(model.config), vocab).to(DEV).eval()
    embed, lm_head = model.get_input_embeddings(), model.get_output_embeddings()
    kw = dict(tree_size=10, topk=3, max_depth=3, max_length=64, query_buckets=(1, 4, 16), use_graphs=False)
    proposers = {}
    for kernels in ("torch", "fused"):
        monkeypatch.setenv("SPECDEPLOY_KERNELS", kernels)
        proposers[kernels] = GraphEagleProposer.from_head(head, embed, lm_head, **kw)
    assert proposers["fused"].lean.kernels == "fused" and proposers["torch"].lean.kernels == "torch"
    ids = torch.randint(1, 96, (26,), generator=torch.Generator().manual_seed(5)).tolist()
    with torch.no_grad():
        hidden = model.model(torch.tensor([ids], device=DEV)).last_hidden_state[0]
    for n, k in ((20, 3), (23, 2), (26, 3)):
        ctx = Context(token_ids=ids[:n], prompt_len=20, params=SamplingParams(), target_hidden=hidden[: n - 1])
        a, b = (p.propose(ctx, k) for p in proposers.values())
        assert a.tokens.tolist() == b.tokens.tolist() and a.parents.tolist() == b.parents.tolist(), (n, k)
        assert vocab is None or set(b.tokens.tolist()) <= set(vocab.tolist())


@pytest.mark.parametrize("k, hidden, slots", [(3, 128, 6), (8, 576, 56)])
def test_eagle_frontier_matches_the_torch_ops(k, hidden, slots):
    """`eagle_frontier` writes what GraphEagleProposer's torch ops do: every candidate's parent, and the
    k best candidates (ties to the lowest index) with their parents' features and ancestor flags."""
    from specdeploy.runtime import kernels

    g = torch.Generator().manual_seed(k)
    score = torch.randn(k * k, generator=g).to(DEV)
    score[k + 1] = score[1] = score.max() + 1  # a tie for the best: the lower index first
    tok = torch.randint(0, 1000, (k * k,), generator=g).to(DEV)
    ids = torch.randint(0, 100, (k,), generator=g).to(DEV)
    feats = torch.randn(k, hidden, generator=g).to(DEV)
    anc = (torch.rand(k, slots, generator=g) < 0.5).to(DEV)
    start = 17
    out = (torch.zeros(k * k, dtype=torch.long, device=DEV), torch.zeros(k, dtype=torch.long, device=DEV),
           torch.zeros(k, dtype=torch.long, device=DEV), torch.zeros(k, device=DEV),
           torch.zeros(k, hidden, device=DEV), torch.zeros(k, slots, dtype=torch.bool, device=DEV))
    kernels.eagle_frontier(score, tok, ids, feats, anc, start, k, out=out)
    best = score.sort(descending=True, stable=True).indices[:k]
    assert best[:2].tolist() == [1, k + 1] and out[1].tolist() == (best + start).tolist()
    assert out[0].tolist() == ids.repeat_interleave(k).tolist()
    assert out[2].tolist() == tok[best].tolist() and out[3].tolist() == score[best].tolist()
    assert torch.equal(out[4], feats[best // k]) and torch.equal(out[5], anc[best // k])


@pytest.mark.parametrize("m, hidden", [(1, 128), (8, 576), (19, 64)])
def test_eagle_input_matches_the_torch_ops(m, hidden):
    """`eagle_input` is GraphEagleProposer's input layer: the features and the tokens' embeddings,
    concatenated, through a linear layer with bias."""
    from specdeploy.runtime import kernels

    g = torch.Generator().manual_seed(m)
    feats = torch.randn(m, hidden, generator=g).to(DEV)
    tokens = torch.randint(0, 300, (m,), generator=g).to(DEV)
    embed = torch.randn(300, hidden, generator=g).to(DEV)
    w = torch.randn(hidden, 2 * hidden, generator=g).to(DEV) / hidden**0.5
    b = torch.randn(hidden, generator=g).to(DEV)
    want = F.linear(torch.cat([feats, F.embedding(tokens, embed)], -1), w, b)
    torch.testing.assert_close(kernels.eagle_input(feats, tokens, embed, w, b), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="eagle_input"):
        kernels.eagle_input(feats, tokens, embed, w[:, 1:], b)


@pytest.mark.parametrize("k, slots, kv", [(3, 6, 40), (8, 56, 512), (8, 56, 300)])
def test_tree_level_mask_matches_the_torch_ops(k, slots, kv):
    """`tree_level_mask` writes the ancestor-or-self flags and the attention mask of GraphEagleProposer's
    torch ops: the committed positions, and the scratch slots a row flags."""
    from specdeploy.runtime import kernels

    g = torch.Generator().manual_seed(kv)
    anc = (torch.rand(k, slots, generator=g) < 0.4).to(DEV)
    own = torch.zeros(k, slots, dtype=torch.bool, device=DEV)
    own[:, slots - k :] = torch.eye(k, dtype=torch.bool, device=DEV)
    for fed in (0, 5, kv - slots, kv - slots // 2):  # the last: scratch slots past kv_len are never read
        fed_t = torch.tensor([fed], device=DEV)
        want_anc = anc | own
        want = torch.arange(kv, device=DEV).expand(k, kv) < fed_t
        want = torch.cat([want, torch.zeros(k, slots, dtype=torch.bool, device=DEV)], 1)  # room for the scatter
        want.scatter_(1, (fed_t + torch.arange(slots, device=DEV)).expand(k, -1), want_anc)
        got_anc = torch.zeros(k, slots, dtype=torch.bool, device=DEV)
        got = torch.ones(k, kv, dtype=torch.bool, device=DEV)
        kernels.tree_level_mask(anc, own, fed_t, got_anc, got)
        assert torch.equal(got_anc, want_anc) and torch.equal(got, want[:, :kv]), fed


@pytest.mark.parametrize("q", [1, 5, 16, 64, 128])
def test_tree_ancestry_matches_ancestor_matrix(q):
    """`kernels.tree_ancestry` writes `tree.ancestor_matrix` and the depths into the runner's static
    buffers (wider than the tree: nothing outside [:q, :q] is touched), for random trees and a chain."""
    from specdeploy.runtime import kernels
    from specdeploy.runtime.tree import ancestor_matrix

    g = torch.Generator().manual_seed(q)
    for trial in range(3):
        parents = torch.arange(-1, q - 1) if trial == 0 else torch.tensor(
            [int(torch.randint(-1, i, (1,), generator=g)) for i in range(q)])
        anc = torch.zeros(130, 130, dtype=torch.bool, device=DEV)
        depth = torch.full((130,), -7, dtype=torch.long, device=DEV)
        kernels.tree_ancestry(parents.to(DEV), anc, depth[:q])
        want = ancestor_matrix(parents)
        assert torch.equal(anc[:q, :q].cpu(), want) and torch.equal(depth[:q].cpu(), want.sum(-1) - 1)
        assert not anc[q:].any() and not anc[:, q:].any() and (depth[q:] == -7).all()


@pytest.mark.parametrize("n, size", [(8, 63), (200, 63), (456, 48)])
def test_best_nodes_kernel_matches_the_torch_ops(n, size):
    """`kernels.best_nodes` (GraphEagleProposer's select step) keeps the nodes `tree.best_nodes` keeps, with
    the same renumbered parents, on random EAGLE-like trees (children score at most their parent; ties
    included: the index penalty keeps a parent before its equal child)."""
    from specdeploy.runtime import kernels
    from specdeploy.runtime.tree import best_nodes

    g = torch.Generator().manual_seed(n)
    for trial in range(2):
        parent = [-1] * min(8, n) + [int(torch.randint(0, i, (1,), generator=g)) for i in range(min(8, n), n)]
        score: list[float] = []
        for i, p in enumerate(parent):
            drop = 0.0 if trial and i % 3 == 0 else float(torch.rand(1, generator=g))
            score.append((0.0 if p < 0 else score[p]) - drop)
        args = (torch.randint(0, 100, (n,), generator=g).to(DEV), torch.tensor(score, device=DEV), torch.tensor(parent, device=DEV))
        assert torch.equal(kernels.best_nodes(*args, size).cpu(), best_nodes(*args, size).cpu())


def test_fused_batch_eagle_equals_its_torch_path(monkeypatch):
    """The batched engine's EAGLE chains with target and head on the fused kernels (the CUDA path) draft
    and emit what the torch path does: the head's window, chain and prefill through fused rows."""
    from specdeploy.models import eagle
    from specdeploy.runtime.batch import BatchRequest, BatchSpeculator

    model = small_llama(layers=2, seed=5)
    torch.manual_seed(6)
    head = eagle.EagleHead(eagle.EagleConfig.from_target(model.config)).to(DEV).eval()
    g = torch.Generator().manual_seed(7)
    reqs = [BatchRequest(torch.randint(1, 96, (n,), generator=g).tolist(), 6) for n in (12, 1)]
    out = {}
    for kernels in ("torch", "fused"):
        monkeypatch.setenv("SPECDEPLOY_KERNELS", kernels)
        lean = LeanLlama.from_hf(model)
        eng = BatchSpeculator(lean, method="eagle", head=head, k=2, max_batch=2, max_length=48, use_graphs=False,
                              prefill_buckets=(16,))
        assert lean.kernels == eng.head.lean.kernels == kernels
        drafts, real = [], eng._propose_eagle
        monkeypatch.setattr(eng, "_propose_eagle", lambda caps, kv: (d := real(caps, kv), drafts.append(d[0].tolist()))[0])
        out[kernels] = [r.token_ids for r in eng.run(reqs)], drafts
    assert out["fused"] == out["torch"] and len(out["torch"][1]) >= 3
