"""The CLI contract other tools script against."""
from __future__ import annotations

import json

import pytest

from specdeploy.cli import main

FIELDS = {"task", "text", "token_ids", "alpha", "acceptance_length", "proposed", "accepted", "target_forwards", "tokens_per_s"}


def test_generate_json_per_prompt(capsys, tmp_path, smollm2):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "What is 2+2?", "task": "math"}\n\n{"prompt": "Say hi."}\n')
    assert main(["generate", "--prompts", str(path), "--json", "--method", "ngram", "--k", "2", "--max-new-tokens", "8"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["task"] for r in rows] == ["math", "default"]
    for r in rows:
        assert FIELDS <= r.keys()
        assert 1 <= len(r["token_ids"]) <= 8
        assert r["target_forwards"] >= 1 and r["accepted"] <= r["proposed"]


def test_generate_json_matches_plain_decoding(capsys, smollm2):
    argv = ["generate", "--prompt", "List three colors.", "--json", "--max-new-tokens", "12", "--k", "4"]
    main(argv + ["--method", "none"])
    main(argv + ["--method", "layerskip"])
    plain, spec = (json.loads(line) for line in capsys.readouterr().out.strip().splitlines())
    assert plain["token_ids"] == spec["token_ids"] and plain["text"] == spec["text"]
    assert plain["alpha"] is None and plain["acceptance_length"] == 1.0


@pytest.mark.parametrize("tree", [["--tree-size", "12", "--tree-topk", "3"], ["--tree-size", "0"]])
def test_generate_eagle_tree_flags(capsys, smollm2, tree):
    argv = ["generate", "--prompt", "Write a SQL query that counts users.", "--json", "--max-new-tokens", "12", "--k", "3"]
    main(argv + ["--method", "none"])
    main(argv + ["--method", "eagle", *tree])
    plain, spec = (json.loads(line) for line in capsys.readouterr().out.strip().splitlines())
    assert plain["token_ids"] == spec["token_ids"] and spec["proposed"] > 0


@pytest.mark.parametrize("method", ["ngram", "eagle"])
def test_generate_batch_equals_one_at_a_time(capsys, tmp_path, smollm2, method):
    """--batch 2: three prompts through the batched engine print what plain decoding gives, in order,
    with a stop string cutting one of them as it would alone."""
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "Count from 1 to 10, separated by commas.", "task": "math"}\n'
                    '{"prompt": "Write a SQL query that counts users.", "task": "sql"}\n{"prompt": "Say hi."}\n')
    argv = ["generate", "--prompts", str(path), "--json", "--max-new-tokens", "14", "--k", "3", "--stop", "5"]
    assert main(argv + ["--method", "none"]) == 0
    plain = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert main(argv + ["--method", method, "--batch", "2"]) == 0
    out, err = capsys.readouterr()
    batched = [json.loads(line) for line in out.strip().splitlines()]
    assert [(r["task"], r["token_ids"], r["text"], r["finish_reason"]) for r in batched] == \
           [(r["task"], r["token_ids"], r["text"], r["finish_reason"]) for r in plain]
    assert plain[0]["finish_reason"] == "stop" and sum(r["proposed"] for r in batched) > 0
    assert "batch 2: 3 requests" in err


def test_generate_batch_samples_reproducibly(capsys, tmp_path, smollm2):
    """--batch 2 with --temperature: the batched engine samples (speculative sampling on the device); the
    same --seed gives the same texts, another seed other texts."""
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "Write a short poem about the sea."}\n{"prompt": "Name a fruit."}\n{"prompt": "Say hi."}\n')
    argv = ["generate", "--prompts", str(path), "--json", "--max-new-tokens", "10", "--k", "2", "--method", "eagle",
            "--batch", "2", "--temperature", "1.0"]
    runs = []
    for seed in ("1", "1", "2"):
        assert main(argv + ["--seed", seed]) == 0
        runs.append([json.loads(line)["token_ids"] for line in capsys.readouterr().out.strip().splitlines()])
    assert runs[0] == runs[1] and runs[0] != runs[2] and all(len(r) == 3 for r in runs)


def test_raw_skips_chat_template(capsys, smollm2):
    main(["generate", "--prompt", "The capital of France is", "--raw", "--json", "--max-new-tokens", "3", "--method", "none"])
    r = json.loads(capsys.readouterr().out)
    templated = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=False)
    assert "Paris" in r["text"] and "assistant" in templated


def test_stop_string_cuts_text(capsys, smollm2):
    main(["generate", "--prompt", "Count from 1 to 10, separated by commas.", "--json", "--max-new-tokens", "30", "--stop", "5"])
    r = json.loads(capsys.readouterr().out)
    assert r["finish_reason"] == "stop" and "5" not in r["text"] and "4" in r["text"]


def test_prompts_table_has_speedup(capsys, tmp_path, smollm2):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "Say hi.", "task": "qa"}\n{"prompt": "Write x = 1 in Python.", "task": "code"}\n')
    assert main(["generate", "--prompts", str(path), "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "speedup vs none" in out and "qa" in out and "code" in out and "ngram" in out


def test_demo_runs_ten_tasks(capsys, smollm2):
    assert main(["demo", "--max-new-tokens", "3", "--methods", "ngram"]) == 0
    out = capsys.readouterr().out
    for task in ("code", "creative_writing", "summarization", "qa", "translation", "math", "sql", "api_call", "legal", "customer_support"):
        assert task in out
    assert "greedy outputs differing from plain decoding: 0" in out
