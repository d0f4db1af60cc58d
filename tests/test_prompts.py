"""Prompt sets (eval/demo), the JSONL loader, and the offline training-prompt generator."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from specdeploy.bench.tasks import TASKS, Prompt, builtin_prompts, load_prompts
from specdeploy.errors import SpecDeployError
from specdeploy.training import prompt_sources

EXPECTED_TASKS = ("code", "creative_writing", "summarization", "qa", "translation", "math", "sql", "api_call",
                  "legal", "customer_support")


def _norm(s: str) -> str:
    return " ".join(s.casefold().split())


def test_task_labels() -> None:
    assert TASKS == EXPECTED_TASKS


def test_eval_has_eight_per_task() -> None:
    prompts = builtin_prompts("eval")
    counts = Counter(p.task for p in prompts)
    assert set(counts) == set(TASKS)
    assert all(counts[t] >= 8 for t in TASKS), counts
    assert len({p.prompt for p in prompts}) == len(prompts), "duplicate eval prompts"
    assert all(isinstance(p, Prompt) and p.prompt.strip() for p in prompts)


def test_demo_is_subset_of_eval() -> None:
    demo = builtin_prompts("demo")
    assert set(demo) <= set(builtin_prompts("eval"))
    assert Counter(p.task for p in demo) == {t: 2 for t in TASKS}


def test_unknown_builtin_set() -> None:
    with pytest.raises(SpecDeployError):
        builtin_prompts("nope")


def test_load_prompts_ok(tmp_path: Path) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text('{"task": "qa", "prompt": "Hi?"}\n\n   \n{"prompt": "no task"}\n', encoding="utf-8")
    assert load_prompts(f) == [Prompt("qa", "Hi?"), Prompt("default", "no task")]


@pytest.mark.parametrize(
    "bad_line",
    [
        '{"task": "qa", "prompt": ',  # bad JSON
        '{"task": "qa"}',  # missing prompt
        '{"task": "qa", "prompt": "   "}',  # empty prompt
        '{"task": 3, "prompt": "hello"}',  # non-string task
        '{"prompt": 7}',  # non-string prompt
        '["not", "an", "object"]',
    ],
)
def test_load_prompts_errors_name_the_line(tmp_path: Path, bad_line: str) -> None:
    f = tmp_path / "bad.jsonl"
    good = json.dumps({"task": "qa", "prompt": "fine"})
    f.write_text(f"{good}\n\n{bad_line}\n{good}\n", encoding="utf-8")  # the bad line is line 3
    with pytest.raises(SpecDeployError, match=rf"{f.name}:3: "):
        load_prompts(f)


def test_load_prompts_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecDeployError):
        load_prompts(tmp_path / "absent.jsonl")


def test_error_type() -> None:
    assert issubclass(SpecDeployError, ValueError)


N = 25


@pytest.fixture(scope="module")
def train() -> list[Prompt]:
    return prompt_sources.training_prompts(N, seed=0)


def test_training_prompts_deterministic(train: list[Prompt]) -> None:
    assert prompt_sources.training_prompts(N, seed=0) == train
    assert prompt_sources.training_prompts(N, seed=1) != train


def test_training_prompts_cover_all_tasks(train: list[Prompt]) -> None:
    assert Counter(p.task for p in train) == {t: N for t in TASKS}
    assert len({_norm(p.prompt) for p in train}) == len(train), "duplicate training prompts"


def test_training_prompts_disjoint_from_eval(train: list[Prompt]) -> None:
    eval_keys = [_norm(p.prompt) for p in builtin_prompts("eval")]
    for p in train:
        key = _norm(p.prompt)
        assert not any(e in key for e in eval_keys), p.prompt


def test_training_prompts_without_usr_share_doc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prompt_sources, "DOC_ROOT", tmp_path / "no-such-doc-dir")
    prompt_sources._doc_files.cache_clear()
    try:
        out = prompt_sources.training_prompts(5, seed=3)
        manifest = prompt_sources.build_manifest_sources(5, seed=3)
    finally:
        monkeypatch.undo()
        prompt_sources._doc_files.cache_clear()
    assert Counter(p.task for p in out) == {t: 5 for t in TASKS}
    assert manifest["usr_share_doc"]["present"] is False
    assert "usr_share_doc" not in manifest["prompts_per_source"]


def test_manifest_sources(train: list[Prompt]) -> None:
    m = prompt_sources.build_manifest_sources(N, seed=0)
    assert m["tasks"] == list(TASKS)
    assert m["total_prompts"] == len(train)
    assert sum(sum(v.values()) for v in m["prompts_per_task_per_source"].values()) == len(train)
    assert set(m["prompts_per_source"]) <= set(prompt_sources.SOURCES)
    assert m["eval_exclusion"]["eval_prompts"] == len(builtin_prompts("eval"))
    assert m["stdlib"]["files_available"] > 0
    json.dumps(m)  # serializable
    assert "n_per_task" not in prompt_sources.build_manifest_sources()


def test_eval_collisions_are_filtered(monkeypatch: pytest.MonkeyPatch) -> None:
    eval_math = [p.prompt for p in builtin_prompts("eval") if p.task == "math"]
    counter = iter(range(10**6))

    def leaky(rng, corpora) -> str:  # type: ignore[no-untyped-def]
        i = next(counter)
        if i % 2:
            return f"Please help. {eval_math[i % len(eval_math)].upper()}  Thanks!"
        return f"What is {i} plus {i + 1}?"

    monkeypatch.setitem(prompt_sources._GENERATORS, "math", (("template", 1.0, leaky, None),))
    m = prompt_sources.build_manifest_sources(6, seed=0)
    out = prompt_sources.training_prompts(6, seed=0)
    assert m["eval_exclusion"]["candidates_dropped"] > 0
    math = [p.prompt for p in out if p.task == "math"]
    assert len(math) == 6 and all(p.startswith("What is ") for p in math)
