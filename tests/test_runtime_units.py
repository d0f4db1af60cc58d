"""Unit tests of the loop's parts on tiny known runners: proposers, verification, stopping, stats."""
from __future__ import annotations

import math

import pytest
import torch

from specdeploy.config import SamplingParams, SpecConfig
from specdeploy.errors import SpecDeployError
from specdeploy.runtime.loop import StopCondition, speculative_generate
from specdeploy.runtime.proposers import DraftModelProposer, NGramProposer, NoProposer
from specdeploy.runtime.stats import SpecStats
from specdeploy.runtime.types import Context, Draft
from specdeploy.runtime.verify import sample, sampling_probs, verify
from table_runner import BigramRunner

V = 8


def _cycle_table(order: list[int]) -> torch.Tensor:
    """Greedy continuation follows `order` cyclically: argmax(table[order[i]]) = order[i+1]."""
    t = torch.zeros(V, V)
    for a, b in zip(order, order[1:] + order[:1]):
        t[a, b] = 5.0
    return t


def _ctx(ids: list[int], params: SamplingParams | None = None) -> Context:
    return Context(token_ids=ids, prompt_len=len(ids), params=params or SamplingParams())


# --- n-gram lookup -------------------------------------------------------------------------

def test_ngram_copies_what_followed_the_latest_match():
    ids = [1, 2, 3, 4, 9, 1, 2, 3, 5, 6, 7, 1, 2, 3]
    assert NGramProposer(1, 3).propose(_ctx(ids), 3).tokens.tolist() == [5, 6, 7]


def test_ngram_prefers_longer_match_and_respects_min_n():
    ids = [7, 3, 4, 4, 9, 1, 3, 4, 4, 8, 2, 4]
    # max_n=2: suffix [2, 4] never occurred; n=1 matches the last earlier 4 (index 8) -> 8, 2, 4
    assert NGramProposer(1, 2).propose(_ctx(ids), 3).tokens.tolist() == [8, 2, 4]
    assert NGramProposer(2, 2).propose(_ctx(ids), 3).k == 0


def test_ngram_no_match_and_short_context():
    assert NGramProposer(1, 4).propose(_ctx([1, 2, 3]), 4).k == 0
    assert NGramProposer(1, 4).propose(_ctx([5]), 4).k == 0


def test_ngram_truncates_to_k_and_to_available_tokens():
    ids = [1, 2, 3, 1]
    assert NGramProposer(1, 1).propose(_ctx(ids), 2).tokens.tolist() == [2, 3]
    assert NGramProposer(1, 1).propose(_ctx(ids), 10).tokens.tolist() == [2, 3, 1]


def test_lookup_first_drafts_the_model_only_where_the_lookup_finds_nothing():
    from specdeploy.runtime.head_proposers import LookupFirstProposer

    class Model:
        calls, resets, needs_hidden, max_nodes = 0, 0, True, 5

        def reset(self):
            self.resets += 1

        def propose(self, ctx, k):
            self.calls += 1
            return Draft(torch.tensor([7] * k), parents=torch.tensor([-1] + list(range(k - 1))))

    model = Model()
    proposer = LookupFirstProposer(NGramProposer(2, 3), model)
    assert proposer.needs_hidden and proposer.max_nodes == 5
    chain = proposer.propose(_ctx([1, 2, 3, 4, 1, 2]), 2)
    assert chain.tokens.tolist() == [3, 4] and not chain.is_tree and model.calls == 0
    tree = proposer.propose(_ctx([1, 2, 3, 4, 5, 6]), 2)  # no earlier [5, 6]: the model drafts
    assert tree.is_tree and tree.tokens.tolist() == [7, 7] and model.calls == 1
    proposer.reset()
    assert model.resets == 1


# --- verification --------------------------------------------------------------------------

def _logits_for(tokens: list[int]) -> torch.Tensor:
    out = torch.zeros(len(tokens), V)
    out[torch.arange(len(tokens)), torch.tensor(tokens)] = 3.0
    return out


@pytest.mark.parametrize("draft, target, accepted, nxt", [
    ([1, 2, 3], [1, 2, 3, 4], 3, 4),  # all accepted + bonus
    ([1, 2, 3], [1, 5, 3, 4], 1, 5),  # first mismatch at position 1
    ([1, 2, 3], [6, 2, 3, 4], 0, 6),
    ([], [7], 0, 7),                  # no draft: plain decoding
])
def test_greedy_verify(draft, target, accepted, nxt):
    v = verify(Draft(torch.tensor(draft, dtype=torch.long)), _logits_for(target), SamplingParams())
    assert (v.num_accepted, v.next_token) == (accepted, nxt)
    assert v.emitted(Draft(torch.tensor(draft, dtype=torch.long))) == draft[:accepted] + [nxt]


