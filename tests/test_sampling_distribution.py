"""Speculative sampling follows the target's distribution exactly (statistical tests).

A tiny bigram target whose sequence probabilities are known in closed form is sampled
through the real loop with a model draft and with an n-gram draft; a chi-square test
compares the empirical distribution of whole 3-token continuations with the exact one.
The companion test swaps in a deliberately wrong rule (resample from the target instead
of the residual after a rejection) and shows the same check rejects it. Seeds are fixed,
so these tests are deterministic.
"""
from __future__ import annotations

import copy
import itertools
from collections import Counter

import pytest
import torch

import specdeploy.runtime.loop as loop_module
from specdeploy.config import SamplingParams
from specdeploy.runtime.loop import StopCondition, speculative_generate
from specdeploy.runtime.proposers import DraftModelProposer, NGramProposer, Proposer
from specdeploy.runtime.types import Verdict
from specdeploy.runtime.verify import sampling_probs, verify
from table_runner import BigramRunner

VOCAB = 4
NEW = 3


def _tables() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    target = torch.randn(VOCAB, VOCAB, generator=g) * 1.5
    draft = torch.randn(VOCAB, VOCAB, generator=g) * 1.5  # a poor draft: many rejections
    return target, draft


def _exact(table: torch.Tensor, prompt: list[int], params: SamplingParams) -> dict[tuple[int, ...], float]:
    probs = sampling_probs(table, params)  # [vocab, vocab]: row = previous token
    out = {}
    for seq in itertools.product(range(VOCAB), repeat=NEW):
        p, prev = 1.0, prompt[-1]
        for t in seq:
            p *= float(probs[prev, t])
            prev = t
        out[seq] = p
    return out


def _sample(target: BigramRunner, proposer: Proposer, prompt: list[int], params: SamplingParams, n: int, k: int) -> Counter:
    stop = StopCondition(frozenset(), NEW)
    counts: Counter = Counter()
    for i in range(n):
        p = SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, seed=i, max_new_tokens=NEW)
        counts[tuple(speculative_generate(target, proposer, prompt, p, stop, k=k).token_ids)] += 1
    return counts


def chi_square_pvalue(counts: Counter, exact: dict, n: int) -> float:
    """p-value of Pearson's chi-square, cells with expected < 5 pooled into one."""
    stat, df, pooled_obs, pooled_exp = 0.0, -1, 0.0, 0.0
    for cell, p in exact.items():
        expected = p * n
        if expected < 5:
            pooled_obs += counts.get(cell, 0)
            pooled_exp += expected
            continue
        stat += (counts.get(cell, 0) - expected) ** 2 / expected
        df += 1
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / max(pooled_exp, 1e-9)
        df += 1
    assert sum(counts.values()) == n and set(counts) <= set(exact)
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))


def _wrong_verify(draft, target_logits, params, generator=None) -> Verdict:
    """The rejection rule with the residual replaced by the target distribution: biased."""
    v = verify(draft, target_logits, params, generator)
    if params.greedy or v.num_accepted == draft.k:
        return v
    probs = sampling_probs(target_logits, params)[v.num_accepted]
    return Verdict(v.num_accepted, int(torch.multinomial(probs, 1, generator=generator)), proposed=v.proposed)


N = 2000
PARAMS = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_k=3), SamplingParams(temperature=1.2, top_p=0.8)]


@pytest.mark.parametrize("params", PARAMS, ids=["T1", "T0.8-topk3", "T1.2-topp0.8"])
def test_draft_model_sampling_matches_target(params):
    target, draft = _tables()
    counts = _sample(BigramRunner(target), DraftModelProposer(BigramRunner(draft)), [0], params, N, k=2)
    assert chi_square_pvalue(counts, _exact(target, [0], params), N) > 1e-3


def test_draft_model_sampling_with_a_draft_vocabulary_matches_target():
    """A draft that never proposes some ids (a draft vocabulary: -inf there): those ids still come, from the
    residual and the bonus token, at the target's rate."""
    target, draft = _tables()
    draft[:, [1, 3]] = float("-inf")
    params = SamplingParams(temperature=1.0)
    counts = _sample(BigramRunner(target), DraftModelProposer(BigramRunner(draft)), [0], params, N, k=2)
    assert chi_square_pvalue(counts, _exact(target, [0], params), N) > 1e-3
    assert any(1 in seq or 3 in seq for seq in counts)


