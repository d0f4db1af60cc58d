"""The compiled runner's logic on CPU (eager): lean forward vs HF, buckets, static-cache rollback,
greedy equality through `speculative_generate`. CUDA-graph parts run only where CUDA exists."""
from __future__ import annotations

import gc

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specdeploy.config import SamplingParams
from specdeploy.models.layerskip import layerskip_model
from specdeploy.runtime.cuda_runner import (CapturedFn, CudaGraphRunner, LeanLlama, attention, bucket, kv_buckets_for,
                                            no_collection)
from specdeploy.runtime.loop import StopCondition, speculative_generate
from specdeploy.runtime.proposers import DraftModelProposer, NGramProposer, NoProposer
from specdeploy.runtime.runner import Runner, TorchRunner

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def tiny_llama(layers: int = 3, seed: int = 0) -> LlamaForCausalLM:
    """A random Llama with GQA whose greedy output is varied (not one repeated token)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, initializer_range=0.3)
    return LlamaForCausalLM(cfg).eval()


def test_buckets():
    assert bucket(1, (1, 2, 4)) == 1 and bucket(3, (1, 2, 4)) == 4
    with pytest.raises(ValueError):
        bucket(5, (1, 2, 4))
    assert kv_buckets_for(641) == (256, 512, 641)
    assert kv_buckets_for(200) == (200,)


def test_no_collection_pauses_the_collector_and_restores_it():
    """Captures run with the cyclic collector paused (a dropped engine's graph freed mid-capture breaks the
    capture), and leave it as they found it: on, off, and after an exception."""
    assert gc.isenabled()
    with no_collection():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), no_collection():
        raise RuntimeError("capture failed")
    assert gc.isenabled()
    gc.disable()
    try:
        with no_collection():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


@needs_cuda
def test_capture_runs_with_the_collector_paused_beside_dead_graphs():
    """A graph captured while an engine's graphs lie in a dead reference cycle: the collector is off during
    the capture itself (not the warm-up), the capture succeeds, and a later pass frees the dead graphs."""
    class Owner:
        pass

    def dead_owner() -> None:
        owner, x = Owner(), torch.zeros(4, device="cuda")
        owner.fn, owner.me = CapturedFn(lambda: x.add_(1), True), owner  # a cycle: only a collection frees it
        assert owner.fn.graph is not None

    dead_owner()
    y, seen = torch.zeros(4, device="cuda"), []

    def fn():
        if torch.cuda.is_current_stream_capturing():
            seen.append(gc.isenabled())
            _ = [[] for _ in range(4 * gc.get_threshold()[0])]  # allocations that would start a collection
        return y.add_(1)

    captured = CapturedFn(fn, True)
    assert seen == [False] and gc.isenabled()
    assert captured.error is None and captured.graph is not None
    captured()
    torch.cuda.synchronize()
    assert y.tolist() == [3.0] * 4  # two warm-up runs, one replay
    gc.collect()


@pytest.mark.parametrize("rows", [1, 3])
def test_attention_matches_sdpa(rows):
    """The three-kernel attention (q pre-scaled, k/v as the cache's views of a longer cache) against SDPA."""
    torch.manual_seed(0)
    heads, m, keys, d = 3, 6, 20, 16
    kv = torch.randn(rows, heads, 2, keys + 7, d)  # one layer of the cache, 7 positions past kv_len
    k, v = kv[:, :, 0, :keys], kv[:, :, 1, :keys]
    q = torch.randn(rows, heads, m, d)
    allowed = torch.rand(rows, 1, m, keys) < 0.7
    allowed[..., 0] = True  # every query sees at least one key
    mask = torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf"))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(attention(q * d**-0.5, k, v, mask), ref, atol=1e-5, rtol=1e-5)


def test_lean_forward_matches_hf_logits():
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 11))
    with torch.no_grad():
        ref = model(ids).logits
    lean = LeanLlama.from_hf(model)
    cache = lean.new_cache(2, 32)
    pos = torch.arange(11).expand(2, 11)
    logits, hidden = lean.forward(cache, ids, pos, None, 32, want_hidden=True)
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        ref_hidden = model(ids, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(hidden, ref_hidden, atol=1e-4, rtol=1e-4)


def test_ragged_rows_and_row_subset():
    """Rows at different lengths in one forward, and a forward on one row of a batched cache."""
    model = tiny_llama()
    lean = LeanLlama.from_hf(model)
    a, b = torch.randint(0, 64, (9,)), torch.randint(0, 64, (5,))
    with torch.no_grad():
        ref_a, ref_b = model(a[None]).logits[0], model(b[None]).logits[0]
    cache = lean.new_cache(2, 32)
    # prefill each row alone (row subset path), all but the last 2 tokens
    lean.forward(cache, a[None, :7], torch.arange(7)[None], torch.tensor([0]), 32, logits="none")
    lean.forward(cache, b[None, :3], torch.arange(3)[None], torch.tensor([1]), 32, logits="none")
    # one step for both rows at their own positions
    tokens = torch.stack([a[7:9], b[3:5]])
    pos = torch.stack([torch.arange(7, 9), torch.arange(3, 5)])
    logits, _ = lean.forward(cache, tokens, pos, None, 32)
    torch.testing.assert_close(logits[0], ref_a[7:9], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[1], ref_b[3:5], atol=1e-4, rtol=1e-4)


def test_runner_protocol_chunks_padding_and_rollback():
    model = tiny_llama()
    runner = CudaGraphRunner.from_hf(model, max_length=200, query_buckets=(1, 4, 16))
    assert isinstance(runner, Runner)
    ids = torch.randint(0, 64, (40,))
    with torch.no_grad():
        ref = model(ids[None]).logits[0]
    step = runner.forward(ids)  # 40 tokens: chunks of 16, 16, 8 (padded to 16)
    torch.testing.assert_close(step.logits, ref, atol=1e-4, rtol=1e-4)
    assert runner.length == 40
    runner.rollback(25)  # a length update: the entries past 25 stay but are never read
    step = runner.forward(ids[25:28])  # 3 tokens, padded to 4
    torch.testing.assert_close(step.logits, ref[25:28], atol=1e-4, rtol=1e-4)
    runner.rollback(10)
    junk = torch.randint(0, 64, (6,))
    runner.forward(junk)  # overwrite positions 10..15 with other tokens, then roll back again
    runner.rollback(10)
    step = runner.forward(ids[10:12])
    torch.testing.assert_close(step.logits, ref[10:12], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError):
        runner.rollback(13)
    runner.reset()
    assert runner.length == 0
    with pytest.raises(ValueError):
        runner.forward(torch.zeros(201, dtype=torch.long))


def test_layerskip_draft_shares_target_weights():
    model = tiny_llama(layers=4)
    lean = LeanLlama.from_hf(model)
    draft = lean.truncated(2)
    assert draft.num_layers == 2 and draft.layers[0].wqkv is lean.layers[0].wqkv
    # the HF layerskip model's lean form reuses the same fused tensors (no second copy)
    shallow = LeanLlama.from_hf(layerskip_model(model, 2))
    assert shallow.layers[1].w_gate_up is lean.layers[1].w_gate_up
    ids = torch.randint(0, 64, (7,))
    with torch.no_grad():
        ref = layerskip_model(model, 2)(ids[None]).logits[0]
    logits, _ = draft.forward(draft.new_cache(1, 16), ids[None], torch.arange(7)[None], None, 16)
    torch.testing.assert_close(logits[0], ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["ngram", "layerskip", "full-draft"])
def test_greedy_through_loop_equals_plain(method):
    """Lossless: the compiled runner under speculative_generate gives the HF model's plain greedy output."""
    model = tiny_llama()
    lean = LeanLlama.from_hf(model)
    params = SamplingParams(max_new_tokens=40)
    stop = StopCondition(frozenset([0]), 40)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        prompt = torch.randint(1, 64, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
        ref = speculative_generate(TorchRunner(model), NoProposer(), prompt, params, stop, k=0).token_ids
        target = CudaGraphRunner(lean, max_length=128)
        if method == "ngram":
            proposer = NGramProposer()
        else:
            proposer = DraftModelProposer(CudaGraphRunner(lean if method == "full-draft" else lean.truncated(1), max_length=128))
        out = speculative_generate(target, proposer, prompt, params, stop, k=4)
        assert out.token_ids == ref
        if method == "full-draft":
            assert out.stats.alpha == 1.0  # the draft IS the target: every draft token accepted


def test_staged_forward_and_gather_path_match_forward_and_keep_path():
    """`stage` + `forward_staged` scores what `forward` scores, and `gather_path` (positions on the device,
    padded past the path) + `rollback` keeps what `keep_path` keeps; any other forward drops a staged one."""
    model = tiny_llama()
    lean = LeanLlama.from_hf(model)
    plain, staged = (CudaGraphRunner(lean, max_length=128, query_buckets=(1, 4, 16), output_hidden=True)
                     for _ in range(2))
    ids = torch.randint(1, 64, (9,))
    plain.forward(ids)
    staged.forward(ids)
    parents = torch.tensor([-1, 0, 0, 1, 3, 2])
    feed = torch.randint(1, 64, (6,))
    a = plain.forward(feed, tree_parents=parents)
    staged.stage(feed, parents)
    b = staged.forward_staged()
    torch.testing.assert_close(b.logits, a.logits)
    torch.testing.assert_close(b.hidden, a.hidden)
    path = [1, 3, 4]  # nodes 0, 2, 3 of the tree behind the pending token (entry 9)
    plain.keep_path(10, [9 + i for i in path])
    staged.gather_path(10, torch.tensor([9 + i for i in path] + [9, 9]))  # two padding rows
    staged.rollback(10 + len(path))
    chain = torch.randint(1, 64, (3,))
    a = plain.forward(chain)
    staged.stage(chain)
    b = staged.forward_staged()
    torch.testing.assert_close(b.logits, a.logits)
    assert staged.length == plain.length == 16
    staged.stage(chain)
    staged.forward(chain[:1])
    with pytest.raises(RuntimeError, match="nothing staged"):
        staged.forward_staged()
    with pytest.raises(ValueError):
        staged.stage(torch.zeros(17, dtype=torch.long))


def test_plain_steps_run_staged_and_a_stop_string_undoes_the_launched_one():
    """Plain decoding through the compiled runner: where the device verdict's kernel runs, every step
    after the first is launched from staged inputs; a stop string that ends the request after the next
    step was launched leaves the cache holding the committed tokens but the last, as always."""
    from specdeploy.runtime import kernels

    model = tiny_llama()
    target = CudaGraphRunner(LeanLlama.from_hf(model), max_length=128)
    prompt = [5, 9, 3, 17]
    params = SamplingParams(max_new_tokens=24)
    ref = speculative_generate(TorchRunner(model), NoProposer(), prompt, params, StopCondition(frozenset(), 24), k=0)
    calls = {"staged": 0}
    forward_staged = target.forward_staged

    def counted():
        calls["staged"] += 1
        return forward_staged()

    target.forward_staged = counted
    out = speculative_generate(target, NoProposer(), prompt, params, StopCondition(frozenset(), 24), k=0)
    assert out.token_ids == ref.token_ids
    if kernels.available(target.device):
        assert calls["staged"] == out.stats.target_forwards - 1
    text = "".join(chr(65 + t % 26) for t in ref.token_ids)
    cut = text[5:8]
    stop = StopCondition(frozenset(), 24, stop_strings=(cut,), decode=lambda ids: "".join(chr(65 + t % 26) for t in ids))
    out = speculative_generate(target, NoProposer(), prompt, params, stop, k=0)
    assert out.finish_reason == "stop" and out.token_ids == ref.token_ids[: text.index(cut) + len(cut)]
    assert target.length == len(prompt) + len(out.token_ids) - 1


def test_smollm2_compiled_runner_matches_hf(smollm2):
    """The embedded model: logits against HF's in fp32, and greedy through the loop."""
    tok, model = smollm2.tokenizer, smollm2.model
    ids = tok("def fibonacci(n):\n    if n < 2:\n        return n", return_tensors="pt")["input_ids"][0]
    with torch.no_grad():
        ref = model(ids[None]).logits[0]
    runner = CudaGraphRunner.from_hf(model, max_length=256)
    torch.testing.assert_close(runner.forward(ids).logits, ref, atol=5e-4, rtol=1e-4)
    params = SamplingParams(max_new_tokens=12)
    stop = StopCondition(frozenset([2]), 12)
    plain = speculative_generate(TorchRunner(model), NoProposer(), ids.tolist(), params, stop, k=0).token_ids
    spec = speculative_generate(runner, NGramProposer(), ids.tolist(), params, stop, k=4).token_ids
    assert spec == plain


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replay_matches_eager(dtype):
    model = tiny_llama().to("cuda", dtype)
    lean = LeanLlama.from_hf(model)
    graphed = CudaGraphRunner(lean, max_length=128, query_buckets=(1, 4, 16))
    eager = CudaGraphRunner(lean, max_length=128, query_buckets=(1, 4, 16), use_graphs=False)
    assert graphed.num_graphs > 0
    ids = torch.randint(0, 64, (30,))
    for r in (graphed, eager):
        r.forward(ids[:20])
    for chunk in (ids[20:21], ids[21:25], ids[25:30]):
        a, b = graphed.forward(chunk).logits, eager.forward(chunk).logits
        torch.testing.assert_close(a, b, atol=0, rtol=0) if dtype == torch.float32 else torch.testing.assert_close(a, b)
    graphed.reset()
    with torch.no_grad():
        ref = model(ids[None].cuda()).logits[0].float()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    err = (graphed.forward(ids).logits - ref).norm() / ref.norm()
    assert err < tol


@needs_cuda
def test_cuda_graph_tree_replay_matches_eager():
    """Trees and keep_path through captured graphs: bit-equal to the same forward run eagerly (fp32)."""
    model = tiny_llama().to("cuda")
    lean = LeanLlama.from_hf(model)
    graphed = CudaGraphRunner(lean, max_length=128, query_buckets=(1, 4, 16), output_hidden=True)
    eager = CudaGraphRunner(lean, max_length=128, query_buckets=(1, 4, 16), use_graphs=False, output_hidden=True)
    ids = torch.randint(0, 64, (30,))
    parents = torch.tensor([-1, 0, 0, 1, 1, 2, 5])
    for r in (graphed, eager):
        r.forward(ids[:20])
    a, b = (r.forward(ids[20:27], tree_parents=parents) for r in (graphed, eager))
    torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)
    torch.testing.assert_close(a.hidden, b.hidden, atol=0, rtol=0)
    for r in (graphed, eager):
        r.keep_path(21, [22, 25, 26])  # the branch 0 -> 2 -> 5 -> 6
    a, b = (r.forward(ids[27:30]).logits for r in (graphed, eager))
    torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("method", ["ngram", "layerskip"])
def test_engine_with_compiled_runner_matches_eager_engine(smollm2, method):
    """What SpecEngine.load does on CUDA (compiled_for), run eagerly: same text as the eager engine."""
    from specdeploy.config import SpecConfig
    from specdeploy.runtime.cuda_runner import compiled_for
    from specdeploy.runtime.eagle_graphs import GraphEagleProposer
    from specdeploy.runtime.engine import SpecEngine
    from specdeploy.runtime.head_proposers import EagleProposer

    spec = SpecConfig(method=method, k=3)
    runner, proposer = compiled_for(spec, smollm2, max_length=256)
    assert isinstance(runner, CudaGraphRunner)
    compiled = SpecEngine(smollm2, spec, runner=runner, proposer=proposer)
    eager = SpecEngine(smollm2, SpecConfig(method="none"))
    params = SamplingParams(max_new_tokens=8)
    prompt = "List three prime numbers."
    assert compiled.generate(prompt, params).token_ids == eager.generate(prompt, params).token_ids
    runner, _ = compiled_for(SpecConfig(method="medusa"), smollm2, max_length=64)
    assert isinstance(runner, CudaGraphRunner) and runner.output_hidden and runner.supports_tree
    runner, proposer = compiled_for(SpecConfig(method="eagle", k=3, tree_size=200), smollm2, max_length=64)
    assert runner.query_buckets[-1] == 256  # the pending token + 200 nodes fit one query bucket
    assert isinstance(proposer, GraphEagleProposer) and proposer.max_length == runner.max_length == 64
    _, proposer = compiled_for(SpecConfig(method="multi", k=3), smollm2, max_length=64)
    assert isinstance(proposer.model, GraphEagleProposer)
    runner, proposer = compiled_for(SpecConfig(method="specinfer", k=3), smollm2, max_length=64)
    assert isinstance(proposer.proposers[1], GraphEagleProposer) and proposer.max_nodes == 63
    assert bucket(1 + proposer.max_nodes, runner.query_buckets) == 1 + proposer.max_nodes  # the default tree fills a bucket
    _, proposer = compiled_for(SpecConfig(method="eagle", k=3, tree_size=0), smollm2, max_length=64)
    assert isinstance(proposer, EagleProposer)  # chains stay eager


def _branch(parents: list[int], leaf: int) -> list[int]:
    """Feed indices from the first child of the pending token (index 0) down to `leaf`."""
    out = []
    while leaf > 0:
        out.append(leaf)
        leaf = parents[leaf]
    return out[::-1]


def test_tree_forward_and_keep_path_match_torch_runner(smollm2):
    """Token trees through the static-cache forward (same code as the graphs, run eagerly): logits and
    hidden states as TorchRunner's tree attention; keep_path then a chain as HF on the kept sequence."""
    tok, model = smollm2.tokenizer, smollm2.model
    ids = tok("SELECT country, COUNT(*) FROM users", return_tensors="pt")["input_ids"][0]
    eager = TorchRunner(model, output_hidden=True)
    lean = CudaGraphRunner.from_hf(model, max_length=256, query_buckets=(1, 4, 16), output_hidden=True)
    assert lean.supports_tree and not lean.use_graphs
    for r in (eager, lean):
        r.forward(ids)
    g = torch.Generator().manual_seed(0)
    kept = ids.tolist()
    for n, leaf in ((11, 10), (6, 4), (13, 12)):  # trees padded to the 16 bucket, then to the 16 / 4 ... buckets
        parents = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, n)]
        feed = torch.randint(0, 1000, (n,), generator=g)
        a = eager.forward(feed, tree_parents=torch.tensor(parents))
        b = lean.forward(feed, tree_parents=torch.tensor(parents))
        torch.testing.assert_close(b.logits, a.logits, atol=5e-4, rtol=1e-4)
        torch.testing.assert_close(b.hidden, a.hidden, atol=1e-4, rtol=1e-4)
        base = lean.length - n
        path = _branch(parents, leaf)
        for r in (eager, lean):
            r.keep_path(base + 1, [base + i for i in path])
        kept += [int(feed[0])] + feed[path].tolist()
        assert lean.length == eager.length == len(kept)
        chain = torch.randint(0, 1000, (3,), generator=g)  # a chain after a tree: causal ancestry again
        b = lean.forward(chain)
        kept += chain.tolist()
        with torch.no_grad():
            ref = model(torch.tensor([kept])).logits[0, -3:]
        torch.testing.assert_close(b.logits, ref, atol=5e-4, rtol=1e-4)
        eager.forward(chain)
    with pytest.raises(ValueError):
        lean.keep_path(lean.length - 2, [lean.length - 3])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned copies to a GPU")
