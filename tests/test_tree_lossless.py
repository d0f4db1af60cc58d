"""Greedy output with the trained drafts equals the target's own greedy `generate` (fp32, CPU).

The shipped artifacts (DraftLM, Medusa heads, EAGLE head) load with no path, as
`--method draft|medusa|eagle|multi|specinfer` does; chains and token trees, with k and tree size
varied; the head methods also over the compiled runner (`compiled_for`, as on CUDA, run
eagerly here). Prompts are few and short: one SmolLM2 forward costs ~60 ms here.
"""
from __future__ import annotations

import pytest
import torch

from specdeploy.config import SamplingParams, SpecConfig
from specdeploy.runtime.engine import SpecEngine
from conftest import assert_matches_reference, greedy_reference

MAX_NEW = 24
PROMPTS = [
    "Write a Python function that returns the square of a number.",
    "Write a SQL query that counts the orders per customer in the table orders.",
    "Translate to French: Good morning, how are you?",
    "What is 12 + 7?",
    "Call the weather API for Paris and return JSON with the keys city and unit.",
    "Say hello.",
]


@pytest.fixture(scope="module")
def reference(smollm2):
    """Prompt ids and the target's own greedy continuation for each prompt."""
    return greedy_reference(smollm2, PROMPTS, MAX_NEW)


def _check(engine: SpecEngine, reference) -> None:
    assert_matches_reference(engine, reference, PROMPTS, MAX_NEW)


CASES = [
    ("draft", 2, None),
    ("draft", 5, None),
    ("medusa", 2, 0),  # chain of the heads' top-1 guesses
    ("medusa", 4, 48),  # the artifact's sparse tree (48 nodes; a CPU drafts chains by default)
    ("medusa", 3, 8),
    ("eagle", 1, 0),  # EAGLE-1 chain
    ("eagle", 4, 0),
    ("eagle", 3, 6),  # EAGLE-2 dynamic trees
    ("eagle", 6, 48),
    ("multi", 4, 16),  # the n-gram chain where the lookup matches, else an EAGLE tree
    ("specinfer", 4, 16),  # the n-gram chain and an EAGLE tree merged into one tree
    ("specinfer", 3, 0),  # the n-gram chain and an EAGLE chain merged
]


@pytest.mark.parametrize("method, k, tree_size", CASES, ids=[f"{m}-k{k}-tree{t}" for m, k, t in CASES])
def test_greedy_equals_target_generate(smollm2, reference, method, k, tree_size):
    engine = SpecEngine(smollm2, SpecConfig(method=method, k=k, tree_size=tree_size))
    _check(engine, reference)
    total = engine.task_stats.total()
    assert total.accepted > 0, "a trained draft should get some tokens accepted"


CONFIDENCE_CASES = [("draft", 4, None, 0.0), ("draft", 6, None, 0.5), ("medusa", 4, None, 0.0), ("medusa", 4, None, 0.3),
                    ("medusa", 3, 0, 0.3)]


@pytest.mark.parametrize("method, k, tree_size, confidence", CONFIDENCE_CASES,
                         ids=[f"{m}-k{k}-tree{t}-conf{c}" for m, k, t, c in CONFIDENCE_CASES])
def test_greedy_with_any_draft_confidence_equals_target_generate(smollm2, reference, method, k, tree_size, confidence):
    """The default threshold is covered above; 0 drafts everything, higher values cut more (fewer tokens proposed)."""
    engine = SpecEngine(smollm2, SpecConfig(method=method, k=k, tree_size=tree_size, draft_confidence=confidence))
    _check(engine, reference)
    total = engine.task_stats.total()
    assert total.accepted > 0
    if confidence:  # the cut drafts well below the full depth on average
        assert total.proposed / total.target_forwards < 0.9 * min(k, 4 if method == "medusa" else k)


COMPILED_CASES = [("medusa", 4, None), ("eagle", 4, 0), ("eagle", 5, 48), ("multi", 4, 16), ("specinfer", 3, 24)]