def test_sampling_probs_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = sampling_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.allclose(p, torch.tensor([[0.625, 0.375, 0, 0]]))
    p = sampling_probs(logits, SamplingParams(temperature=1.0, top_p=0.8))  # 0.5 + 0.3 reaches 0.8
    assert torch.allclose(p, torch.tensor([[0.625, 0.375, 0, 0]]))
    p = sampling_probs(logits, SamplingParams(temperature=1.0, top_p=0.81))
    assert torch.allclose(p, torch.tensor([[0.5, 0.3, 0.15, 0]]) / 0.95)


def test_sample_draws_each_row_in_proportion_to_its_weights():
    """Unnormalised rows; a zero weight is never drawn; the rows draw independently."""
    w = torch.tensor([[0.0, 1.0, 3.0, 0.0], [2.0, 0.0, 0.0, 2.0]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(w, g) for _ in range(8000)])  # [8000, 2]
    first, second = torch.bincount(draws[:, 0], minlength=4), torch.bincount(draws[:, 1], minlength=4)
    assert first[0] == first[3] == second[1] == second[2] == 0
    assert abs(first[2] / 8000 - 0.75) < 0.02 and abs(second[0] / 8000 - 0.5) < 0.02
    assert abs(float((draws[:, 0] == 2).float().mean() * (draws[:, 1] == 0).float().mean())
               - float(((draws[:, 0] == 2) & (draws[:, 1] == 0)).float().mean())) < 0.02


def test_sampling_rejects_impossible_draft_tokens():
    """A draft token the target gives probability 0 (top-k cut) is never accepted."""
    target = torch.log(torch.tensor([[0.6, 0.4, 1e-9, 1e-9], [0.25] * 4]))
    params = SamplingParams(temperature=1.0, top_k=2)
    for seed in range(50):
        g = torch.Generator().manual_seed(seed)
        v = verify(Draft(torch.tensor([3])), target, params, g)
        assert v.num_accepted == 0 and v.next_token in (0, 1)


# --- the loop: stopping exactly where it must ----------------------------------------------

ORDER = [0, 1, 2, 3, 4, 5, 6, 7]


def _run(proposer, max_new: int, eos: set[int] = frozenset(), k: int = 4, prompt=(0,)):
    target = BigramRunner(_cycle_table(ORDER))
    stop = StopCondition(frozenset(eos), max_new)
    return speculative_generate(target, proposer, list(prompt), SamplingParams(max_new_tokens=max_new), stop, k=k), target


def test_perfect_draft_emits_k_plus_one_per_forward():
    g, _ = _run(DraftModelProposer(BigramRunner(_cycle_table(ORDER))), max_new=10, k=4)
    assert g.token_ids == [1, 2, 3, 4, 5, 6, 7, 0, 1, 2]
    assert g.stats.target_forwards == 2 and g.stats.acceptance_length == 5.0
    assert g.finish_reason == "length"


def test_eos_inside_accepted_draft_stops_right_there():
    g, _ = _run(DraftModelProposer(BigramRunner(_cycle_table(ORDER))), max_new=20, eos={3}, k=6)
    assert g.token_ids == [1, 2, 3] and g.finish_reason == "eos"


def test_max_new_tokens_exact_and_draft_budget_shrinks():
    g, target = _run(DraftModelProposer(BigramRunner(_cycle_table(ORDER))), max_new=7, k=4)
    assert g.token_ids == [1, 2, 3, 4, 5, 6, 7]
    assert g.stats.proposed == 4 + 1  # the second step may draft only 7 - 5 - 1 = 1 token
    assert target.length == 1 + 6  # the cache never holds tokens past the output


def test_wrong_draft_rolls_back_target_cache():
    wrong = _cycle_table([0, 2, 4, 6, 1, 3, 5, 7])
    g, target = _run(DraftModelProposer(BigramRunner(wrong)), max_new=6, k=3)
    assert g.token_ids == [1, 2, 3, 4, 5, 6]
    assert target.length == len([0]) + 6 - 1  # everything but the pending token
    assert target.tokens == [0, 1, 2, 3, 4, 5]


def test_plain_decoding_one_token_per_forward():
    g, _ = _run(NoProposer(), max_new=5)
    assert g.token_ids == [1, 2, 3, 4, 5] and g.stats.target_forwards == 5 and g.stats.alpha is None


