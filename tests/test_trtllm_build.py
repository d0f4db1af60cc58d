"""trtllm-build command composition, and the refusal to pretend when TensorRT-LLM is absent.

Flags checked against NVIDIA/TensorRT-LLM:
- tensorrt_llm/commands/build.py (parse_arguments: --checkpoint_dir, --output_dir,
  --max_batch_size, --max_input_len, --max_seq_len, --max_num_tokens, --workers,
  --gather_generation_logits, --speculative_decoding_mode, --max_draft_len);
- tensorrt_llm/plugin/plugin.py (cli_plugin_args: --gemm_plugin, --use_paged_context_fmha);
- examples/draft_target_model/README.md (target: draft_tokens_external + --max_draft_len +
  --use_paged_context_fmha enable), examples/medusa/README.md, examples/eagle/README.md.
"""
from __future__ import annotations

import subprocess

import pytest

from specdeploy.build import trtllm_build
from specdeploy.build.trtllm_build import (TrtllmUnavailable, compose_trtllm_build, plan_trtllm_build,
                                           run_trtllm_build)
from specdeploy.errors import SpecDeployError

BASE = ["trtllm-build", "--checkpoint_dir", "ckpt", "--output_dir", "eng", "--gemm_plugin", "auto",
        "--max_batch_size", "8", "--max_input_len", "2048", "--max_seq_len", "4096"]


def test_plain_build():
    assert compose_trtllm_build("ckpt", "eng") == BASE


def test_draft_target_model_target():
    argv = compose_trtllm_build("ckpt", "eng", speculative_decoding_mode="draft_tokens_external", max_draft_len=5,
                                gemm_plugin="float16", max_batch_size=4, max_input_len=3200, max_seq_len=4800)
    assert argv == ["trtllm-build", "--checkpoint_dir", "ckpt", "--output_dir", "eng", "--gemm_plugin", "float16",
                    "--max_batch_size", "4", "--max_input_len", "3200", "--max_seq_len", "4800",
                    "--use_paged_context_fmha", "enable", "--speculative_decoding_mode", "draft_tokens_external",
                    "--max_draft_len", "5"]


def test_draft_engine_with_logits():
    argv = compose_trtllm_build("ckpt", "eng", use_paged_context_fmha=True, gather_generation_logits=True)
    assert argv == BASE + ["--use_paged_context_fmha", "enable", "--gather_generation_logits"]


def test_medusa_and_eagle():
    assert compose_trtllm_build("ckpt", "eng", speculative_decoding_mode="medusa") == \
        BASE + ["--speculative_decoding_mode", "medusa"]
    assert compose_trtllm_build("ckpt", "eng", speculative_decoding_mode="eagle", max_draft_len=63, workers=2) == \
        BASE + ["--use_paged_context_fmha", "enable", "--speculative_decoding_mode", "eagle",
                "--max_draft_len", "63", "--workers", "2"]


@pytest.mark.parametrize("kw", [
    dict(speculative_decoding_mode="draft_tokens_external"),  # needs max_draft_len
    dict(speculative_decoding_mode="lookahead"),
    dict(max_draft_len=4),  # without a mode
    dict(gemm_plugin="int4"),
    dict(max_input_len=5000, max_seq_len=4096),
    dict(max_batch_size=0),
    dict(speculative_decoding_mode="medusa", max_beam_width=2),
])
def test_bad_options_raise(kw):
    with pytest.raises(SpecDeployError):
        compose_trtllm_build("ckpt", "eng", **kw)


def test_run_without_tensorrt_llm_raises_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(trtllm_build.importlib.util, "find_spec", lambda name: None)
    engine_dir = tmp_path / "engine"
    plan = plan_trtllm_build(tmp_path / "ckpt", engine_dir, speculative_decoding_mode="draft_tokens_external",
                             max_draft_len=4)
    with pytest.raises(TrtllmUnavailable) as err:
        run_trtllm_build(plan)
    assert isinstance(err.value, RuntimeError)
    assert "tensorrt_llm" in str(err.value) and plan.shell() in str(err.value)
    assert not engine_dir.exists()


def test_run_with_tensorrt_llm_calls_trtllm_build(tmp_path, monkeypatch):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    calls = []
    monkeypatch.setattr(trtllm_build.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(trtllm_build.shutil, "which", lambda exe: "/usr/bin/trtllm-build")
    monkeypatch.setattr(trtllm_build.subprocess, "run",
                        lambda argv, check: calls.append(argv) or subprocess.CompletedProcess(argv, 0))
    plan = plan_trtllm_build(tmp_path / "ckpt", tmp_path / "eng")
    assert run_trtllm_build(plan) == tmp_path / "eng"
    assert calls == [list(plan.argv)]


def test_cli_build_backend_trtllm_refuses_cleanly_here(tmp_path, capsys):
    """`specdeploy build --backend trtllm` exits 2 with the command to run, and writes nothing."""
    import importlib.util

    import pytest

    from specdeploy.cli import main

    if importlib.util.find_spec("tensorrt_llm") is not None:
        pytest.skip("tensorrt_llm is installed: the build would really run")
    out = tmp_path / "engine"
    code = main(["build", "--backend", "trtllm", "--from", str(tmp_path), "--out", str(out),
                 "--speculative-decoding-mode", "draft_tokens_external", "--max-draft-len", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "trtllm-build" in err[0] and "--max_draft_len 4" in err[0]
    assert not out.exists()