@pytest.mark.parametrize("confidence", [0.3, 0.6])
def test_draft_model_sampling_with_a_confidence_stop_matches_target(confidence):
    """The draft stops early where its path probability is low (before sampling): still exact."""
    target, draft = _tables()
    params = SamplingParams(temperature=1.0)
    proposer = DraftModelProposer(BigramRunner(draft), min_confidence=confidence)
    counts = _sample(BigramRunner(target), proposer, [0], params, N, k=3)
    assert chi_square_pvalue(counts, _exact(target, [0], params), N) > 1e-3


def test_ngram_sampling_matches_target():
    target, _ = _tables()
    prompt = [0, 1, 2, 3, 0, 1, 2, 3, 0]  # lookup proposes 1, 2, 3 ... every step
    params = SamplingParams(temperature=1.0)
    counts = _sample(BigramRunner(target), NGramProposer(1, 3), prompt, params, N, k=3)
    assert chi_square_pvalue(counts, _exact(target, prompt, params), N) > 1e-3


def test_wrong_rule_is_caught(monkeypatch):
    """Same check, wrong rule: the test must fail it, or it could not catch a real bug."""
    monkeypatch.setattr(loop_module, "verify", _wrong_verify)
    target, draft = _tables()
    params = SamplingParams(temperature=1.0)
    counts = _sample(BigramRunner(target), DraftModelProposer(BigramRunner(draft)), [0], params, N, k=2)
    assert chi_square_pvalue(counts, _exact(target, [0], params), N) < 1e-6


def test_real_model_first_token_follows_target(smollm2):
    """SmolLM2's first sampled token, drafted by a 2-layer layerskip draft (often rejected)."""
    from specdeploy.models.layerskip import layerskip_model
    from specdeploy.runtime.runner import TorchRunner

    target = TorchRunner(smollm2.model)
    proposer = DraftModelProposer(TorchRunner(layerskip_model(smollm2.model, 2)))
    prompt = smollm2.tokenizer("The capital of France is")["input_ids"]
    params = SamplingParams(temperature=1.0, top_k=4)
    with torch.no_grad():
        logits = smollm2.model(torch.tensor([prompt])).logits[0, -1]
    exact_probs = sampling_probs(logits[None], params)[0]
    stop = StopCondition(frozenset(), 2)
    n = 120  # seeded draws over the top-4 tokens
    counts: Counter = Counter()
    for i in range(n):
        p = SamplingParams(temperature=1.0, top_k=4, seed=i, max_new_tokens=2)
        counts[(speculative_generate(target, proposer, prompt, p, stop, k=1).token_ids[0],)] += 1
    exact = {(t,): float(exact_probs[t]) for t in torch.nonzero(exact_probs).flatten().tolist()}
    assert chi_square_pvalue(counts, exact, n) > 1e-3


# ---- the batched engine (runtime/batch.py): the same check, many requests advancing together ----------
def _batch_target():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(2)
    cfg = LlamaConfig(vocab_size=8, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, initializer_range=0.3)
    return LlamaForCausalLM(cfg).eval()


def _exact_model(model, prompt: list[int], params: SamplingParams, vocab: int = 8) -> dict[tuple[int, ...], float]:
    """Probability of every NEW-token continuation under the model's sampling distribution."""
    seqs = list(itertools.product(range(vocab), repeat=NEW))
    with torch.no_grad():
        logits = model(torch.tensor([prompt + list(s) for s in seqs])).logits[:, len(prompt) - 1 : -1]  # [seqs, NEW, vocab]
    probs = sampling_probs(logits.reshape(-1, vocab), params).view(len(seqs), NEW, vocab)
    picked = probs.gather(-1, torch.tensor(seqs)[..., None])[..., 0].prod(-1)  # [seqs]
    return dict(zip(seqs, picked.tolist()))