@pytest.mark.parametrize("method, k, tree_size", COMPILED_CASES, ids=[f"{m}-k{k}-tree{t}" for m, k, t in COMPILED_CASES])
def test_greedy_over_compiled_runner_equals_target_generate(smollm2, reference, method, k, tree_size):
    """What SpecEngine.load builds on CUDA for the head methods: CudaGraphRunner (hidden states, tree
    attention over the static cache, keep_path) + the head proposer (EAGLE trees: GraphEagleProposer);
    graphs off on CPU."""
    from specdeploy.runtime.cuda_runner import CudaGraphRunner, compiled_for

    spec = SpecConfig(method=method, k=k, tree_size=tree_size)
    runner, proposer = compiled_for(spec, smollm2, max_length=256)
    assert isinstance(runner, CudaGraphRunner)
    engine = SpecEngine(smollm2, spec, runner=runner, proposer=proposer)
    assert engine.runner is runner
    assert_matches_reference(engine, reference[:4], PROMPTS[:4], MAX_NEW)
    assert engine.task_stats.total().accepted > 0


def test_eagle_tree_accepts_more_than_its_chain(smollm2, reference):
    chain = SpecEngine(smollm2, SpecConfig(method="eagle", k=4, tree_size=0))
    tree = SpecEngine(smollm2, SpecConfig(method="eagle", k=4, tree_size=32))
    for engine in (chain, tree):
        for ids, _ in reference[:3]:
            engine.generate_ids(ids, SamplingParams(max_new_tokens=MAX_NEW))
    assert tree.task_stats.total().acceptance_length >= chain.task_stats.total().acceptance_length


@pytest.mark.parametrize("method, tree_size", [("eagle", None), ("eagle", 0), ("medusa", None), ("multi", None),
                                                      ("specinfer", None)])
def test_sampling_runs_with_trees_and_chains(smollm2, reference, method, tree_size):
    engine = SpecEngine(smollm2, SpecConfig(method=method, k=4, tree_size=tree_size))
    ids, _ = reference[0]
    r = engine.generate_ids(ids, SamplingParams(temperature=0.7, seed=3, max_new_tokens=12))
    assert 1 <= len(r.token_ids) <= 12 and r.stats.target_forwards <= len(r.token_ids)
    again = engine.generate_ids(ids, SamplingParams(temperature=0.7, seed=3, max_new_tokens=12))
    assert again.token_ids == r.token_ids  # seeded: reproducible


def test_cli_generate_eagle_without_a_path(capsys):
    from specdeploy.cli import main

    assert main(["generate", "--prompt", "What is 12 + 7?", "--method", "eagle", "--json", "--max-new-tokens", "6"]) == 0
    assert '"acceptance_length"' in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("method, k, tree_size", [("eagle", 4, 48), ("multi", 4, 16), ("specinfer", 3, 24), ("medusa", 4, None)])
def test_greedy_over_cuda_graphs_equals_compiled_plain(method, k, tree_size):
    """On CUDA in float32, graphs captured: EAGLE trees stay on the device from drafting to the verify
    forward (no host copy between them), and the output equals the same runner's plain greedy."""
    from specdeploy.models.loader import load_model
    from specdeploy.runtime.cuda_runner import compiled_for

    target = load_model("smollm2", device="cuda", dtype=torch.float32)
    plain = SpecEngine(target, SpecConfig(method="none"), **_compiled(compiled_for, SpecConfig(method="none"), target))
    spec = SpecConfig(method=method, k=k, tree_size=tree_size)
    engine = SpecEngine(target, spec, **_compiled(compiled_for, spec, target))
    assert engine.runner.num_graphs > 0
    params = SamplingParams(max_new_tokens=MAX_NEW)
    for prompt in PROMPTS:
        ids = plain.encode(prompt, max_new_tokens=MAX_NEW)
        assert engine.generate_ids(ids, params).token_ids == plain.generate_ids(ids, params).token_ids, prompt
    assert engine.task_stats.total().accepted > 0


def _compiled(compiled_for, spec, target) -> dict:
    runner, proposer = compiled_for(spec, target, max_length=256)
    return {"runner": runner, "proposer": proposer}
