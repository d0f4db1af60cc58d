"""The advisor's arithmetic: the speedup formula, "off" decisions, α for any k from one run at K."""
from __future__ import annotations

import dataclasses
import json

import pytest

from specdeploy.bench.advisor import (Profile, StepCosts, StepTimes, expected_speedup, task_step_ms, fit_alpha, geometric_length,
                                      predicted_speedup, recommend, step_ms)
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


def times_of(ms_by_k: dict[int, float], tasks=("code", "creative_writing"), plain_ms: float = 3.0) -> dict[str, StepTimes]:
    """Step times of one method (ms per step at each k, the same for every task) and of plain decoding."""
    K = max(ms_by_k)
    return {"none": StepTimes({t: plain_ms for t in tasks}, {0: 1.0}),
            "layerskip": StepTimes({t: ms_by_k[K] for t in tasks}, {k: v / ms_by_k[K] for k, v in ms_by_k.items()})}


def test_recommend_picks_k_and_turns_tasks_off():
    low = geometric_stats({0: 10}, 8)  # nothing accepted
    high = geometric_stats({8: 9, 3: 1}, 8)
    measured = {"layerskip": {"code": high, "creative_writing": low}}
    gpu = times_of({k: 3.0 + 0.3 * k for k in (1, 2, 4, 8)})  # a draft forward costs a tenth of a plain step
    advice = recommend(measured, gpu, [1, 2, 4, 8])
    assert advice.choice("code")[:2] == ("layerskip", 8)
    best = advice.best("code")
    assert best.expected_speedup == pytest.approx(Profile.from_stats(high).acceptance_length(8) * 3.0 / 5.4)
    assert advice.choice("creative_writing")[:2] == ("none", 0)
    # where a step at k costs k + 1 plain steps (a slow CPU verifying k + 1 tokens), nothing pays
    cpu = times_of({k: 3.0 * (k + 1) + 0.3 * k for k in (1, 2, 4, 8)})
    assert recommend(measured, cpu, [1, 2, 4, 8]).choice("code")[:2] == ("none", 0)
    policy = advice.policy()
    assert policy.rule("code").k == 8 and policy.rule("creative_writing").off
    d = policy.to_dict()
    assert d["tasks"]["creative_writing"]["k"] == "off" and d["tasks"]["code"]["expected_speedup"] > 1
    assert d["step_times"]["layerskip"]["ratio_to_K"]["1"] == pytest.approx(3.3 / 5.4, abs=1e-4)


def test_an_option_that_accepted_nothing_is_never_advised():
    """A lookup that never matched decodes plain steps; timed a little faster than plain (noise), it stays off."""
    nothing = geometric_stats({0: 10}, 4)
    fast = {"none": StepTimes({"qa": 44.0}, {0: 1.0}), "ngram": StepTimes({"qa": 42.0}, {2: 1.0, 4: 1.0})}
    advice = recommend({"ngram": {"qa": nothing}}, fast, [2, 4])
    assert advice.options and all(o.expected_speedup > 1 for o in advice.options)  # what the timing alone says
    assert advice.choice("qa")[:2] == ("none", 0) and advice.best("qa") is None
    assert advice.policy().rule("qa").off


def test_step_times_are_per_task_at_K_scaled_per_k():
    """A task whose steps cost more (longer prompts, costlier drafts) is charged its own step time."""
    t = StepTimes({"code": 2.0, "qa": 4.0}, {1: 0.5, 4: 1.0})
    assert t.ms("code", 4) == 2.0 and t.ms("qa", 1) == 2.0
    runs = [SpecStats(target_forwards=10, wall_s=0.05), SpecStats(target_forwards=30, wall_s=0.05)]
    assert step_ms(runs) == pytest.approx(2.5) and step_ms([SpecStats()]) is None
    prof = geometric_stats({1: 10}, 1)  # acceptance length 2 at k = 1
    times = {"none": StepTimes({"code": 1.0, "qa": 1.0}, {0: 1.0}), "ngram": t}
    advice = recommend({"ngram": {"code": prof, "qa": prof}}, times, [1, 4])
    assert advice.best("code").expected_speedup == pytest.approx(2.0 / 1.0)  # k=1: 2 tokens in 1 ms
    assert advice.best("qa").expected_speedup == pytest.approx(1.0)  # k=1: 2 tokens in 2 ms


