"""Batched speculation on CPU (eager): the GPU-side acceptance rule and n-gram lookup equal their
host versions, ragged batches with joins and leaves give each request's solo output, stats match
the loop's, and the speculation switch (with the draft's catch-up) stays lossless."""
from __future__ import annotations

import pytest
import torch

from specdeploy.config import SamplingParams
from specdeploy.errors import SpecDeployError
from specdeploy.models.eagle import EagleConfig, EagleHead
from specdeploy.runtime.batch import BatchRequest, BatchSpeculator, greedy_accept_batch, ngram_propose_batch
from specdeploy.runtime.cuda_runner import CudaGraphRunner, LeanLlama
from specdeploy.runtime.head_proposers import EagleProposer
from specdeploy.runtime.loop import StopCondition, speculative_generate
from specdeploy.runtime.proposers import NGramProposer, NoProposer
from specdeploy.runtime.runner import TorchRunner
from specdeploy.runtime.types import Context, Draft
from specdeploy.runtime.verify import verify
from conftest import AlternatingSwitch
from test_cuda_runner import needs_cuda, tiny_llama

GREEDY = SamplingParams()


def _prompts(n: int, seed: int = 1, vocab: int = 64) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]


def test_greedy_accept_batch_equals_verify():
    g = torch.Generator().manual_seed(0)
    for k in (0, 1, 4):
        B, V = 64, 5  # a small vocabulary, so that drafts often match
        logits = torch.randn(B, k + 1, V, generator=g)
        target_tokens = logits.argmax(-1)
        draft = torch.randint(0, V, (B, k), generator=g)
        draft = torch.where(torch.rand(B, k, generator=g) < 0.6, target_tokens[:, :k], draft)
        lens = torch.randint(0, k + 1, (B,), generator=g)
        n, nxt = greedy_accept_batch(draft, lens, target_tokens)
        for b in range(B):
            L = int(lens[b])
            verdict = verify(Draft(tokens=draft[b, :L]), logits[b, : L + 1], GREEDY)
            assert (int(n[b]), int(nxt[b])) == (verdict.num_accepted, verdict.next_token)


def test_ngram_batch_equals_ngram_proposer():
    g = torch.Generator().manual_seed(0)
    P, k = 48, 4
    for min_n, max_n in ((1, 4), (2, 3)):
        ref = NGramProposer(min_n, max_n)
        hists, lasts, caps, expect = [], [], [], []
        for _ in range(200):
            length = int(torch.randint(1, P - 2, (1,), generator=g))
            ids = torch.randint(0, 4, (length,), generator=g).tolist()  # 4 symbols: many repeats
            cap = int(torch.randint(0, k + 1, (1,), generator=g))
            d = ref.propose(Context(token_ids=ids, prompt_len=1, params=GREEDY), cap).tokens.tolist() if cap else []
            hists.append(ids + [7] * (P - length))  # junk past the last committed token
            lasts.append(length - 1)
            caps.append(cap)
            expect.append(d)
        draft, lens = ngram_propose_batch(torch.tensor(hists), torch.tensor(lasts), torch.tensor(caps), k, min_n, max_n)
        for b, d in enumerate(expect):
            assert draft[b, : int(lens[b])].tolist() == d


def _solo_plain(model, prompts, max_new):
    stop = StopCondition(frozenset([0]), max_new)
    return [speculative_generate(TorchRunner(model), NoProposer(), p, SamplingParams(max_new_tokens=max_new), stop, k=0)
            for p in prompts]