def test_ids_on_keeps_every_copy_while_the_gpu_is_busy():
    """`ids_on` reuses a ring of pinned rows: a row is rewritten only after its copy ran, so copies queued
    behind slow GPU work (more of them than the ring has rows) still carry their own ids."""
    from specdeploy.runtime.runner import ids_on

    x = torch.randn(2048, 2048, device="cuda")
    outs = []
    for j in range(300):
        if j % 40 == 0:
            for _ in range(20):
                x = (x @ x).clamp_(-1, 1)  # GPU work the copies queue behind
        outs.append((j, ids_on("cuda", [j, j + 1, 2 * j] * (1 + j % 5))))
    assert all(t.tolist() == [j, j + 1, 2 * j] * (1 + j % 5) for j, t in outs)
    assert ids_on("cuda", list(range(1000))).tolist() == list(range(1000))  # over a row: a fresh pinned tensor


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_verdict_and_draft_ahead_queue_no_host_sync():
    """On CUDA a verdict (greedy, or sampled over point-mass tokens) is decided and copied out, and the
    next EAGLE tree drafted from it, without one host sync (torch's sync debug mode raises on any); the
    verdicts equal `verify`'s on the CPU from the same draws."""
    from specdeploy.models import eagle
    from specdeploy.runtime.eagle_graphs import GraphEagleProposer
    from specdeploy.runtime.types import Context, Draft
    from specdeploy.runtime.verify import DeviceVerdict, verify

    model = tiny_llama().to("cuda")
    torch.manual_seed(2)
    head = eagle.EagleHead(eagle.EagleConfig.from_target(model.config)).to("cuda").eval()
    proposer = GraphEagleProposer.from_head(head, model.get_input_embeddings(), model.get_output_embeddings(),
                                            tree_size=12, topk=3, max_depth=4, max_length=64, query_buckets=(1, 4, 16))
    ids = torch.randint(1, 64, (30,)).tolist()
    with torch.no_grad():
        hidden = model.model(torch.tensor([ids], device="cuda")).last_hidden_state[0]
    ctx = Context(token_ids=ids[:20], prompt_len=20, params=SamplingParams(), target_hidden=hidden[:19])
    tree = proposer.propose(ctx, 4)
    logits = torch.randn(tree.k + 1, model.config.vocab_size, device="cuda")
    logits[1:, :].index_fill_(1, tree.tokens, 0.0)
    logits[0, tree.tokens[0]] = 1e3  # the first node is accepted
    step_hidden = torch.randn(tree.k + 1, hidden.shape[-1], device="cuda", dtype=hidden.dtype)
    chain = Draft(tree.tokens[:3])
    greedy, sampled = SamplingParams(), SamplingParams(temperature=0.8)
    cases = [(tree, logits, greedy), (chain, logits[:4], greedy), (tree, logits, sampled), (chain, logits[:4], sampled)]
    for d, lg, p in cases:  # the kernels compiled before the check
        DeviceVerdict(d, lg, p, torch.Generator("cuda").manual_seed(0)).verdict()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        accepts = [DeviceVerdict(d, lg, p, torch.Generator("cuda").manual_seed(i)) for i, (d, lg, p) in enumerate(cases)]
        proposer.draft_ahead(ctx, step_hidden, accepts[0], 4)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for i, ((d, lg, p), a) in enumerate(zip(cases, accepts)):
        assert a.verdict() == verify(d, lg, p, torch.Generator("cuda").manual_seed(i)), i
    assert accepts[0].verdict().num_accepted >= 1 and proposer._ahead is not None