def test_what_if_cli(capsys):
    assert main(["advise", "--what-if", "--alpha", "0.6", "--k", "4", "--cost-ratio", "0.1", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == [{"k": 4, "expected_speedup": pytest.approx(1.646857, abs=1e-6)}]
    assert main(["advise", "--what-if", "--alpha", "0.6", "--k", "4"]) == 2  # needs --cost-ratio


def test_sampled_advice_writes_the_policy_sampled_section():
    greedy_runs = {"ngram": {"code": geometric_stats({8: 9, 3: 1}, 8)}}
    sampled_runs = {"ngram": {"code": geometric_stats({0: 10}, 8)}}  # nothing accepted when sampling
    times = times_of({k: 3.1 for k in (1, 2, 4, 8)}, tasks=("code",))
    times["ngram"] = times.pop("layerskip")
    greedy = recommend(greedy_runs, times, [1, 2, 4, 8])
    sampled = dataclasses.replace(recommend(sampled_runs, times, [1, 2, 4, 8]), temperature=0.7)
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


def test_advise_times_every_k_on_the_timing_prompts():
    """advise() runs each method at K on every prompt and at every other k on one prompt per task;
    a step's measured time at k (not a model of its parts) prices that k."""
    from types import SimpleNamespace

    from specdeploy.bench.advisor import advise, timing_prompts
    from specdeploy.bench.tasks import Prompt
    from specdeploy.config import SamplingParams

    step_ms_of = {("none", 0): 1.0, **{("tree", k): 1.2 + 0.2 * k for k in (1, 2, 4)}}
    calls = []

    class Engine:
        def __init__(self, method, k):
            self.method, self.k = method, k

        def generate_ids(self, ids, params, task):
            calls.append((self.method, self.k, task))
            s, steps = SpecStats(requests=1), 10
            for _ in range(steps):
                s.record_step(self.k, self.k if task == "code" else 0)  # code: every draft token accepted
            s.emitted = steps * (1 + (self.k if task == "code" else 0))
            s.wall_s = steps * step_ms_of[(self.method, self.k)] / 1e3
            return SimpleNamespace(stats=s)

    class Backend:
        def engine(self, method, k):
            if method == "medusa":
                raise SpecDeployError("no medusa artifact")
            return Engine(method, k)

    prompts = [Prompt(t, f"{t} {i}") for t in ("code", "qa") for i in range(3)]
    assert timing_prompts(prompts) == [0, 3]
    advice = advise(Backend(), prompts, [[1, 2]] * 6, ["medusa", "tree"], [1, 2, 4],
                    SamplingParams(temperature=0.0, max_new_tokens=16), min_speedup=1.1)
    assert advice.notes == ["medusa: skipped (no medusa artifact)"]
    timed = [c for c in calls if c[2] != "warmup"]
    assert sum(c[:2] == ("tree", 4) for c in timed) == 6 and sum(c[:2] == ("tree", 1) for c in timed) == 2
    assert advice.times["tree"].ratio == pytest.approx({1: 1.4 / 2.0, 2: 1.6 / 2.0, 4: 1.0})
    assert advice.choice("code")[:2] == ("tree", 4) and advice.best("code").expected_speedup == pytest.approx(5 / 2.0)
    assert advice.choice("qa")[:2] == ("none", 0)  # nothing accepted: every k is slower than plain


def test_task_step_time_is_the_median_request():
    """A task's step time is its median request's: one stalled request does not turn a task's speculation
    off (session17/d: one slow first run timed code's EAGLE step at 3.6 ms against ~1.9 elsewhere)."""
    def req(steps: int, ms: float) -> SpecStats:
        return SpecStats(requests=1, target_forwards=steps, wall_s=steps * ms / 1e3)

    got = task_step_ms(["code", "code", "code", "qa", "qa"], [req(40, 1.9), req(40, 9.0), req(30, 2.0), req(10, 1.5), req(0, 0)])
    assert got == pytest.approx({"code": 2.0, "qa": 1.5})
