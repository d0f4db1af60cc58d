"""The speculation switch: its cost model (driven with synthetic timings), and the loop under it:
lossless whatever it picks, off where a proposer does not pay, on where it does (fp32, CPU)."""
from __future__ import annotations

import time

import pytest
import torch

from specdeploy.config import SamplingParams, SpecConfig
from specdeploy.runtime.engine import SpecEngine
from specdeploy.runtime.loop import StopCondition, speculative_generate
from specdeploy.runtime.proposers import NGramProposer
from specdeploy.runtime.switch import SpecSwitch
from specdeploy.runtime.types import Context, Draft
from conftest import AlternatingSwitch, greedy_reference

MAX_NEW = 40
PROMPTS = ["Write a Python function that returns the square of a number.",
           "Translate to French: Good morning, how are you?",
           "Call the weather API for Paris and return JSON with the keys city and unit."]


def _drive(sw: SpecSwitch, steps: int, acceptance, spec_s: float, plain_s: float = 1.0, slots: int = 1) -> list[bool]:
    picks = []
    for _ in range(steps):
        spec = sw.choose(slots)
        picks.append(spec)
        sw.record(spec, acceptance() if spec else 1.0, spec_s if spec else plain_s, slots)
    return picks


def _runs(picks: list[bool]) -> tuple[list[int], list[int]]:
    """Lengths of the runs of spec steps, and of plain steps, in order."""
    runs, gaps, i = [], [], 0
    while i < len(picks):
        j = i
        while j < len(picks) and picks[j] == picks[i]:
            j += 1
        (runs if picks[i] else gaps).append(j - i)
        i = j
    return runs, gaps


def test_spec_switch_auto_keeps_paying_speculation_on():
    """spec iff acceptance_length / spec_step_time >= 1 / plain_step_time; while on, one plain step
    in probe_every refreshes the plain step time."""
    sw = SpecSwitch("auto", probe_every=10)
    tail = _drive(sw, 100, lambda: 1.8, 1.2)[-50:]
    assert sw.prefers_spec() and sum(tail) == 45
    assert SpecSwitch("off").choose() is False and SpecSwitch("on").choose() is True
    with pytest.raises(Exception):
        SpecSwitch("sometimes")


def test_spec_switch_auto_probes_in_bursts_that_back_off():
    """Where speculation does not pay, a burst of probe_len spec steps re-measures it (the first one
    starts the run, then one plain step is measured); each burst that fails doubles the wait before
    the next one, up to max_wait."""
    sw = SpecSwitch("auto", probe_every=10, probe_len=3, max_wait=40)
    picks = _drive(sw, 300, lambda: 1.2, 2.0)
    assert not sw.prefers_spec()
    runs, gaps = _runs(picks)
    assert set(runs) == {3} and gaps[:4] == [11, 20, 40, 40]


def test_spec_switch_bursts_gather_evidence_per_slot():
    """A burst holds probe_len slot-steps of evidence: one step of a batch of that many slots."""
    sw = SpecSwitch("auto", probe_every=10, probe_len=4, max_wait=40)
    runs, gaps = _runs(_drive(sw, 300, lambda: 1.2, 2.0, slots=8))
    assert set(runs) == {1} and gaps[:3] == [11, 20, 40]


def test_spec_switch_auto_is_not_stuck_off_by_noise():
    """Per-step acceptance is noisy (1 to k + 1 tokens). Where its mean pays (here 1.26x the plain
    rate, always on), a run of rejections must not keep speculation off: the estimate ages while
    off and a probe burst decides. (`SpecSwitch` as of commit 8bf9123 spent 8% of these steps speculating.)"""
    import random

    rng = random.Random(0)

    def accepted():  # 1 + accepted drafts, each accepted with p = 0.55 until one is not (k = 4)
        n = 1
        while n < 5 and rng.random() < 0.55:
            n += 1
        return n

    sw = SpecSwitch("auto")
    picks = _drive(sw, 20000, accepted, spec_s=2.8, plain_s=1.7)
    assert sum(picks) / len(picks) > 0.7


