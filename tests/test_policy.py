"""The policy: its file, its online adaptation, and its effect on the loop (k per task, off, lossless)."""
from __future__ import annotations

import json

import pytest

from specdeploy.cli import main
from specdeploy.config import SamplingParams, SpecConfig
from specdeploy.errors import SpecDeployError
from specdeploy.runtime.engine import SpecEngine
from specdeploy.runtime.policy import Adaptation, Policy, TaskRule
from specdeploy.runtime.stats import SpecStats

REPETITIVE = "one two three four, one two three four, one two three four, one two three four, one two three"


def stats_of(k: int, accepted: list[int]) -> SpecStats:
    s = SpecStats(requests=1)
    for n in accepted:
        s.record_step(k, n)
    return s


def test_policy_file_round_trip(tmp_path):
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"default": {"method": "ngram", "k": 4},
                                "tasks": {"code": {"method": "layerskip", "k": 8, "expected_speedup": 2.5},
                                          "chat": {"method": "ngram", "k": "off"}},
                                "adaptive": {"enabled": True, "max_k": 16}}))
    p = Policy.load(path)
    assert p.rule("code") == TaskRule("layerskip", 8) and p.rule("chat").off and p.rule("other") == TaskRule("ngram", 4)
    assert p.adaptive.enabled and p.adaptive.max_k == 16
    d = p.to_dict()
    assert d["tasks"]["code"] == {"method": "layerskip", "k": 8, "expected_speedup": 2.5}
    assert d["tasks"]["chat"]["k"] == "off"
    for bad in ({"tasks": {"x": {"method": "magic", "k": 2}}}, {"default": {"method": "ngram", "k": 0}},
                {"adaptive": {"bogus": 1}}, {"adaptive": {"min_k": 4, "max_k": 2}}):
        with pytest.raises(SpecDeployError):
            Policy.from_dict(bad)
    with pytest.raises(SpecDeployError, match='"enabled" is not a policy key'):  # the runtime, not only Triton
        Policy.from_dict({"tasks": {"chat": {"enabled": False}}})
    with pytest.raises(SpecDeployError, match="not found"):
        Policy.load(tmp_path / "missing.json")


def test_static_decisions_are_counted():
    p = Policy({"code": TaskRule("ngram", 8), "chat": TaskRule("none", 0)}, TaskRule("ngram", 2))
    assert (p.decide("code").k, p.decide("chat").k, p.decide("qa").k) == (8, 0, 2)
    assert p.decide("chat").as_dict() == {"task": "chat", "method": "none", "k": "off", "reason": "policy"}
    assert p.summary()["chat"]["decisions"] == {"off": 2}


def test_adaptation_raises_lowers_turns_off_and_probes():
    a = Adaptation(enabled=True, min_k=1, max_k=8, raise_above=0.6, lower_below=0.15, off_below=0.2,
                   min_requests=1, probe_every=3, decay=0.0)
    p = Policy({"code": TaskRule("ngram", 2)}, adaptive=a)
    d = p.decide("code")
    assert d.k == 2
    p.observe(d, stats_of(2, [2, 2, 2, 1]))  # the last position accepted in 3 of 4 drafts: raise
    d = p.decide("code")
    assert (d.k, d.reason) == (4, "adapted")
    p.observe(d, stats_of(4, [4, 0, 4, 0]))  # α = 0.5, last position 0.5: keep
    assert p.decide("code").k == 4
    p.observe(p.decide("code"), stats_of(4, [3, 2, 2, 1, 3]))  # α 0.55, last position never reached: lower
    assert p.decide("code").k == 2
    p.observe(p.decide("code"), stats_of(2, [0, 0, 0, 1]))  # α 0.125 < 0.2: off
    decisions = [p.decide("code") for _ in range(3)]
    assert [d.k for d in decisions] == [0, 0, 2] and decisions[-1].reason == "probe"
    p.observe(decisions[-1], stats_of(2, [0, 0, 0, 0]))  # the probe fails: stays off
    decisions = [p.decide("code") for _ in range(3)]
    assert [d.k for d in decisions] == [0, 0, 2]
    p.observe(decisions[-1], stats_of(2, [2, 1]))
    assert p.decide("code").k == 2  # the probe succeeded: on again
    summary = p.summary()["code"]
    assert summary["changes"][:3] == ["k 2->4", "k 4->2", "off"] and summary["changes"][-1] == "on"