def test_stop_string_condition():
    decode = lambda ids: "".join(chr(ord("a") + i) for i in ids)  # noqa: E731
    stop = StopCondition(frozenset(), 20, ("de",), decode)
    target = BigramRunner(_cycle_table(ORDER))
    g = speculative_generate(target, NoProposer(), [0], SamplingParams(max_new_tokens=20), stop)
    assert g.token_ids == [1, 2, 3, 4] and g.finish_reason == "stop"  # b c d e: "de" complete


# --- stats -----------------------------------------------------------------------------------

def test_stats_alpha_and_positions():
    s = SpecStats(requests=1)
    s.record_step(4, 4)
    s.record_step(4, 1)
    s.record_step(2, 0)
    s.emitted = 5 + 2 + 1
    assert s.alpha == 5 / 10
    assert s.acceptance_length == 8 / 3
    assert s.acceptance_by_position == [2 / 3, 1 / 3, 1 / 2, 1 / 2]
    total = SpecStats()
    total.merge(s)
    total.merge(s)
    assert total.alpha == s.alpha and total.proposed_at == [6, 6, 4, 4]


# --- draft confidence -------------------------------------------------------------------------

def _confidence_table() -> torch.Tensor:
    """Draft table: 0 -> 1 (p 0.9), 1 -> 2 (p 0.9), 2 -> 3 (p 0.3), 3 -> 4 (p 0.9), ..."""
    probs = {0: 0.9, 1: 0.9, 2: 0.3}
    t = torch.zeros(V, V)
    for a in range(V):
        p = probs.get(a, 0.9)
        t[a, (a + 1) % V] = math.log((V - 1) * p / (1 - p))  # softmax gives p to a + 1, the rest share 1 - p
    return t


@pytest.mark.parametrize("confidence, expected", [(0.0, [1, 2, 3, 4]), (0.23, [1, 2, 3]), (0.5, [1, 2]), (0.85, [1]),
                                                  (0.95, [])])
def test_draft_stops_where_its_path_probability_falls_below_the_confidence(confidence, expected):
    """Path probabilities 0.9, 0.81, 0.243, 0.219: drafting stops before the first below the threshold."""
    proposer = DraftModelProposer(BigramRunner(_confidence_table()), min_confidence=confidence)
    assert proposer.propose(_ctx([0]), 4).tokens.tolist() == expected


def test_draft_confidence_with_sampling_decides_before_each_sample():
    """At T=1 the draft samples; it stops where the sampled path times the next position's top
    probability falls below the threshold, and every token it keeps comes with its full q row."""
    proposer = DraftModelProposer(BigramRunner(_confidence_table()), min_confidence=0.5)
    for seed in range(20):
        ctx = _ctx([0], SamplingParams(temperature=1.0))
        ctx.generator = torch.Generator().manual_seed(seed)
        d = proposer.propose(ctx, 4)
        path, prev = 1.0, 0
        q = sampling_probs(_confidence_table(), SamplingParams(temperature=1.0))
        for i, tok in enumerate(d.tokens.tolist()):
            assert path * float(q[prev].max()) >= 0.5
            assert torch.equal(d.probs[i], q[prev])
            path, prev = path * float(q[prev, tok]), tok
        assert d.k == 4 or path * float(q[prev].max()) < 0.5


@pytest.mark.parametrize("bad", [-0.1, 1.0, 2, float("nan"), True, "0.5"])
def test_bad_draft_confidence(bad):
    with pytest.raises(SpecDeployError, match="confidence"):
        SpecConfig(method="draft", draft_confidence=bad)
    with pytest.raises(SpecDeployError, match="confidence"):
        DraftModelProposer(BigramRunner(_confidence_table()), min_confidence=bad)


# --- config validation ------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(temperature=float("nan")), dict(top_p=0), dict(top_p=1.01),
                                    dict(top_k=-1), dict(max_new_tokens=0), dict(stop=("",))])
def test_bad_sampling_params(kwargs):
    with pytest.raises(SpecDeployError):
        SamplingParams(**kwargs)


def test_vllm_speculative_config_shape():
    s = SpecConfig.from_vllm({"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 3, "prompt_lookup_min": 2})
    assert (s.method, s.k, s.ngram_min, s.ngram_max) == ("ngram", 5, 2, 3)
    s = SpecConfig.from_vllm({"model": "/models/draft", "num_speculative_tokens": 3})
    assert (s.method, s.draft, s.k) == ("draft", "/models/draft", 3)