def tiny_eagle_head(model) -> EagleHead:
    """The target's last layer as an EAGLE head, whole: EAGLE's own initialisation zeroes its attention
    and MLP outputs, and a head that ignores its cache would not test what the engine feeds it."""
    torch.manual_seed(1)
    head = EagleHead.init_from_target(model)
    last = {k: v for k, v in model.model.layers[-1].state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
    head.layer.load_state_dict(last)
    return head.eval()


@pytest.mark.parametrize("method,draft_layers,batch", [
    ("none", None, 3), ("ngram", None, 1), ("ngram", None, 3), ("draft", 1, 3), ("draft", 3, 4), ("eagle", None, 1),
    ("eagle", None, 3)])
def test_batch_equals_each_request_alone(method, draft_layers, batch):
    """7 requests through 1..4 slots (joins and leaves between steps), EOS and length stops."""
    model = tiny_llama()
    lean = LeanLlama.from_hf(model)
    prompts = _prompts(7)
    max_new = [30, 5, 17, 30, 1, 22, 30]
    ref = [_solo_plain(model, [p], n)[0] for p, n in zip(prompts, max_new)]
    draft = lean.truncated(draft_layers) if draft_layers else None
    head = tiny_eagle_head(model) if method == "eagle" else None
    eng = BatchSpeculator(lean, method=method, draft=draft, head=head, k=4, max_batch=batch, max_length=96, eos_ids=[0])
    res = eng.run([BatchRequest(p, n, task=str(i)) for i, (p, n) in enumerate(zip(prompts, max_new))])
    for r, want in zip(res, ref):
        assert r.token_ids == want.token_ids and r.finish_reason == want.finish_reason
    if draft_layers == 3:  # the draft IS the target
        assert all(r.stats.alpha in (None, 1.0) for r in res)
    assert not eng.active.any() and all(s is None for s in eng.slots)


def test_batch_stats_equal_the_loop():
    """Same proposals, same acceptance counts as speculative_generate with NGramProposer."""
    model = tiny_llama()
    lean = LeanLlama.from_hf(model)
    prompts = _prompts(5, seed=3)
    stop = StopCondition(frozenset([0]), 40)
    loop = [speculative_generate(CudaGraphRunner(lean, max_length=96), NGramProposer(), p,
                                 SamplingParams(max_new_tokens=40), stop, k=3) for p in prompts]
    res = BatchSpeculator(lean, method="ngram", k=3, max_batch=2, max_length=96, eos_ids=[0]).run(
        [BatchRequest(p, 40) for p in prompts])
    for r, g in zip(res, loop):
        assert r.token_ids == g.token_ids
        a, b = r.stats, g.stats
        assert (a.proposed, a.accepted, a.target_forwards, a.emitted) == (b.proposed, b.accepted, b.target_forwards, b.emitted)
        assert a.accepted_at == b.accepted_at


@pytest.mark.parametrize("switch", [None, (2, 7), (60, 70)])  # (60, 70): plain steps after more than a catch-up pass of spec steps
def test_batch_eagle_drafts_what_the_loops_eagle_chain_drafts(switch, monkeypatch):
    """Batched EAGLE chains against `EagleProposer` (tree_size 0) in the loop, one request at a time:
    the same draft tokens at every step, so the head saw the same pairs (the window of committed
    pairs, the prefill and, with plain steps between, the catch-up from the kept features)."""
    model = tiny_llama()
    lean = LeanLlama.from_hf(model)
    head = tiny_eagle_head(model)
    prompts = _prompts(5, seed=3) + [[5]]  # and a one-token prompt: nothing to draft from at first
    n = 100  # over a catch-up pass (64): the catch-up must start where the head's committed pairs end
    stop = StopCondition(frozenset(), n)  # no EOS: every request runs n tokens
    loop_switch = AlternatingSwitch(*switch) if switch else "on"
    proposer = EagleProposer.from_head(head, model.get_input_embeddings(), model.get_output_embeddings(), tree_size=0)
    loop, loop_drafts = [], []
    real_propose = proposer.propose
    monkeypatch.setattr(proposer, "propose", lambda ctx, k: (d := real_propose(ctx, k), loop_drafts.append(d.tokens.tolist()))[0])
    for p in prompts:
        proposer.reset()
        loop.append(speculative_generate(CudaGraphRunner(lean, max_length=160, output_hidden=True), proposer, p,
                                         SamplingParams(max_new_tokens=n), stop, k=3, switch=loop_switch))
    eng = BatchSpeculator(lean, method="eagle", head=head, k=3, max_batch=1, max_length=160)
    if switch:
        eng.switch = AlternatingSwitch(*switch)
    drafts = []
    real_eagle = eng._propose_eagle
    monkeypatch.setattr(eng, "_propose_eagle", lambda caps, kv: (
        d := real_eagle(caps, kv), drafts.append(d[0][0, : int(d[1][0])].tolist()))[0])
    res = eng.run([BatchRequest(p, n) for p in prompts])
    for r, g in zip(res, loop):
        assert r.token_ids == g.token_ids
        a, b = r.stats, g.stats
        assert (a.proposed, a.accepted, a.target_forwards, a.accepted_at) == (b.proposed, b.accepted, b.target_forwards, b.accepted_at)
    assert [d for d in drafts if d] == [d for d in loop_drafts if d] and len(drafts) > 20
    if switch:
        assert eng.switch.plain_steps > 0


def test_switching_speculation_off_and_on_stays_lossless():
    model = tiny_llama()
    lean = LeanLlama.from_hf(model)
    prompts = _prompts(5, seed=5)
    ref = _solo_plain(model, prompts, 45)
    eng = BatchSpeculator(lean, method="draft", draft=lean, k=4, max_batch=3, max_length=96, eos_ids=[0])
    eng.switch = AlternatingSwitch(2, 7)  # exercises the draft's catch-up after plain steps
    res = eng.run([BatchRequest(p, 45) for p in prompts])
    assert [r.token_ids for r in res] == [g.token_ids for g in ref]
    # a full-depth draft only misses if its cache missed the tokens of plain steps
    assert all(r.stats.alpha in (None, 1.0) for r in res)
    assert eng.switch.plain_steps > 0 and eng.switch.spec_steps > 0
    # each request counts the plain steps it took part in
    assert 0 < sum(r.stats.switched_off for r in res) <= eng.switch.plain_steps * 3
    assert all(r.stats.switched_off < r.stats.target_forwards for r in res)


def test_a_draft_joining_during_plain_steps_catches_up_over_its_prompt(monkeypatch):
    """Prompts that join while the switch decodes plain are not prefilled into the draft's cache; the
    catch-up before the next spec step feeds them. A draft that is the target accepts every token only
    if that catch-up covered each prompt whole."""
    model = tiny_llama()
    lean = LeanLlama.from_hf(model)
    prompts = [(p * 100)[: 70 + 7 * i] for i, p in enumerate(_prompts(6, seed=11))]  # each longer than a catch-up pass
    ref = _solo_plain(model, prompts, 20)
    eng = BatchSpeculator(lean, method="draft", draft=lean, k=3, max_batch=2, max_length=160, eos_ids=[0])
    eng.switch = AlternatingSwitch(2, 9)
    prefills = []
    real = eng._prefill_fn
    monkeypatch.setattr(eng, "_prefill_fn", lambda q, kv, draft: (prefills.append(draft), real(q, kv, draft))[1])
    res = eng.run([BatchRequest(p, 20) for p in prompts])
    assert [r.token_ids for r in res] == [g.token_ids for g in ref]
    assert all(r.stats.alpha in (None, 1.0) for r in res) and sum(r.stats.proposed for r in res) > 0
    assert True in prefills and prefills.count(False) > prefills.count(True)  # some joins deferred


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("method", ["draft", "eagle"])
def test_every_step_reads_exactly_the_keys_it_needs(overlap, method):
    """With a KV bucket of every length, each step reads only as many cache positions as its margin says:
    one too few and a slot would not see its own key. Plain and spec steps, the drafter's catch-up, joins
    and leaves, and (forced on CPU, where the device state is always ahead of the host) the step in flight."""
    model = tiny_llama()
    lean = LeanLlama.from_hf(model)
    prompts = _prompts(5, seed=7)
    ref = _solo_plain(model, prompts, 45)
    drafter = dict(draft=lean.truncated(1)) if method == "draft" else dict(head=tiny_eagle_head(model))
    eng = BatchSpeculator(lean, method=method, **drafter, k=3, max_batch=3, max_length=96, eos_ids=[0])
    eng.kv_buckets, eng.overlap = tuple(range(1, eng.positions + 1)), overlap
    eng.switch = AlternatingSwitch(2, 5)
    res = eng.run([BatchRequest(p, 45) for p in prompts])
    assert [r.token_ids for r in res] == [g.token_ids for g in ref]
    assert eng.switch.plain_steps > 0 and eng.switch.spec_steps > 0


def test_the_drafts_catch_up_is_timed_with_the_spec_step_that_needs_it(monkeypatch):
    """After plain steps the draft model catches up before the next spec step; the switch must be
    charged for it, or it sees speculation as cheaper than it is."""
    import time

    model = tiny_llama()
    lean = LeanLlama.from_hf(model)
    eng = BatchSpeculator(lean, method="draft", draft=lean, k=2, max_batch=2, max_length=96, eos_ids=[0])
    eng.switch = AlternatingSwitch(1, 4)
    times: list[tuple[bool, float]] = []
    real_record = eng.switch.record
    monkeypatch.setattr(eng.switch, "record", lambda spec, tok, sec, slots=1: (times.append((spec, sec)), real_record(spec, tok, sec, slots)))
    real_catchup = eng._catchup_fn

    def slow_catchup(kv):
        fn = real_catchup(kv)
        return lambda: (time.sleep(0.2), fn())  # far above a tiny model's plain step, even on a loaded CPU

    monkeypatch.setattr(eng, "_catchup_fn", slow_catchup)
    eng.run([BatchRequest(p, 30) for p in _prompts(2, seed=3)])
    after_plain = [sec for (spec, sec), (prev, _) in zip(times[1:], times) if spec and not prev]
    assert after_plain and min(after_plain) >= 0.2
    assert all(sec < 0.2 for spec, sec in times if not spec)


@pytest.mark.parametrize("bad, needle", [
    (BatchRequest(list(range(1, 20)), 20), "max_length"), (BatchRequest([], 4), "empty prompt"),
    (BatchRequest([3, 64], 4), "token ids"), (BatchRequest([3], 0), "max_new_tokens"),
    (BatchRequest([3], 4, stop_strings=("x",)), "decode")])
def test_batch_refuses_a_bad_request_before_running_any(bad, needle):
    lean = LeanLlama.from_hf(tiny_llama())  # vocabulary of 64
    eng = BatchSpeculator(lean, method="ngram", k=4, max_batch=2, max_length=32)
    with pytest.raises(SpecDeployError, match=needle):
        eng.run([BatchRequest([1, 2, 3], 4), bad])
    assert eng.steps == 0 and not eng.active.any() and all(s is None for s in eng.slots)
    assert len(eng.run([BatchRequest([1, 2, 3], 4)])[0].token_ids) == 4  # and it serves the next call


@pytest.mark.parametrize("method", ["ngram", "eagle"])
def test_smollm2_batch_equals_plain(smollm2, method):
    """The real target (float32) and, for eagle, its shipped head: each request's output is plain greedy's."""
    from specdeploy.models import eagle

    tok = smollm2.tokenizer
    texts = ["Write a SQL query that lists customers by total spend.", "Translate 'good morning' to French.",
             "def fibonacci(n):"]
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False),
                   add_special_tokens=False)["input_ids"] for t in texts]
    stop = StopCondition(frozenset([2]), 24)
    ref = [speculative_generate(TorchRunner(smollm2.model), NoProposer(), p, SamplingParams(max_new_tokens=24), stop, k=0)
           for p in prompts]
    lean = LeanLlama.from_hf(smollm2.model)
    head = eagle.load(None, smollm2)[0] if method == "eagle" else None
    res = BatchSpeculator(lean, method=method, head=head, k=4, max_batch=2, max_length=256, eos_ids=[2]).run(
        [BatchRequest(p, 24) for p in prompts])
    assert [r.token_ids for r in res] == [g.token_ids for g in ref]
    if method == "eagle":  # a trained head drafts what the target says, often
        assert sum(r.stats.accepted for r in res) / sum(r.stats.proposed for r in res) > 0.3


@needs_cuda
def test_cuda_batch_graphs_equal_eager():
    model = tiny_llama()
    head = tiny_eagle_head(model).to("cuda")
    lean = LeanLlama.from_hf(model.to("cuda"))
    prompts = _prompts(6, seed=7)
    reqs = [BatchRequest(p, 30) for p in prompts]
    for method, draft in (("ngram", None), ("draft", lean.truncated(1)), ("eagle", None)):
        kw = dict(method=method, draft=draft, head=head, k=4, max_batch=4, max_length=96, eos_ids=[0])
        graphed = BatchSpeculator(lean, **kw)
        eager = BatchSpeculator(lean, **kw, use_graphs=False)
        assert graphed.num_graphs > 0 and graphed.overlap
        assert [r.token_ids for r in graphed.run(reqs)] == [r.token_ids for r in eager.run(reqs)]