def test_policy_task_marked_off_is_probed_when_adaptive():
    p = Policy({"chat": TaskRule("none", 0)}, TaskRule("ngram", 4), Adaptation(enabled=True, probe_every=2))
    assert [p.decide("chat").k for _ in range(4)] == [0, 4, 0, 4]


@pytest.fixture(scope="module")
def engines(smollm2):
    plain = SpecEngine(smollm2, SpecConfig(method="none"))
    policy = Policy({"code": TaskRule("ngram", 2), "chat": TaskRule("none", 0)}, TaskRule("ngram", 4))
    return plain, SpecEngine(smollm2, SpecConfig(method="ngram", k=4), runner=plain.runner, policy=policy)


def test_policy_sets_k_per_task_and_off_in_the_loop(engines):
    plain, spec = engines
    params = SamplingParams(max_new_tokens=8)
    ids = spec.encode(REPETITIVE, raw=True)
    ref = plain.generate_ids(ids, params).token_ids
    code = spec.generate_ids(ids, params, task="code")
    chat = spec.generate_ids(ids, params, task="chat")
    other = spec.generate_ids(ids, params, task="qa")
    assert code.token_ids == chat.token_ids == other.token_ids == ref  # lossless whatever the policy decides
    assert code.decision.k == 2 and len(code.stats.proposed_at) <= 2 and code.stats.proposed > 0
    assert max(len(other.stats.proposed_at), 0) <= 4 and other.decision.k == 4
    assert chat.decision.off and chat.stats.proposed == 0 and chat.stats.acceptance_length == 1.0
    assert chat.as_json()["policy"] == {"task": "chat", "method": "none", "k": "off", "reason": "policy"}
    assert spec.policy.summary()["code"]["decisions"] == {"ngram k=2": 1}


def test_adaptive_policy_is_lossless(engines, smollm2):
    plain, _ = engines
    # this prompt's drafts of 1 token are accepted 40% of the time: over raise_above = 0.3, k grows
    pol = Policy({}, TaskRule("ngram", 1), Adaptation(enabled=True, max_k=8, min_requests=1, decay=0.0, raise_above=0.3))
    spec = SpecEngine(smollm2, SpecConfig(method="ngram"), runner=plain.runner, policy=pol)
    params = SamplingParams(max_new_tokens=8)
    ids = spec.encode(REPETITIVE, raw=True)
    ref = plain.generate_ids(ids, params).token_ids
    ks = []
    for _ in range(3):
        r = spec.generate_ids(ids, params, task="code")
        assert r.token_ids == ref
        ks.append(r.decision.k)
    assert ks == [1, 2, 4] or ks[:2] == [1, 2]