def _batch_counts(model, method: str, prompt: list[int], params: SamplingParams, n: int, device: str = "cpu",
                  vocab: torch.Tensor | None = None) -> Counter:
    """n samples of one prompt through the batched engine (on CUDA: its captured step graphs); `vocab`: the draft
    vocabulary of the draft or EAGLE head."""
    from specdeploy.models.draft_vocab import with_draft_vocab
    from specdeploy.models.eagle import EagleHead
    from specdeploy.runtime.batch import BatchRequest, BatchSpeculator
    from specdeploy.runtime.cuda_runner import LeanLlama

    head = EagleHead.init_from_target(model).eval().to(device)
    head.draft_vocab = vocab
    lean = LeanLlama.from_hf(model.to(device))
    draft = lean.truncated(1)
    if vocab is not None:  # as a DraftLM with a draft vocabulary loads: LeanLlama.from_hf reads its DraftVocabLMHead
        vocab_model = copy.deepcopy(model)
        vocab_model.lm_head = with_draft_vocab(vocab_model.lm_head, vocab)
        draft = LeanLlama.from_hf(vocab_model, num_layers=1)
    drafter = {"draft": dict(draft=draft), "ngram": {}, "eagle": dict(head=head)}[method]
    eng = BatchSpeculator(lean, method=method, **drafter, k=2, max_batch=64, max_length=48, sampling=params)
    assert eng.num_graphs > 0 if device == "cuda" else True
    torch.manual_seed(3)
    res = eng.run([BatchRequest(prompt, NEW) for _ in range(n)])
    assert sum(r.stats.proposed for r in res) > 0
    return Counter(tuple(r.token_ids) for r in res)


@pytest.mark.parametrize("method, params", [
    ("draft", SamplingParams(temperature=1.0)), ("ngram", SamplingParams(temperature=1.0)),
    ("eagle", SamplingParams(temperature=0.8, top_k=5)), ("draft", SamplingParams(temperature=1.2, top_p=0.8))])
def test_batched_sampling_matches_target(method, params):
    model = _batch_target()
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]  # repeats: the n-gram lookup drafts
    counts = _batch_counts(model, method, prompt, params, N)
    assert chi_square_pvalue(counts, _exact_model(model, prompt, params), N) > 1e-3


@pytest.mark.parametrize("method", ["draft", "eagle"])
def test_batched_sampling_with_a_draft_vocabulary_matches_target(method):
    """Drafts that never propose ids 1, 4 and 7 (a draft vocabulary): the output still follows the target's distribution."""
    model = _batch_target()
    params = SamplingParams(temperature=1.0)
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    counts = _batch_counts(model, method, prompt, params, N, vocab=torch.tensor([0, 2, 3, 5, 6]))
    assert chi_square_pvalue(counts, _exact_model(model, prompt, params), N) > 1e-3
    assert any(t in (1, 4, 7) for seq in counts for t in seq)  # ids the drafts cannot propose, from the residual


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs")
@pytest.mark.parametrize("vocab", [None, [0, 2, 3, 5, 6]], ids=["whole-vocab", "draft-vocab"])
@pytest.mark.parametrize("method", ["draft", "eagle"])
def test_batched_sampling_in_cuda_graphs_matches_target(method, vocab):
    """The step graphs draw fresh randoms at every replay: the same check, on the GPU (float32), with and without
    a draft vocabulary."""
    model = _batch_target()
    params = SamplingParams(temperature=1.0)
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    exact = _exact_model(model, prompt, params)
    vocab = None if vocab is None else torch.tensor(vocab, device="cuda")
    counts = _batch_counts(model, method, prompt, params, N, device="cuda", vocab=vocab)
    assert chi_square_pvalue(counts, exact, N) > 1e-3


def test_batched_wrong_rule_is_caught(monkeypatch):
    """The batched rule with the residual replaced by the target distribution: the same check rejects it."""
    import specdeploy.runtime.batch as batch_module

    def wrong(draft_tokens, draft_lens, draft_probs, target_probs):
        k = draft_tokens.shape[1]
        return real(draft_tokens, draft_lens, None if draft_probs is None else target_probs[:, :k], target_probs)

    real = batch_module.sampled_accept_batch
    monkeypatch.setattr(batch_module, "sampled_accept_batch", wrong)
    model = _batch_target()
    params = SamplingParams(temperature=1.0)
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    counts = _batch_counts(model, "draft", prompt, params, N)
    assert chi_square_pvalue(counts, _exact_model(model, prompt, params), N) < 1e-6
