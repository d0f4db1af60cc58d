"""SpecEngine: a target, a proposer and a tokenizer behind `generate(prompt) -> result`.

This is what the CLI, the benchmarks and servers call; the decoding itself is
`speculative_generate`, whatever the runner and the proposer.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from specdeploy.config import HEAD_METHODS, SamplingParams, SpecConfig
from specdeploy.errors import SpecDeployError
from specdeploy.models.artifacts import is_artifact
from specdeploy.models.layerskip import layerskip_model
from specdeploy.models.loader import LoadedModel, load_model
from specdeploy.models.tokenizers import check_compatible, encode_prompt
from specdeploy.runtime.loop import StopCondition, speculative_generate
from specdeploy.runtime.policy import Decision, Policy
from specdeploy.runtime.proposers import DraftModelProposer, NGramProposer, NoProposer, Proposer
from specdeploy.runtime.runner import Runner, TorchRunner
from specdeploy.runtime.stats import SpecStats, TaskStats
from specdeploy.runtime.switch import SwitchBook

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# methods the batched engine (runtime/batch.py) drafts with -> its own name for them
BATCH_METHODS = {"none": "none", "ngram": "ngram", "layerskip": "draft", "draft": "draft", "eagle": "eagle"}


@dataclass(frozen=True)
class RequestResult:
    task: str
    text: str
    token_ids: list[int]  # generated tokens only
    finish_reason: str
    stats: SpecStats
    decision: Decision | None = None  # what the engine's Policy chose for this request, if it has one

    def as_json(self) -> dict:
        s = self.stats
        extra = {"policy": self.decision.as_dict()} if self.decision is not None else {}
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
            **extra,
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
        return DraftModelProposer(TorchRunner(layerskip_model(target.model, spec.layerskip_layers)), spec.confidence)
    if spec.method == "draft":
        if draft is None:  # a trained DraftLM artifact: --draft PATH, or the shipped default
            from specdeploy.models import draft_lm

            return DraftModelProposer(TorchRunner(draft_lm.load(spec.draft, target)), spec.confidence)
        check_compatible(target.tokenizer, draft.tokenizer)
        return DraftModelProposer(TorchRunner(draft.model), spec.confidence)
    if spec.method in HEAD_METHODS:
        from specdeploy.runtime.head_proposers import build_head_proposer

        return build_head_proposer(spec, target)
    raise SpecDeployError(f"unknown method {spec.method!r}")


def build_batch_speculator(spec: SpecConfig, target: LoadedModel, *, max_batch: int, max_length: int,
                           lean=None, draft_model=None, decode=None, sampling: SamplingParams | None = None):
    """A `BatchSpeculator` drafting as `spec` says (chains of spec.k tokens, EAGLE's too) over the target's
    lean forward (`lean`: one already built over it), greedy or sampling as `sampling` says; draft_model:
    the HF draft of method draft (None: the DraftLM artifact spec.draft, default the shipped one). Draft
    confidence does not apply."""
    from specdeploy.runtime.batch import BatchSpeculator
    from specdeploy.runtime.cuda_runner import LeanLlama, lean_draft

    if spec.method not in BATCH_METHODS:
        raise SpecDeployError(f"the batched engine drafts with {', '.join(BATCH_METHODS)}; {spec.method} runs one "
                              f"request at a time (batch 1)")
    lean = lean or LeanLlama.from_hf(target.model)
    draft = lean_draft(spec, target, lean, draft_model) if BATCH_METHODS[spec.method] == "draft" else None
    head = None
    if spec.method == "eagle":
        from specdeploy.models import eagle

        head = eagle.load(spec.draft, target)[0]
    return BatchSpeculator(lean, method=BATCH_METHODS[spec.method], draft=draft, head=head, k=spec.k,
                           max_batch=max_batch, max_length=max_length, eos_ids=target.stop_ids(),
                           ngram_min=spec.ngram_min, ngram_max=spec.ngram_max, switch=spec.switch, decode=decode,
                           sampling=sampling)


class SpecEngine:
    """Speculative generation for one target and one proposer, with per-task stats.

    With a `Policy`, each request's method and k (or plain decoding) come from the policy's
    decision for its task; the decision is recorded in the result and in `policy.summary()`.
    `plain_runner`: a runner of the same target without hidden states, for the requests whose
    proposer needs none (plain decoding then runs exactly as an engine of method none).
    """

    def __init__(self, target: LoadedModel, spec: SpecConfig, draft: LoadedModel | None = None,
                 runner: Runner | None = None, policy: Policy | None = None, proposer: Proposer | None = None,
                 plain_runner: Runner | None = None) -> None:
        self.target = target
        self.spec = spec
        self.tokenizer = target.tokenizer
        self.proposer = proposer or build_proposer(spec, target, draft)
        self.policy = policy
        self._proposers: dict[str, Proposer] = {spec.method: self.proposer, "none": NoProposer()}
        needs_hidden = getattr(self.proposer, "needs_hidden", False)
        if runner is not None and needs_hidden and not getattr(runner, "output_hidden", False):
            if not isinstance(runner, TorchRunner):
                raise SpecDeployError(f"method {spec.method!r} needs the target's hidden states, "
                                      f"which {type(runner).__name__} does not return")
            runner = None  # a runner of our own over the same model, returning hidden states
        self.runner = runner or TorchRunner(target.model, output_hidden=needs_hidden)
        self.plain_runner = plain_runner or self.runner
        self.task_stats = TaskStats()
        self.switches = SwitchBook()  # auto switches, per (task, proposer, k, greedy)
        self.eos_ids = frozenset(target.stop_ids())
        self._batch = None  # the batched engine, built at the first generate_batch

    @classmethod
    def load(cls, spec: SpecConfig, target: str = "smollm2", device: str = "cpu", dtype: str | None = None,
             policy: Policy | str | None = None) -> "SpecEngine":
        if isinstance(policy, str):
            policy = Policy.load(policy)
        device, torch_dtype = resolve_device(device, dtype)
        loaded = load_model(target, device=device, dtype=torch_dtype)
        draft = None
        if spec.method == "draft" and spec.draft and not is_artifact(spec.draft):
            draft = load_model(spec.draft, device=device, dtype=torch_dtype)
        runner = proposer = None
        if device.startswith("cuda"):  # static KV cache + CUDA graphs (chains and token trees) on Llama models
            from specdeploy.runtime.cuda_runner import compiled_for

            runner, proposer = compiled_for(spec, loaded, draft)
        return cls(loaded, spec, draft, runner=runner, policy=policy, proposer=proposer)

    def encode(self, prompt: str, raw: bool = False, max_new_tokens: int = 0) -> list[int]:
        """Token ids of a prompt (chat template unless raw); refuses empty or over-long prompts."""
        ids = encode_prompt(self.tokenizer, prompt, raw)
        if len(ids) + max_new_tokens > self.runner.max_length:
            raise SpecDeployError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context window of {self.runner.max_length} tokens"
            )
        return ids

    def generate_ids(self, prompt_ids: list[int], params: SamplingParams, task: str = "default") -> RequestResult:
        """Generate from already encoded prompt ids."""
        stop = StopCondition(self.eos_ids, params.max_new_tokens, params.stop, self._decode)
        decision = self.policy.decide(task, params.temperature) if self.policy is not None else None
        if decision is None:
            proposer, k, switch = self.proposer, (self.spec.k if self.spec.method != "none" else 0), self.spec.switch
        else:
            proposer, k, switch = self._proposer_for(decision.method), decision.k, decision.switch
        runner = self.runner if getattr(proposer, "needs_hidden", False) else self.plain_runner
        if k > 0:
            switch = self.switches.get(switch, (task, proposer, k, params.greedy))
        gen = speculative_generate(runner, proposer, prompt_ids, params, stop, k=k, switch=switch)
        if decision is not None:
            self.policy.observe(decision, gen.stats)
        self.task_stats.add(task, gen.stats)
        return RequestResult(task, self._final_text(gen.token_ids, params.stop), gen.token_ids, gen.finish_reason,
                             gen.stats, decision)

    def generate_batch(self, prompts_ids: list[list[int]], params: SamplingParams, tasks: list[str] | None = None,
                       max_batch: int = 8) -> list[RequestResult]:
        """Generation of many prompts, up to `max_batch` advancing together (runtime/batch.py: one step drafts
        and verifies for every request; requests join and leave between steps). Greedy, each output equals
        the request generated alone; sampled, each follows the target's distribution, and params.seed
        seeds the whole run. Results in prompt order; every prompt is checked first."""
        from specdeploy.runtime.batch import BatchRequest

        if self.policy is not None:
            raise SpecDeployError("a policy picks the method per task; the batched engine runs one method for all")
        if not isinstance(max_batch, int) or max_batch < 1:
            raise SpecDeployError(f"batch must be an integer >= 1, got {max_batch!r}")
        tasks = tasks or ["default"] * len(prompts_ids)
        if len(tasks) != len(prompts_ids):
            raise SpecDeployError(f"{len(prompts_ids)} prompts but {len(tasks)} task labels")
        if not prompts_ids:
            return []
        # the caches hold max_batch x max_length positions: sized to these prompts, not the model's whole context
        need = max(len(ids) for ids in prompts_ids) + params.max_new_tokens + self.spec.k + 1
        if need > self.runner.max_length:
            raise SpecDeployError(f"a prompt + max_new_tokens ({params.max_new_tokens}) + k + 1 = {need} tokens exceeds "
                                  f"the context window of {self.runner.max_length} tokens")
        max_batch = min(max_batch, len(prompts_ids))  # no slot that would stay empty
        sampling = None if params.greedy else replace(params, seed=None, max_new_tokens=1, stop=())  # what the graphs bake in
        if (self._batch is None or self._batch.B != max_batch or self._batch.max_length < need
                or self._batch.sampling != sampling):
            from specdeploy.runtime.cuda_runner import CudaGraphRunner

            lean = self.runner.model if isinstance(self.runner, CudaGraphRunner) else None  # share its fused weights
            self._batch = build_batch_speculator(self.spec, self.target, max_batch=max_batch, lean=lean, decode=self._decode,
                                                 max_length=min(self.runner.max_length, -(-need // 256) * 256),
                                                 sampling=sampling)
        if params.seed is not None:
            torch.manual_seed(params.seed)
        reqs = [BatchRequest(ids, params.max_new_tokens, task, params.stop) for ids, task in zip(prompts_ids, tasks)]
        out = []
        for r in self._batch.run(reqs):
            self.task_stats.add(r.task, r.stats)
            out.append(RequestResult(r.task, self._final_text(r.token_ids, params.stop), r.token_ids, r.finish_reason, r.stats))
        return out

    def add_proposer(self, method: str, proposer: Proposer) -> None:
        """Use `proposer` whenever the policy names `method` (e.g. one over a compiled draft runner)."""
        if getattr(proposer, "needs_hidden", False) and not getattr(self.runner, "output_hidden", False):
            # without them a head drafts nothing, and the task silently runs as plain decoding
            raise SpecDeployError(f"the policy asks for {method!r}, which needs the target's hidden states; "
                                  f"start the engine with --method {method} so that its runner returns them")
        self._proposers[method] = proposer

    def _proposer_for(self, method: str) -> Proposer:
        """The proposer of a method a policy names (built once, with this engine's spec otherwise)."""
        if method not in self._proposers:
            self.add_proposer(method, build_proposer(replace(self.spec, method=method), self.target, None))
        return self._proposers[method]

    def generate(self, prompt: str, params: SamplingParams, task: str = "default", raw: bool = False) -> RequestResult:
        return self.generate_ids(self.encode(prompt, raw, params.max_new_tokens), params, task)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _final_text(self, ids: list[int], stop: tuple[str, ...]) -> str:
        text = self._decode(ids)
        cut = min((text.find(s) for s in stop if s in text), default=-1)
        return text[:cut] if cut >= 0 else text