def test_generate_cli_policy(capsys, tmp_path, smollm2):
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"default": {"method": "ngram", "k": 2}, "tasks": {"math": {"method": "none", "k": "off"}}}))
    assert main(["generate", "--prompt", "What is 2+2?", "--task", "math", "--json", "--max-new-tokens", "4",
                 "--policy", str(path)]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["policy"]["k"] == "off" and r["proposed"] == 0


def test_policy_switches_to_a_head_method_per_task(smollm2):
    """A policy that names EAGLE for one task runs EAGLE there (the engine's runner returns hidden states),
    stays lossless, and an engine whose runner cannot feed a head refuses the head instead of silently
    decoding plain."""
    from specdeploy.bench.backend import Backend

    backend = Backend(smollm2, "cpu", "float32")
    policy = Policy({"code": TaskRule("eagle", 3)}, TaskRule("ngram", 2))
    spec = backend.engine("none", 1, policy=policy, more={"eagle": backend.proposer("eagle", 3)})
    plain = backend.engine("none", 0)
    params = SamplingParams(max_new_tokens=12)
    ids = spec.encode("def fib(n):\n    ", raw=True)
    ref = plain.generate_ids(ids, params).token_ids
    r = spec.generate_ids(ids, params, task="code")
    assert r.token_ids == ref and r.decision.method == "eagle" and r.stats.proposed > 0
    assert r.stats.acceptance_length > 1.0  # the head drafted and some of it was accepted
    with pytest.raises(SpecDeployError, match="hidden states"):
        plain.add_proposer("eagle", backend.proposer("eagle", 3))


def test_sampled_section_rules_requests_with_temperature(tmp_path):
    """Greedy and sampled requests of one task may get different rules: acceptance differs between them."""
    from specdeploy.triton_repo.writer import check_policy

    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"default": {"method": "ngram", "k": 4}, "tasks": {"code": {"method": "ngram", "k": 8}},
                                "sampled": {"default": {"method": "none", "k": "off"}, "temperature": 0.7,
                                            "tasks": {"code": {"method": "draft", "k": 2, "expected_speedup": 1.2}}}}))
    p = Policy.load(path)
    assert (p.decide("code").k, p.decide("code", 0.7).method, p.decide("code", 0.7).k) == (8, "draft", 2)
    assert p.decide("qa", 0.7).off and p.decide("qa").k == 4
    assert p.decide("code", 0.7).as_dict()["sampled"] is True and "sampled" not in p.decide("code").as_dict()
    summary = p.summary()
    assert summary["code"]["decisions"] == {"ngram k=8": 2} and summary["code (sampled)"]["decisions"] == {"draft k=2": 3}
    d = p.to_dict()
    assert d["sampled"]["tasks"]["code"] == {"method": "draft", "k": 2, "expected_speedup": 1.2}
    assert d["sampled"]["temperature"] == 0.7 and d["sampled"]["default"]["k"] == "off"
    assert Policy.from_dict(d).to_dict() == d  # round trip
    with pytest.raises(SpecDeployError, match="sampled task 'code'"):
        Policy.from_dict({"sampled": {"tasks": {"code": {"method": "magic", "k": 2}}}})
    with pytest.raises(SpecDeployError, match="method 'draft' is not served"):  # Triton checks the sampled rules too
        check_policy(p, SpecConfig(method="ngram"))
    # without a sampled section, sampled requests follow the greedy rules
    assert Policy({"code": TaskRule("ngram", 8)}).decide("code", 0.7).k == 8


def test_sampled_requests_adapt_apart_from_greedy_ones():
    a = Adaptation(enabled=True, off_below=0.2, min_requests=1, decay=0.0)
    p = Policy({"code": TaskRule("ngram", 2)}, adaptive=a, sampled=({"code": TaskRule("ngram", 2)}, TaskRule("none", 0)))
    d = p.decide("code", 0.7)
    p.observe(d, stats_of(2, [0, 0, 0, 0]))  # sampled drafts all rejected: off for sampled requests only
    assert p.decide("code", 0.7).off and p.decide("code").k == 2


def test_off_and_hidden_free_methods_use_the_plain_runner(engines, smollm2):
    """A policy engine whose runner returns hidden states decodes plain and n-gram requests through
    the runner without them: an "off" task runs exactly as plain decoding does."""
    from specdeploy.runtime.runner import TorchRunner

    plain, _ = engines
    calls = []

    class Spy(TorchRunner):
        def forward(self, *a, **kw):
            calls.append(self.output_hidden)
            return super().forward(*a, **kw)

    hidden = Spy(smollm2.model, output_hidden=True)
    policy = Policy({"chat": TaskRule("none", 0)}, TaskRule("ngram", 2))
    spec = SpecEngine(smollm2, SpecConfig(method="ngram", k=2), runner=hidden, policy=policy,
                      plain_runner=Spy(smollm2.model))
    ids = spec.encode(REPETITIVE, raw=True)
    ref = plain.generate_ids(ids, SamplingParams(max_new_tokens=6)).token_ids
    for task in ("chat", "code"):
        calls.clear()
        assert spec.generate_ids(ids, SamplingParams(max_new_tokens=6), task).token_ids == ref
        assert calls and not any(calls), task


def test_batched_generation_refuses_a_policy(engines):
    """A policy picks a method per task; the batched engine runs one for all: refused, not ignored."""
    _, engine = engines
    with pytest.raises(SpecDeployError, match="policy"):
        engine.generate_batch([[1, 2, 3]], SamplingParams(max_new_tokens=4), max_batch=2)
    assert engine._batch is None
