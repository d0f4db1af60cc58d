"""SpecEngine: a target, a proposer and a tokenizer behind `generate(prompt) -> result`.

This is what the CLI, the benchmarks and servers call; the decoding itself is
`speculative_generate`, whatever the runner and the proposer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from specdeploy.config import SamplingParams, SpecConfig
from specdeploy.errors import SpecDeployError
from specdeploy.models.artifacts import is_artifact
from specdeploy.models.layerskip import layerskip_model
from specdeploy.models.loader import LoadedModel, load_model
from specdeploy.models.tokenizers import check_compatible
from specdeploy.runtime.loop import StopCondition, speculative_generate
from specdeploy.runtime.proposers import DraftModelProposer, NGramProposer, NoProposer, Proposer
from specdeploy.runtime.runner import Runner, TorchRunner
from specdeploy.runtime.stats import SpecStats, TaskStats

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class RequestResult:
    task: str
    text: str
    token_ids: list[int]  # generated tokens only
    finish_reason: str
    stats: SpecStats

    def as_json(self) -> dict:
        s = self.stats
        return {
            "task": self.task,
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "alpha": s.alpha,
            "acceptance_length": s.acceptance_length,
            "acceptance_by_position": s.acceptance_by_position,
            "proposed": s.proposed,
            "accepted": s.accepted,
            "target_forwards": s.target_forwards,
            "wall_s": s.wall_s,
            "tokens_per_s": s.tokens_per_s,
        }


def resolve_device(device: str, dtype: str | None) -> tuple[str, torch.dtype]:
    """Check the device exists; default dtype is float32 on CPU and bfloat16 on CUDA."""
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise SpecDeployError(f"unknown device {device!r}; use cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SpecDeployError("--device cuda asked for, but torch sees no CUDA device here")
    name = dtype or ("float32" if device == "cpu" else "bfloat16")
    if name not in DTYPES:
        raise SpecDeployError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return device, DTYPES[name]


def build_proposer(spec: SpecConfig, target: LoadedModel, draft: LoadedModel | None) -> Proposer:
    """The proposer a SpecConfig names, over the loaded target (and draft)."""
    if spec.method == "none":
        return NoProposer()
    if spec.method == "ngram":
        return NGramProposer(spec.ngram_min, spec.ngram_max)
    if spec.method == "layerskip":
        return DraftModelProposer(TorchRunner(layerskip_model(target.model, spec.layerskip_layers)))
    if spec.method == "draft":
        if draft is None:  # a trained DraftLM artifact: --draft PATH, or the shipped default
            from specdeploy.models import draft_lm

            return DraftModelProposer(TorchRunner(draft_lm.load(spec.draft, target)))
        check_compatible(target.tokenizer, draft.tokenizer)
        return DraftModelProposer(TorchRunner(draft.model))
    if spec.method in ("medusa", "eagle", "multi"):
        from specdeploy.runtime.head_proposers import build_head_proposer

        return build_head_proposer(spec, target)
    raise SpecDeployError(f"unknown method {spec.method!r}")


class SpecEngine:
    """Speculative generation for one target and one proposer, with per-task stats."""

    def __init__(self, target: LoadedModel, spec: SpecConfig, draft: LoadedModel | None = None,
                 runner: Runner | None = None) -> None:
        self.target = target
        self.spec = spec
        self.tokenizer = target.tokenizer
        self.proposer = build_proposer(spec, target, draft)
        needs_hidden = getattr(self.proposer, "needs_hidden", False)
        if runner is not None and needs_hidden and not getattr(runner, "output_hidden", False):
            if not isinstance(runner, TorchRunner):
                raise SpecDeployError(f"method {spec.method!r} needs the target's hidden states, "
                                      f"which {type(runner).__name__} does not return")
            runner = None  # a runner of our own over the same model, returning hidden states
        self.runner = runner or TorchRunner(target.model, output_hidden=needs_hidden)
        self.task_stats = TaskStats()
        eos = target.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = frozenset(int(e) for e in eos + [self.tokenizer.eos_token_id] if e is not None)

    @classmethod
    def load(cls, spec: SpecConfig, target: str = "smollm2", device: str = "cpu", dtype: str | None = None) -> "SpecEngine":
        device, torch_dtype = resolve_device(device, dtype)
        loaded = load_model(target, device=device, dtype=torch_dtype)
        draft = None
        if spec.method == "draft" and spec.draft and not is_artifact(spec.draft):
            draft = load_model(spec.draft, device=device, dtype=torch_dtype)
        return cls(loaded, spec, draft)

    def encode(self, prompt: str, raw: bool = False, max_new_tokens: int = 0) -> list[int]:
        """Token ids of a prompt (chat template unless raw); refuses empty or over-long prompts."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise SpecDeployError("empty prompt")
        if raw or not self.tokenizer.chat_template:
            text = prompt
        else:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
        ids = self.tokenizer(text, add_special_tokens=raw)["input_ids"]
        if not ids:
            raise SpecDeployError("the prompt encodes to no tokens")
        if len(ids) + max_new_tokens > self.runner.max_length:
            raise SpecDeployError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context window of {self.runner.max_length} tokens"
            )
        return ids

    def generate_ids(self, prompt_ids: list[int], params: SamplingParams, task: str = "default") -> RequestResult:
        """Generate from already encoded prompt ids."""
        stop = StopCondition(self.eos_ids, params.max_new_tokens, params.stop, self._decode)
        k = self.spec.k if self.spec.method != "none" else 0
        gen = speculative_generate(self.runner, self.proposer, prompt_ids, params, stop, k=k)
        self.task_stats.add(task, gen.stats)
        return RequestResult(task, self._final_text(gen.token_ids, params.stop), gen.token_ids, gen.finish_reason, gen.stats)

    def generate(self, prompt: str, params: SamplingParams, task: str = "default", raw: bool = False) -> RequestResult:
        return self.generate_ids(self.encode(prompt, raw, params.max_new_tokens), params, task)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _final_text(self, ids: list[int], stop: tuple[str, ...]) -> str:
        text = self._decode(ids)
        cut = min((text.find(s) for s in stop if s in text), default=-1)
        return text[:cut] if cut >= 0 else text
