"""Compose (and, where TensorRT-LLM is installed, run) the `trtllm-build` command.

TensorRT-LLM is not a dependency of specdeploy: composing the command needs nothing, and
running it raises TrtllmUnavailable (with the exact command to run elsewhere) when the
`tensorrt_llm` module cannot be found. Flags follow NVIDIA/TensorRT-LLM:

- tensorrt_llm/commands/build.py (`parse_arguments`): --checkpoint_dir, --output_dir,
  --max_batch_size, --max_input_len, --max_seq_len, --max_num_tokens, --max_beam_width,
  --workers, --gather_generation_logits, --speculative_decoding_mode
  {draft_tokens_external, lookahead_decoding, medusa, explicit_draft_tokens, eagle},
  --max_draft_len; the plugin flags come from tensorrt_llm/plugin/plugin.py
  (`cli_plugin_args`: --gemm_plugin, --use_paged_context_fmha enable|disable, ...).
- examples/draft_target_model/README.md: the target needs `--speculative_decoding_mode
  draft_tokens_external --max_draft_len K`; `--use_paged_context_fmha enable` (KV-cache
  reuse) on both draft and target; `--gather_generation_logits` on the draft when
  acceptance uses its logits.
- examples/medusa/README.md: `--speculative_decoding_mode medusa` (max_draft_len comes
  from the checkpoint's config.json).
- examples/eagle/README.md: `--use_paged_context_fmha enable --speculative_decoding_mode eagle`.
"""
from __future__ import annotations

import importlib.util
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from specdeploy.errors import SpecDeployError

SPEC_MODES = ("draft_tokens_external", "medusa", "eagle")
GEMM_PLUGINS = ("auto", "float16", "bfloat16", "float32", "fp8", "disable")


class TrtllmUnavailable(RuntimeError):
    """TensorRT-LLM is not installed here, so no engine can be built on this machine."""


@dataclass(frozen=True)
class TrtllmBuildPlan:
    """One trtllm-build invocation: the argv and the directories it reads and writes."""

    checkpoint_dir: Path
    engine_dir: Path
    argv: tuple[str, ...]  # argv[0] == "trtllm-build"
    speculative_decoding_mode: str | None = None
    max_draft_len: int | None = None

    def shell(self) -> str:
        """The command as one shell-quoted line."""
        return shlex.join(self.argv)


def plan_trtllm_build(
    checkpoint_dir: str | Path,
    engine_dir: str | Path,
    *,
    speculative_decoding_mode: str | None = None,
    max_draft_len: int | None = None,
    max_batch_size: int = 8,
    max_input_len: int = 2048,
    max_seq_len: int = 4096,
    max_num_tokens: int | None = None,
    max_beam_width: int = 1,
    gemm_plugin: str = "auto",
    use_paged_context_fmha: bool | None = None,
    gather_generation_logits: bool = False,
    workers: int = 1,
    extra_args: tuple[str, ...] = (),
) -> TrtllmBuildPlan:
    """Validate the options and return the plan.

    use_paged_context_fmha None means: enable it where the upstream examples do
    (draft_tokens_external and eagle), leave trtllm-build's default otherwise.
    For a draft engine, pass speculative_decoding_mode=None, use_paged_context_fmha=True
    and gather_generation_logits=True (logit-based acceptance).
    """
    if speculative_decoding_mode not in (None, *SPEC_MODES):
        raise SpecDeployError(f"speculative_decoding_mode must be None or one of {SPEC_MODES}, "
                              f"got {speculative_decoding_mode!r}")
    if speculative_decoding_mode == "draft_tokens_external" and not max_draft_len:
        raise SpecDeployError("draft_tokens_external needs max_draft_len >= 1 (the K draft tokens per step)")
    if max_draft_len is not None and (max_draft_len < 0 or speculative_decoding_mode is None):
        raise SpecDeployError("max_draft_len needs a speculative_decoding_mode and must be >= 0")
    if gemm_plugin not in GEMM_PLUGINS:
        raise SpecDeployError(f"gemm_plugin must be one of {GEMM_PLUGINS}, got {gemm_plugin!r}")
    for name, value in (("max_batch_size", max_batch_size), ("max_input_len", max_input_len),
                        ("max_seq_len", max_seq_len), ("max_beam_width", max_beam_width), ("workers", workers)):
        if value < 1:
            raise SpecDeployError(f"{name} must be >= 1, got {value}")
    if max_input_len > max_seq_len:
        raise SpecDeployError(f"max_input_len ({max_input_len}) must not exceed max_seq_len ({max_seq_len})")
    if speculative_decoding_mode is not None and max_beam_width > 1:
        raise SpecDeployError("speculative decoding does not support beam search (max_beam_width must be 1)")

    argv = ["trtllm-build", "--checkpoint_dir", str(checkpoint_dir), "--output_dir", str(engine_dir),
            "--gemm_plugin", gemm_plugin, "--max_batch_size", str(max_batch_size),
            "--max_input_len", str(max_input_len), "--max_seq_len", str(max_seq_len)]
    if max_num_tokens is not None:
        argv += ["--max_num_tokens", str(max_num_tokens)]
    if max_beam_width != 1:
        argv += ["--max_beam_width", str(max_beam_width)]
    if use_paged_context_fmha is None:
        use_paged_context_fmha = True if speculative_decoding_mode in ("draft_tokens_external", "eagle") else None
    if use_paged_context_fmha is not None:
        argv += ["--use_paged_context_fmha", "enable" if use_paged_context_fmha else "disable"]
    if gather_generation_logits:
        argv.append("--gather_generation_logits")
    if speculative_decoding_mode is not None:
        argv += ["--speculative_decoding_mode", speculative_decoding_mode]
    if max_draft_len is not None:
        argv += ["--max_draft_len", str(max_draft_len)]
    if workers != 1:
        argv += ["--workers", str(workers)]
    argv += list(extra_args)
    return TrtllmBuildPlan(Path(checkpoint_dir), Path(engine_dir), tuple(argv),
                           speculative_decoding_mode, max_draft_len)


def compose_trtllm_build(checkpoint_dir: str | Path, engine_dir: str | Path, **options: object) -> list[str]:
    """The documented `trtllm-build` argv for these options (see plan_trtllm_build)."""
    return list(plan_trtllm_build(checkpoint_dir, engine_dir, **options).argv)


def run_trtllm_build(plan: TrtllmBuildPlan) -> Path:
    """Run trtllm-build and return the engine directory.

    Raises TrtllmUnavailable (writing nothing) when the tensorrt_llm module is not installed,
    SpecDeployError when the checkpoint is missing, RuntimeError when trtllm-build fails.
    """
    if importlib.util.find_spec("tensorrt_llm") is None:
        raise TrtllmUnavailable(
            "TensorRT-LLM is not installed in this Python environment (the module 'tensorrt_llm' "
            "cannot be found), so no engine was built and nothing was written to "
            f"{plan.engine_dir}. On a machine with an NVIDIA GPU and TensorRT-LLM "
            "(pip install tensorrt_llm, or the NGC TensorRT-LLM container), run:\n  " + plan.shell())
    if not (plan.checkpoint_dir / "config.json").is_file():
        raise SpecDeployError(f"{plan.checkpoint_dir}: no config.json; export a TensorRT-LLM checkpoint first")
    argv = list(plan.argv)
    if shutil.which(argv[0]) is None:  # module present but the console script is not on PATH
        argv = [sys.executable, "-m", "tensorrt_llm.commands.build", *argv[1:]]
    done = subprocess.run(argv, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"trtllm-build failed with exit code {done.returncode}: {shlex.join(argv)}")
    return plan.engine_dir