def test_spec_switch_auto_is_not_turned_off_by_one_off_steps():
    """A request's first draft catches up over the prompt, and a CUDA graph is captured the first time
    a shape occurs: such steps take many times a usual one. Where speculation pays (here 1.5x the
    plain rate), they must not turn it off. (The moving average the medians replaced, seeded by the
    first step, ran 192 of these 200 steps plain.)"""
    sw = SpecSwitch("auto")
    spec_steps = 0

    def spec_time() -> float:
        nonlocal spec_steps
        spec_steps += 1
        return 20.0 if spec_steps == 1 or spec_steps % 25 == 0 else 2.0  # the first step, then a capture now and then

    picks = []
    for _ in range(200):
        spec = sw.choose()
        picks.append(spec)
        sw.record(spec, 3.0 if spec else 1.0, spec_time() if spec else 1.0)
    assert sum(picks) / len(picks) > 0.9


# ---- the loop under the switch (real SmolLM2, fp32) ----------------------------------------------

@pytest.fixture(scope="module")
def reference(smollm2):
    return greedy_reference(smollm2, PROMPTS, MAX_NEW)


def _generate(engine: SpecEngine, ids: list[int], switch, proposer=None, k: int = 4):
    stop = StopCondition(engine.eos_ids, MAX_NEW)
    proposer = proposer or engine.proposer
    return speculative_generate(engine.runner, proposer, ids, SamplingParams(max_new_tokens=MAX_NEW), stop, k=k,
                                switch=switch)


@pytest.mark.parametrize("method", ["ngram", "layerskip", "draft", "medusa", "eagle", "multi", "specinfer"])
def test_switching_on_and_off_stays_lossless(smollm2, reference, method):
    engine = SpecEngine(smollm2, SpecConfig(method=method, k=4))
    accepted = 0
    for i, (ids, ref) in enumerate(reference):
        gen = _generate(engine, ids, AlternatingSwitch(2, 5))
        assert gen.token_ids == ref, f"{method}, prompt {i}"
        assert 0 < gen.stats.switched_off < gen.stats.target_forwards
        accepted += gen.stats.accepted
    if method != "ngram":
        assert accepted > 0, "drafts after plain steps should still be accepted (the proposer caught up)"


class _Costly(NGramProposer):
    """n-gram lookup that proposes only wrong tokens and takes 50 ms to do it: never pays."""

    def propose(self, ctx: Context, k: int) -> Draft:
        time.sleep(0.05)
        return Draft(tokens=torch.full((k,), 0, dtype=torch.long))  # token 0 never follows a chat reply's text


class _Oracle(NGramProposer):
    """Proposes the reference continuation itself, instantly: always pays."""

    def __init__(self, ref: list[int], prompt_len: int) -> None:
        super().__init__()
        self.ref, self.prompt_len = ref, prompt_len

    def propose(self, ctx: Context, k: int) -> Draft:
        at = len(ctx.token_ids) - self.prompt_len
        return Draft(tokens=torch.tensor(self.ref[at : at + k], dtype=torch.long))


def test_auto_switch_turns_a_losing_proposer_off_and_keeps_a_winning_one_on(smollm2, reference):
    engine = SpecEngine(smollm2, SpecConfig(method="ngram", k=4))
    ids, ref = reference[0]
    losing = _generate(engine, ids, "auto", _Costly())
    assert losing.token_ids == ref
    # a burst of 4 spec steps, one plain step measured, then plain until a probe 64 steps later
    assert losing.stats.switched_off == losing.stats.target_forwards - 4
    winning = _generate(engine, ids, "auto", _Oracle(ref, len(ids)))
    assert winning.token_ids == ref
    assert winning.stats.switched_off == 1 and winning.stats.accepted > 0  # the one plain step it measures


