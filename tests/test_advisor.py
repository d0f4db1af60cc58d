"""The advisor's arithmetic: the speedup formula, "off" decisions, α for any k from one run at K."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from specdeploy.bench.advisor import (Profile, StepCosts, expected_speedup, fit_alpha, geometric_length,
                                      predicted_speedup, recommend, step_overhead_ms)
from specdeploy.cli import main
from specdeploy.errors import SpecDeployError
from specdeploy.runtime.stats import SpecStats


def geometric_stats(counts: dict[int, int], k: int) -> SpecStats:
    """Steps with k proposed tokens each, counts[n] of them accepting n."""
    s = SpecStats(requests=1)
    for n, times in counts.items():
        for _ in range(times):
            s.record_step(k, n)
    s.emitted = sum((n + 1) * t for n, t in counts.items())
    return s


# i.i.d. acceptance at α = 1/2 with K = 4: P(n) = α^n (1 - α) for n < K, P(K) = α^K
HALF = geometric_stats({0: 8, 1: 4, 2: 2, 3: 1, 4: 1}, 4)


def test_formula_values():
    assert expected_speedup(0.6, 4, 0.1) == pytest.approx((1 - 0.6**5) / ((1 - 0.6) * (1 + 4 * 0.1)))
    assert expected_speedup(0.6, 4, 0.1) == pytest.approx(1.646857, abs=1e-6)
    assert expected_speedup(0.8, 3, 0.0) == pytest.approx(1 + 0.8 + 0.64 + 0.512)
    assert expected_speedup(1.0, 4, 0.05) == pytest.approx(5 / 1.2)
    assert expected_speedup(0.7, 0, 0.3) == 1.0  # k = 0 is plain decoding
    # the generalisation: verifying k + 1 tokens costs v times one token
    assert expected_speedup(0.6, 4, 0.1, verify_ratio=2.0) == pytest.approx(geometric_length(0.6, 4) / (0.4 + 2.0))
    # n-gram lookup: c charged once a step, not per token
    assert expected_speedup(0.6, 4, 0.1, per_token=False) == pytest.approx(geometric_length(0.6, 4) / 1.1)
    with pytest.raises(SpecDeployError):
        expected_speedup(1.5, 4, 0.1)


def test_off_when_speculation_cannot_pay():
    assert expected_speedup(0.0, 1, 0.05) < 1  # nothing accepted, drafting costs
    assert expected_speedup(0.2, 4, 0.3) < 1
    assert expected_speedup(0.9, 4, 0.3) > 1


def test_fit_alpha_inverts_the_length():
    for a in (0.0, 0.3, 0.7, 0.95):
        assert fit_alpha(geometric_length(a, 4), 4) == pytest.approx(a, abs=1e-6)


def test_alpha_for_any_k_from_the_run_at_the_largest():
    prof = Profile.from_stats(HALF)
    assert prof.max_k == 4
    assert prof.reach == pytest.approx((0.5, 0.25, 0.125, 0.0625))  # α^(i+1): cumulative acceptance per position
    for k in (1, 2, 3, 4):
        assert prof.acceptance_length(k) == pytest.approx(geometric_length(0.5, k))
        assert prof.query_length(k) == k + 1
    assert prof.alpha(4) == pytest.approx(HALF.alpha)  # at K it is the measured accepted / proposed
    assert prof.alpha(1) == pytest.approx(0.5)
    assert prof.alpha(2) == pytest.approx(0.375)  # (0.5 + 0.25) / 2
    # flat verify cost: the generalised prediction is the textbook formula
    flat = StepCosts({1: 10.0, 5: 10.0}, draft_ms=1.0)
    for k in (1, 2, 4):
        assert predicted_speedup(prof, k, flat) == pytest.approx(expected_speedup(0.5, k, 0.1))
    with pytest.raises(SpecDeployError):
        predicted_speedup(prof, 8, flat)


def test_short_drafts_count_only_the_tokens_drafted():
    """n-gram drafts are often shorter than k: a step without a match costs a plain verify."""
    s = SpecStats(requests=1)
    s.record_step(0, 0)  # no match
    s.record_step(2, 2)
    s.emitted = 1 + 3
    prof = Profile.from_stats(s)
    assert prof.acceptance_length(4) == pytest.approx(2.0)
    assert prof.query_length(4) == pytest.approx(2.0)  # 1 + (2 tokens in half the steps)
    assert prof.alpha(4) == pytest.approx(1.0)


def test_tree_verify_cost_is_the_measured_tree_length():
    """A 48-node tree at depth 4 verifies 49 tokens, not 5: the prediction charges the measured length."""
    prof = Profile.from_stats(HALF)
    costs = {1: 10.0, 5: 12.0, 49: 40.0}
    chain = StepCosts(costs, draft_ms=2.0, per_token=False)
    tree = StepCosts(costs, draft_ms=2.0, per_token=False, verify_query=49.0)
    assert predicted_speedup(prof, 4, chain) == pytest.approx(prof.acceptance_length(4) / (0.2 + 1.2))
    assert predicted_speedup(prof, 4, tree) == pytest.approx(prof.acceptance_length(4) / (0.2 + 4.0))
    assert tree.as_dict()["verify_query"] == 49.0


def test_timed_proposer_records_time_size_and_trees():
    from specdeploy.bench.advisor import TimedProposer
    from specdeploy.runtime.types import Draft

    class Tree:
        def reset(self):
            pass

        def propose(self, ctx, k):
            return Draft(tokens=torch.tensor([5, 6, 7]), parents=torch.tensor([-1, 0, 0]))

    timed = TimedProposer(Tree())
    assert timed.propose(None, 4).is_tree and timed.nodes == [3] and timed.tree and len(timed.ms) == 1


def test_recommend_picks_k_and_turns_tasks_off():
    low = geometric_stats({0: 10}, 8)  # nothing accepted
    high = geometric_stats({8: 9, 3: 1}, 8)
    measured = {"layerskip": {"code": high, "creative_writing": low}}
    gpu = {"layerskip": StepCosts({q: 3.0 for q in (1, 2, 3, 5, 9)}, draft_ms=0.3)}  # verify as cheap as one token
    advice = recommend(measured, gpu, [1, 2, 4, 8])
    assert advice.choice("code")[:2] == ("layerskip", 8)
    assert advice.choice("creative_writing")[:2] == ("none", 0)
    # where verifying k + 1 tokens costs k + 1 times one token (a slow CPU), nothing pays
    cpu = {"layerskip": StepCosts({1: 60.0, 9: 540.0}, draft_ms=15.0)}
    assert recommend(measured, cpu, [1, 2, 4, 8]).choice("code")[:2] == ("none", 0)
    policy = advice.policy()
    assert policy.rule("code").k == 8 and policy.rule("creative_writing").off
    d = policy.to_dict()
    assert d["tasks"]["creative_writing"]["k"] == "off" and d["tasks"]["code"]["expected_speedup"] > 1


def test_what_if_cli(capsys):
    assert main(["advise", "--what-if", "--alpha", "0.6", "--k", "4", "--cost-ratio", "0.1", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == [{"k": 4, "expected_speedup": pytest.approx(1.646857, abs=1e-6)}]
    assert main(["advise", "--what-if", "--alpha", "0.6", "--k", "4"]) == 2  # needs --cost-ratio


def test_step_overhead_is_measured_and_enters_the_prediction():
    prof = Profile(steps=10, reach=(0.5,), drafted=(1.0,))  # acceptance length 1.5 at k=1
    cost = StepCosts({1: 2.0, 2: 2.0}, draft_ms=0.0, per_token=False)
    assert predicted_speedup(prof, 1, cost) == pytest.approx(1.5)
    slow = dataclasses.replace(cost, overhead_ms=1.0)  # 1 ms of host work a step the timings missed
    assert predicted_speedup(prof, 1, slow) == pytest.approx(1.5 * 2 / 3)
    assert predicted_speedup(prof, 1, slow, plain_overhead_ms=1.0) == pytest.approx(1.5)  # plain pays it too
    runs = SpecStats(target_forwards=10, wall_s=0.05)  # 5 ms a step measured, 2 modelled
    assert step_overhead_ms(runs, 2.0) == pytest.approx(3.0)
    assert step_overhead_ms(runs, 9.0) == 0.0 and step_overhead_ms(SpecStats(), 2.0) == 0.0


def test_tree_costs_are_timed_per_depth():
    """Every few steps the tree proposer drafts the same context again at each k, timed apart: a
    shallow tree is charged its own drafting and verify length, not those of the deepest one."""
    import time as _time

    from specdeploy.bench.advisor import TimedProposer
    from specdeploy.runtime.types import Draft

    class Tree:  # drafting time and size grow with the depth
        def reset(self):
            pass

        def propose(self, ctx, k):
            _time.sleep(0.002 * k)
            return Draft(tokens=torch.arange(3 * k), parents=torch.arange(3 * k) - 1)

    timed = TimedProposer(Tree(), ks=(1, 4), every=2)
    for _ in range(4):
        assert timed.propose(None, 4).tokens.numel() == 12
    assert len(timed.ms) == 4 and [len(v) for v in timed.at_ms.values()] == [2, 2] and timed.extra_s > 0.015
    draft_at, query_at = timed.costs_at(4)
    assert query_at == {1: 4.0, 4: 13.0} and draft_at[1] < draft_at[4] / 2
    prof = Profile(steps=10, reach=(0.5, 0.5, 0.5, 0.5), drafted=(1.0,) * 4)
    cost = StepCosts({1: 2.0, 4: 2.0, 13: 3.0}, draft_ms=draft_at[4], per_token=False, verify_query=13.0,
                     draft_ms_at=draft_at, verify_query_at=query_at)
    assert predicted_speedup(prof, 1, cost) == pytest.approx(1.5 * 2.0 / (draft_at[1] + 2.0))
    assert predicted_speedup(prof, 4, cost) == pytest.approx(3.0 * 2.0 / (draft_at[4] + 3.0))
    assert cost.as_dict()["verify_query_at"] == {"1": 4.0, "4": 13.0}
    runs = SpecStats(target_forwards=10, wall_s=0.05)
    assert step_overhead_ms(runs, 2.0, excluded_s=0.02) == pytest.approx(1.0)  # the re-drafts are not overhead


def test_mixed_steps_are_charged_their_mean_cost():
    """A lookup-first proposer: three near-free lookups for every model tree. The step's drafting
    cost is the mean of the mix (a quarter of the tree's), not its median (a lookup's)."""
    import time as _time

    from specdeploy.bench.advisor import TimedProposer
    from specdeploy.runtime.types import Draft

    class Mixed:
        calls = 0

        def reset(self):
            pass

        def propose(self, ctx, k):
            self.calls += 1
            if self.calls % 4:
                return Draft(tokens=torch.arange(k))
            _time.sleep(0.008)
            return Draft(tokens=torch.arange(2 * k), parents=torch.arange(2 * k) - 1)

    timed = TimedProposer(Mixed(), ks=(4,), every=4)
    for _ in range(16):
        timed.propose(None, 4)
    draft_at, _ = timed.costs_at(4)
    assert 1.5 < draft_at[4] < 5.0, draft_at  # ~2 ms (4 trees of 8 ms in 15 steps); the median would be ~0


def test_sampled_advice_writes_the_policy_sampled_section():
    greedy_runs = {"ngram": {"code": geometric_stats({8: 9, 3: 1}, 8)}}
    sampled_runs = {"ngram": {"code": geometric_stats({0: 10}, 8)}}  # nothing accepted when sampling
    costs = {"ngram": StepCosts({q: 3.0 for q in (1, 2, 3, 5, 9)}, draft_ms=0.1, per_token=False)}
    greedy = recommend(greedy_runs, costs, [1, 2, 4, 8])
    sampled = dataclasses.replace(recommend(sampled_runs, costs, [1, 2, 4, 8]), temperature=0.7)
    policy = greedy.policy(sampled=sampled)
    assert policy.decide("code").k == 8 and policy.decide("code", 0.7).off
    d = policy.to_dict()
    assert d["temperature"] == 0.0 and d["sampled"]["temperature"] == 0.7 and d["sampled"]["tasks"]["code"]["k"] == "off"
    assert greedy.policy().sampled is None


def test_advise_refuses_bad_temperatures_before_loading(tmp_path, capsys):
    """The temperature error comes first: the (missing) target is never looked at."""
    for bad in ("0,0.5,0.7", "0.5,0.7", "-1", "hot"):
        assert main(["advise", "--prompts", "eval", "--temperature", bad, "--target", str(tmp_path / "missing"),
                     "--out", str(tmp_path / "p.json")]) == 2, bad
        assert "temperature" in capsys.readouterr().err, bad
    assert not (tmp_path / "p.json").exists()
