"""EAGLE / Medusa / DraftLM artifacts: the head's layer matches a Hugging Face Llama layer, the
shipped artifacts load with no path, a draft for another target warns, another tokenizer is refused."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from specdeploy.config import SpecConfig
from specdeploy.errors import SpecDeployError
from specdeploy.models import artifacts, draft_lm, eagle, medusa
from specdeploy.models.artifacts import DraftMismatchWarning
from specdeploy.runtime.engine import SpecEngine
from specdeploy.runtime.head_proposers import EagleProposer
from specdeploy.runtime.types import Context
from specdeploy.config import SamplingParams


def test_decoder_layer_matches_hf_llama_layer(smollm2):
    model = smollm2.model
    head = eagle.EagleHead(eagle.EagleConfig.from_target(model.config))
    src = model.model.layers[3]
    head.layer.load_state_dict(src.state_dict())
    x = torch.randn(1, 7, model.config.hidden_size) * 2
    pos = torch.arange(5, 12)
    with torch.no_grad():
        ours, _ = head.layer(x, pos)
        cos_sin = model.model.rotary_emb(x, pos[None])
        theirs = src(x, attention_mask=None, position_embeddings=cos_sin, position_ids=pos[None])
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()


def test_shipped_artifacts_load_without_a_path(smollm2):
    for kind in ("draft_lm", "medusa", "eagle"):
        folder = artifacts.resolve(kind)
        m = artifacts.read_manifest(folder, kind)
        assert m["target_hash"] == smollm2.source_hash
        assert m["tokenizer_hash"] == artifacts.tokenizer_hash(smollm2.tokenizer)
        assert m["final_losses"] and m["data"]["num_sequences"] > 0
        assert (folder / "loss.png").is_file()
        assert sum(f.stat().st_size for f in folder.iterdir()) < 20e6
    heads, tree, m = medusa.load(None, smollm2)
    assert len(m["head_accuracy"]) == heads.num_heads and len(tree) > heads.num_heads
    draft = draft_lm.load(None, smollm2)
    assert draft.model.embed_tokens is smollm2.model.model.embed_tokens  # shared, not stored


def _stale_copy(tmp_path, kind: str, **changes):
    folder = tmp_path / kind
    shutil.copytree(artifacts.resolve(kind), folder)
    m = json.loads((folder / "manifest.json").read_text())
    m.update(changes)
    (folder / "manifest.json").write_text(json.dumps(m))
    return folder


@pytest.mark.parametrize("method, kind", [("eagle", "eagle"), ("medusa", "medusa"), ("draft", "draft_lm")])
def test_draft_for_another_target_warns(smollm2, tmp_path, method, kind):
    folder = _stale_copy(tmp_path, kind, target_hash="0" * 64)
    with pytest.warns(DraftMismatchWarning, match="trained for target 000000000000"):
        SpecEngine(smollm2, SpecConfig(method=method, draft=str(folder)))


def test_draft_with_another_tokenizer_is_refused(smollm2, tmp_path):
    folder = _stale_copy(tmp_path, "eagle", tokenizer_hash="f" * 64)
    with pytest.raises(SpecDeployError, match="another tokenizer"):
        SpecEngine(smollm2, SpecConfig(method="eagle", draft=str(folder)))


def test_not_an_artifact_is_refused(smollm2, tmp_path):
    with pytest.raises(SpecDeployError, match="not a specdeploy draft artifact"):
        SpecEngine(smollm2, SpecConfig(method="medusa", draft=str(tmp_path)))


def test_a_draft_vocabulary_round_trips_and_the_trees_keep_to_it(smollm2, tmp_path):
    """Saved and loaded with the head; the eager and static-cache drafters both draft only its ids."""
    from specdeploy.runtime.eagle_graphs import GraphEagleProposer

    head, manifest = eagle.load(None, smollm2)
    head.draft_vocab = torch.arange(0, 49152, 3)  # every third id
    eagle.save(head, tmp_path / "eagle", manifest)
    loaded, _ = eagle.load(tmp_path / "eagle", smollm2)
    assert torch.equal(loaded.draft_vocab, head.draft_vocab)
    embed, lm_head = smollm2.model.get_input_embeddings(), smollm2.model.get_output_embeddings()
    ref = EagleProposer.from_head(loaded, embed, lm_head, tree_size=20, topk=4)
    static = GraphEagleProposer.from_head(loaded, embed, lm_head, tree_size=20, topk=4, max_depth=4, max_length=256,
                                          query_buckets=(1, 4, 16))
    for steps in _contexts(smollm2, ["def square(x):\n    return"], [42, 77, 1001, 5, 9, 300]):
        for ctx in steps:
            a, b = ref.propose(ctx, 4), static.propose(ctx, 4)
            assert b.tokens.tolist() == a.tokens.tolist() and b.parents.tolist() == a.parents.tolist()
            assert a.k and all(t % 3 == 0 for t in a.tokens.tolist())


def test_eagle_tree_shape(smollm2):
    head, _ = eagle.load(None, smollm2)
    embed, lm_head = smollm2.model.get_input_embeddings(), smollm2.model.get_output_embeddings()
    proposer = EagleProposer.from_head(head, embed, lm_head, tree_size=20, topk=4)
    ids = smollm2.tokenizer("def square(x):\n    return")["input_ids"]
    with torch.no_grad():
        hidden = smollm2.model.model(torch.tensor([ids[:-1]])).last_hidden_state[0]
    ctx = Context(token_ids=list(ids), prompt_len=len(ids), params=SamplingParams(), target_hidden=hidden)
    draft = proposer.propose(ctx, 5)
    assert draft.k == 20 and draft.depth <= 5
    assert all(p < i for i, p in enumerate(draft.parents.tolist()))
    siblings = {}
    for i, p in enumerate(draft.parents.tolist()):
        assert draft.tokens[i].item() not in siblings.setdefault(p, set())  # no duplicate children
        siblings[p].add(draft.tokens[i].item())
    # the chain of top-1 guesses is the tree's first path
    chain = EagleProposer.from_head(head, embed, lm_head, tree_size=0).propose(ctx, 3).tokens.tolist()
    assert draft.tokens[0].item() == chain[0]


def test_default_tree_size_follows_the_runner():
    """Chains on an eager CPU runner (every verified token costs there), trees on a GPU, the compiled runner's
    verify bucket filled, and an explicit size always wins."""
    from specdeploy.runtime.head_proposers import default_tree_size

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    for method in ("medusa", "eagle", "multi", "specinfer"):
        assert default_tree_size(SpecConfig(method=method), cpu, compiled=False) == 0
        assert default_tree_size(SpecConfig(method=method, tree_size=12), cpu, compiled=False) == 12
        assert default_tree_size(SpecConfig(method=method, tree_size=0), gpu, compiled=True) == 0
    assert default_tree_size(SpecConfig(method="medusa"), gpu, compiled=False) is None  # the artifact's tree
    assert default_tree_size(SpecConfig(method="medusa"), gpu, compiled=True) is None
    assert default_tree_size(SpecConfig(method="eagle"), gpu, compiled=False) == 48
    for device in (cpu, gpu):  # the compiled runner runs on a CPU under test: its bucket decides there too
        assert default_tree_size(SpecConfig(method="eagle", k=4), device, compiled=True) == 63
        assert default_tree_size(SpecConfig(method="specinfer", k=4), device, compiled=True) == 59


def test_eager_cpu_heads_draft_chains(smollm2):
    """With no tree size given, the head methods draft chains on this CPU runner."""
    assert SpecEngine(smollm2, SpecConfig(method="eagle", k=3)).proposer.tree_size == 0
    assert SpecEngine(smollm2, SpecConfig(method="medusa", k=3)).proposer.tree is None
    assert SpecEngine(smollm2, SpecConfig(method="eagle", k=3, tree_size=20)).proposer.tree_size == 20


def test_vllm_style_config_for_trained_methods():
    s = SpecConfig.from_vllm({"method": "eagle", "model": "/drafts/eagle", "num_speculative_tokens": 5})
    assert (s.method, s.draft, s.k, s.tree_size) == ("eagle", "/drafts/eagle", 5, None)
    with pytest.raises(SpecDeployError, match="tree_size"):
        SpecConfig(method="eagle", tree_size=-1)


def _contexts(smollm2, texts, extra):
    """Contexts as the loop builds them: a prompt, then committed tokens appended (target hidden states too)."""
    for text in texts:
        ids = smollm2.tokenizer(text)["input_ids"]
        with torch.no_grad():
            hidden = smollm2.model.model(torch.tensor([ids + extra])).last_hidden_state[0]
        yield [Context(token_ids=ids + extra[:n], prompt_len=len(ids), params=SamplingParams(),
                       target_hidden=hidden[: len(ids) + n - 1]) for n in (0, 0, 2, 3, len(extra))]


@pytest.mark.parametrize("tree_size, topk, depth", [(48, 8, 6), (20, 4, 5), (10, 3, 2), (48, 8, 1)])
def test_graph_eagle_drafts_the_same_trees(smollm2, tree_size, topk, depth):
    """The static-cache EAGLE drafter (the code CUDA graphs capture, run eagerly) proposes the very trees
    of EagleProposer: after a prompt (chunked into query buckets), again without a commit, after commits."""
    from specdeploy.runtime.eagle_graphs import GraphEagleProposer

    head, _ = eagle.load(None, smollm2)
    embed, lm_head = smollm2.model.get_input_embeddings(), smollm2.model.get_output_embeddings()
    ref = EagleProposer.from_head(head, embed, lm_head, tree_size=tree_size, topk=topk)
    static = GraphEagleProposer.from_head(head, embed, lm_head, tree_size=tree_size, topk=topk, max_depth=depth,
                                          max_length=256, query_buckets=(1, 4, 16))
    texts = ["def square(x):\n    return", "SELECT country, COUNT(*) AS n FROM users WHERE active = 1 GROUP BY country "
             "ORDER BY n DESC LIMIT 10; -- the ten countries with the most active users, then"]
    for steps in _contexts(smollm2, texts, [42, 77, 1001, 5, 9, 300]):
        ref.reset()
        static.reset()
        for i, ctx in enumerate(steps):
            k = (depth, depth, max(1, depth - 1), 1, depth)[i]
            a, b = ref.propose(ctx, k), static.propose(ctx, k)
            assert b.tokens.tolist() == a.tokens.tolist() and b.parents.tolist() == a.parents.tolist(), (i, k)
    assert static.max_nodes == tree_size and static.propose(steps[-1], depth + 3).depth <= depth


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("depth", [4, 1])
def test_graph_eagle_replay_matches_eager_on_cuda(depth):
    """Each drafting step replayed as a CUDA graph gives the trees of the same steps run eagerly."""
    from specdeploy.runtime.eagle_graphs import GraphEagleProposer
    from test_cuda_runner import tiny_llama

    model = tiny_llama().to("cuda")
    torch.manual_seed(1)
    head = eagle.EagleHead(eagle.EagleConfig.from_target(model.config)).to("cuda").eval()
    embed, lm_head = model.get_input_embeddings(), model.get_output_embeddings()
    kw = dict(tree_size=12, topk=3, max_depth=depth, max_length=64, query_buckets=(1, 4, 16))
    graphed = GraphEagleProposer.from_head(head, embed, lm_head, **kw)
    eager = GraphEagleProposer.from_head(head, embed, lm_head, use_graphs=False, **kw)
    assert graphed.num_graphs > 0
    ids = torch.randint(1, 64, (30,)).tolist()
    with torch.no_grad():
        hidden = model.model(torch.tensor([ids], device="cuda")).last_hidden_state[0]
    for n, k in ((20, 4), (20, 3), (23, 1), (30, 4)):
        ctx = Context(token_ids=ids[:n], prompt_len=20, params=SamplingParams(), target_hidden=hidden[: n - 1])
        a, b = graphed.propose(ctx, k), eager.propose(ctx, k)
        assert a.tokens.tolist() == b.tokens.tolist() and a.parents.tolist() == b.parents.tolist()


@pytest.mark.parametrize("temperature", [0.0, 0.7], ids=["greedy", "sampled"])
def test_graph_eagle_drafts_ahead_the_trees_it_would_draft(smollm2, temperature):
    """EAGLE trees drafted ahead from the verdict still on the device (`draft_ahead`: padded sync, device
    count) are the trees `propose` drafts from the committed context; the loop uses them."""
    from specdeploy.runtime import kernels
    from specdeploy.runtime.cuda_runner import compiled_for

    if not kernels.available(smollm2.model.device):  # CPU tensors on a CUDA machine: no interpreter there
        pytest.skip("the device verdict's kernel cannot run here (CPU without Triton's interpreter)")

    spec = SpecConfig(method="eagle", k=4, tree_size=48)
    runner, proposer = compiled_for(spec, smollm2, max_length=256)
    _, ref = compiled_for(spec, smollm2, max_length=256)
    proposer.capture_all()  # on CPU no graph is captured; the verdict kernel's variants run once (warm_tree_accept)
    seen = {"ahead": 0, "drafts": 0}
    propose, reset = proposer.propose, proposer.reset

    def checked(ctx, k):
        ahead = proposer._ahead[3] if proposer._ahead is not None else None
        got, want = propose(ctx, k), ref.propose(ctx, k)
        assert got.tokens.tolist() == want.tokens.tolist() and got.parents.tolist() == want.parents.tolist()
        seen["ahead"] += got is ahead
        seen["drafts"] += 1
        return got

    proposer.propose = checked
    proposer.reset = lambda: (reset(), ref.reset())
    engine = SpecEngine(smollm2, spec, runner=runner, proposer=proposer)
    prompts = ("Write a Python function that returns the square of a number.", "What is 12 + 7?")
    for prompt in prompts[: 2 if temperature == 0 else 1]:
        engine.generate_ids(engine.encode(prompt, max_new_tokens=24),
                            SamplingParams(temperature=temperature, seed=0, max_new_tokens=24))
    assert seen["ahead"] >= seen["drafts"] / 2, seen  # a request's first draft and those near its end are not