class _Bursty(NGramProposer):
    """A lookup that matches in bursts: the true continuation on 2 steps of every 8, nothing otherwise."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table, self.calls = table, 0

    def propose(self, ctx: Context, k: int) -> Draft:
        self.calls += 1
        if self.calls % 8 >= 2:
            return Draft.empty()
        out, prev = [], ctx.token_ids[-1]
        for _ in range(k):
            prev = int(self.table[prev].argmax())
            out.append(prev)
        return Draft(tokens=torch.tensor(out, dtype=torch.long))


class _SpySwitch(SpecSwitch):
    def __init__(self) -> None:
        super().__init__("auto")
        self.chosen: list[bool] = []
        self.recorded: list[bool] = []

    def choose(self, slots: int = 1) -> bool:
        self.chosen.append(super().choose(slots))
        return self.chosen[-1]

    def record(self, spec, tokens_per_slot, seconds, slots=1) -> None:
        self.recorded.append(spec)
        super().record(spec, tokens_per_slot, seconds, slots)


@pytest.fixture
def seen(monkeypatch) -> list:
    """The `switch` argument of every loop call an engine makes."""
    from specdeploy.runtime import engine as engine_module

    calls = []
    real = engine_module.speculative_generate

    def spy(*args, **kw):
        calls.append(kw["switch"])
        return real(*args, **kw)

    monkeypatch.setattr(engine_module, "speculative_generate", spy)
    return calls


def test_an_engine_keeps_one_auto_switch_per_task_across_requests(smollm2, reference, seen):
    """A chat answer is too short for its own first steps to settle whether speculation pays: the
    evidence (step times, acceptance, probe schedule) carries over to the task's next request."""
    engine = SpecEngine(smollm2, SpecConfig(method="ngram", k=4, switch="auto"))
    ids, _ = reference[1]
    params = SamplingParams(max_new_tokens=6)
    for task in ("code", "code", "qa"):
        engine.generate_ids(ids, params, task)
    engine.generate_ids(ids, SamplingParams(max_new_tokens=6, temperature=0.7, seed=1), "code")
    assert all(isinstance(sw, SpecSwitch) and sw.mode == "auto" for sw in seen)
    assert seen[0] is seen[1] and seen[2] is not seen[0] and seen[3] is not seen[0]
    assert seen[0].spec_steps + seen[0].plain_steps > 6  # both requests' steps recorded in the one switch


def test_steps_that_drafted_nothing_are_no_evidence_against_speculation():
    """A lookup's empty draft verifies one token, as a plain step: the switch times it as one and
    does not count it as a spec step that failed (else bursty lookups get switched off between bursts)."""
    from table_runner import BigramRunner

    order = [1, 2, 3, 4, 5, 6, 7]
    table = torch.zeros(8, 8)
    for a, b in zip(order, order[1:] + order[:1]):
        table[a, b] = 5.0
    proposer, switch = _Bursty(table), _SpySwitch()
    gen = speculative_generate(BigramRunner(table), proposer, [1], SamplingParams(max_new_tokens=120),
                               StopCondition(frozenset(), 120), k=4, switch=switch)
    assert gen.token_ids == [order[(i + 1) % 7] for i in range(120)]
    assert all(c for c, r in zip(switch.chosen, switch.recorded) if r)
    assert sum(switch.recorded) < sum(switch.chosen)  # empty drafts were recorded as plain steps
    assert gen.stats.switched_off == switch.chosen.count(False)  # ... but not counted as switched off
    assert gen.stats.proposed_at[0] == sum(switch.recorded)  # every recorded spec step drafted


def test_engine_and_policy_pass_their_switch_to_the_loop(smollm2, reference, seen):
    from specdeploy.runtime.policy import Policy

    ids, _ = reference[1]
    params = SamplingParams(max_new_tokens=4)
    SpecEngine(smollm2, SpecConfig(method="ngram", switch="auto")).generate_ids(ids, params)
    SpecEngine(smollm2, SpecConfig(method="ngram")).generate_ids(ids, params)
    policy = Policy.from_dict({"default": {"method": "ngram", "k": 4}, "switch": "auto"})
    result = SpecEngine(smollm2, SpecConfig(method="ngram"), policy=policy).generate_ids(ids, params, "code")
    assert [getattr(sw, "mode", sw) for sw in seen] == ["auto", "on", "auto"]
    assert result.decision.as_dict()["switch"] == "auto" and policy.to_dict()["switch"] == "auto"
    with pytest.raises(Exception, match="switch"):
        Policy.from_dict({"switch": "sometimes"})
    with pytest.raises(Exception, match="switch"):
        SpecConfig(switch="maybe")
