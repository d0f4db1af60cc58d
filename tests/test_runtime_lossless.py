"""Greedy speculative output equals the target's own greedy `generate`, token for token (fp32, CPU).

Every chain method, k in {1, 2, 4, 8} across them, on 20+ prompts of varied tasks; some end on EOS,
some are cut by max_new_tokens (the reference set is checked to contain both).
"""
from __future__ import annotations

import pytest
import torch

from specdeploy.config import SamplingParams, SpecConfig
from specdeploy.models.layerskip import layerskip_model
from specdeploy.models.loader import load_model
from specdeploy.runtime.engine import SpecEngine
from conftest import assert_matches_reference, greedy_reference

MAX_NEW = 20
PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that returns the square of a number.",
    "Translate to French: Good morning, how are you?",
    "What is 12 + 7?",
    "Write a SQL query that selects all rows from the table users where age > 30.",
    "Summarize: The meeting was moved from Monday to Wednesday because the room was booked.",
    "Repeat exactly: red, green, blue, red, green, blue, red, green, blue",
    "Say hello.",
    "List the days of the week.",
    "Write a haiku about the sea.",
    "Return a JSON object with keys name and age for Alice, 30.",
    "What does HTTP stand for?",
    "Fix the bug: def add(a, b): return a - b",
    "Is 17 a prime number? Answer yes or no.",
    "Explain what a contract clause on termination means, in one sentence.",
    "My order arrived broken. What should I do?",
    "Count from 1 to 10.",
    "Write the alphabet in capital letters separated by spaces.",
    "Reply with only the word OK.",
    "Convert 5 kilometers to meters.",
    "def fibonacci(n):\n    # complete this function",
    "What color is the sky on a clear day?",
]


@pytest.fixture(scope="module")
def reference(smollm2):
    """Prompt ids and the target's own greedy continuation for each prompt."""
    return greedy_reference(smollm2, PROMPTS, MAX_NEW)


@pytest.fixture(scope="module")
def draft_dir(smollm2, tmp_path_factory):
    """A 2-layer draft model on disk: the target's first layers saved as a Hugging Face directory."""
    path = tmp_path_factory.mktemp("draft")
    layerskip_model(smollm2.model, 2).save_pretrained(path)
    smollm2.tokenizer.save_pretrained(path)
    return path


def test_reference_has_eos_and_length_cuts(reference, smollm2):
    ended = [ref[-1] == smollm2.tokenizer.eos_token_id for _, ref in reference]
    assert len(reference) >= 20
    assert any(ended) and not all(ended)
    assert all(len(ref) == MAX_NEW for (_, ref), e in zip(reference, ended) if not e)


def _check(engine: SpecEngine, reference) -> None:
    assert_matches_reference(engine, reference, PROMPTS, MAX_NEW)


# k in {1, 2, 4, 8} across the methods: the loop's budget and rollback do not depend on the
# proposer, and ngram, layerskip and draft differ in where the draft comes from, not in k
@pytest.mark.parametrize("method,k", [("ngram", 1), ("ngram", 8), ("layerskip", 2)])
def test_greedy_equals_target_generate(smollm2, reference, method, k):
    # a 2-layer layerskip draft keeps CI fast; the default depth is covered by the CLI tests. Long chains
    # (k = 8) are ngram's here and every draft model's in test_tree_lossless.py (draft-k6 cases)
    _check(SpecEngine(smollm2, SpecConfig(method=method, k=k, layerskip_layers=2)), reference)


def test_greedy_draft_model_equals_target_generate(smollm2, reference, draft_dir):
    """A draft model loaded from its own directory (as a user's HF checkpoint is). Four prompts: the draft
    model's loop is checked on every prompt by test_tree_lossless.py's draft cases."""
    draft = load_model(draft_dir, dtype=torch.float32)
    assert_matches_reference(SpecEngine(smollm2, SpecConfig(method="draft", k=4), draft=draft), reference[:4],
                             PROMPTS[:4], MAX_NEW)


def test_plain_decoding_equals_target_generate(smollm2, reference):
    _check(SpecEngine(smollm2, SpecConfig(method="none")), reference)


def test_perfect_draft_accepts_everything(smollm2, reference, smollm2_dir):
    """The target as its own draft: every draft token accepted, bonus tokens emitted, same output."""
    draft = load_model(smollm2_dir, dtype=torch.float32)
    engine = SpecEngine(smollm2, SpecConfig(method="draft", k=4), draft=draft)
    _check(engine, reference[:4])
    total = engine.task_stats.total()
    assert total.alpha > 0.95
    assert total.acceptance_length > 3.0


def test_ngram_accepts_on_repetitive_text(smollm2, reference):
    engine = SpecEngine(smollm2, SpecConfig(method="ngram", k=4))
    ids, ref = reference[PROMPTS.index("Repeat exactly: red, green, blue, red, green, blue, red, green, blue")]
    r = engine.generate_ids(ids, SamplingParams(max_new_tokens=MAX_NEW))
    assert r.token_ids == ref
    assert r.stats.accepted > 0 and r.stats.acceptance_length > 1.5
