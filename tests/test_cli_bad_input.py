"""Bad input: one clear line on stderr, exit code 2, nothing on stdout, nothing written."""
from __future__ import annotations

import json
import shutil

import pytest

from specdeploy.cli import main


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _assert_refused(capsys, argv, needle: str) -> None:
    with pytest.raises(SystemExit) as exc_info:  # argparse-level errors exit through SystemExit
        code = main(argv)
        raise SystemExit(code)
    out, err = capsys.readouterr()
    assert exc_info.value.code == 2, err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert needle in lines[0], lines[0]


BASE = ["generate", "--max-new-tokens", "4"]


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--prompt", ""], "empty prompt"),
        (["--prompt", "   "], "empty prompt"),
        (["--prompt", "hi", "--k", "0"], "k must be"),
        (["--prompt", "hi", "--k", "65"], "k must be"),
        (["--prompt", "hi", "--temperature", "-0.5"], "temperature"),
        (["--prompt", "hi", "--top-p", "0"], "top_p"),
        (["--prompt", "hi", "--top-p", "1.5"], "top_p"),
        (["--prompt", "hi", "--top-k", "-1"], "top_k"),
        (["--prompt", "hi", "--method", "magic"], "unknown method"),
        (["--prompt", "hi", "--method", "eagle", "--tree-topk", "0"], "tree_topk"),
        (["--prompt", "hi", "--method", "eagle", "--tree-size", "-1"], "tree_size"),
        (["--prompt", "hi", "--k", "four"], "invalid int value"),
        (["--prompt", "hi", "--target", "/nonexistent/model.gguf"], "model not found"),
        (["--prompt", "hi", "--method", "draft", "--draft", "/nonexistent/draft"], "model not found"),
        (["--prompt", "hi", "--batch", "0"], "--batch must be"),
        (["--prompt", "hi", "--batch", "2", "--method", "medusa"], "the batched engine drafts with"),
        (["--prompt", "hi", "--batch", "2", "--engine", "/nonexistent/onnx"], "leave out --batch"),
    ],
)
def test_bad_arguments(capsys, extra, needle):
    _assert_refused(capsys, BASE + extra, needle)


def test_prompt_beyond_context(capsys, smollm2):
    _assert_refused(capsys, ["generate", "--prompt", "hi", "--max-new-tokens", "9000"], "exceeds the context window")


def test_corrupt_model_file(capsys, tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    _assert_refused(capsys, BASE + ["--prompt", "hi", "--target", str(bad)], "cannot read GGUF file")


def test_corrupt_model_directory(capsys, tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    _assert_refused(capsys, BASE + ["--prompt", "hi", "--target", str(tmp_path)], "cannot load model")


def test_mismatched_tokenizer(capsys, tmp_path, smollm2_dir):
    """A draft whose tokenizer gained a token is refused before any generation."""
    from transformers import AutoTokenizer

    draft = tmp_path / "draft"
    shutil.copytree(smollm2_dir, draft)
    tok = AutoTokenizer.from_pretrained(draft)
    tok.add_tokens(["<extra_token_xyz>"])
    tok.save_pretrained(draft)
    _assert_refused(capsys, BASE + ["--prompt", "hi", "--method", "draft", "--draft", str(draft)], "tokenizer does not match")


@pytest.mark.parametrize(
    "lines, lineno",
    [
        (['{"prompt": "ok"}', "{broken"], 2),
        (['{"prompt": "ok"}', "", '{"task": "qa"}'], 3),
        (['{"prompt": ""}'], 1),
        (['["a list"]'], 1),
        (['{"prompt": "ok", "task": 5}'], 1),
    ],
)
def test_malformed_jsonl_names_the_line(capsys, tmp_path, lines, lineno):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    _assert_refused(capsys, BASE + ["--prompts", str(path), "--json"], f"{path}:{lineno}:")


def test_one_bad_prompt_refuses_the_whole_file_before_generating(capsys, tmp_path, smollm2):
    """An over-long prompt on line 2 stops the run before line 1 is generated: nothing printed."""
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"prompt": "word " * 9000}) + "\n")
    _assert_refused(capsys, BASE + ["--prompts", str(path), "--json"], "exceeds the context window")


@pytest.mark.parametrize("extra", [["--k", "0"], ["--batch", "0"], ["--batch-passes", "0"], ["--temperature", "-1"]])
def test_bench_refuses_bad_counts_before_writing(capsys, tmp_path, extra):
    _assert_refused(capsys, ["bench", "--out", str(tmp_path / "out"), *extra], "need integers >= 1")
    assert not (tmp_path / "out").exists()
