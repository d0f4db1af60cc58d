"""The serving side of one spec_decode request, free of Triton types (tests run it in-process).

`SpecDecoder.run(job)` decides the request's method and k (`decide`: the request's
num_draft_tokens, else the repository's `runtime.policy.Policy` for the task, else the
repository's method and k), builds a TritonRunner for the target and that method's proposer
(over a TritonRunner for the draft, behind FallbackProposer) and calls the runtime's
`speculative_generate`: the served path decodes with the very loop the CLI uses.
Streaming hooks into `StopCondition.check`, which the loop calls after every committed token.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Callable

from specdeploy.config import MAX_K, SamplingParams, draft_confidence_for
from specdeploy.errors import SpecDeployError
from specdeploy.runtime.loop import Generation, StopCondition, speculative_generate
from specdeploy.runtime.policy import Decision, Policy
from specdeploy.runtime.switch import SwitchBook
from specdeploy.triton_repo.proposer import FallbackProposer, build_proposer
from specdeploy.triton_repo.runner import Transport, TritonRunner

TASK_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")  # a metrics label: bounded and printable


@dataclass(frozen=True)
class Job:
    """One validated request."""

    prompt_ids: list[int]
    params: SamplingParams
    task: str = "default"
    k: int | None = None  # the request's num_draft_tokens; None: the policy's (or the repository's) k
    stream: bool = False


@dataclass(frozen=True)
class StreamingStop(StopCondition):
    """A StopCondition that also reports every committed token that does not end the text."""

    on_token: Callable[[list[int]], None] | None = None

    def check(self, generated: list[int]) -> str | None:
        reason = super().check(generated)
        if reason is None and self.on_token is not None:
            self.on_token(generated)
        return reason


class RequestCancelled(Exception):
    """The client went away; the request stops at the next committed token."""


@dataclass
class Outcome:
    generation: Generation
    decision: Decision  # the method and k the request ran with, and why
    fallback: BaseException | None = None


@dataclass
class SpecDecoder:
    """Settings of the spec_decode model (from the repository) + the BLS transport."""

    method: str
    k: int
    eos_ids: frozenset[int]
    max_length: int
    vocab_size: int
    transport: Transport
    decode: Callable[[list[int]], str]
    target_model: str = "verify"
    draft_model: str | None = None
    ngram_min: int = 1
    ngram_max: int = 4
    draft_confidence: float | None = None  # None: each method's default
    policy: Policy | None = None  # per-task method / k / off; None: every request gets method and k
    on_fallback: Callable[[str, BaseException], None] | None = None
    switches: SwitchBook = field(default_factory=SwitchBook)  # auto switches, per (task, method, k, greedy)

    @classmethod
    def from_settings(cls, s: dict, transport: Transport, decode: Callable[[list[int]], str], **kw) -> "SpecDecoder":
        return cls(method=s["method"], k=int(s["k"]), eos_ids=frozenset(s["eos_ids"]), max_length=int(s["max_length"]),
                   vocab_size=int(s["vocab_size"]), transport=transport, decode=decode, target_model=s["target_model"],
                   draft_model=s.get("draft_model"), ngram_min=int(s.get("ngram_min", 1)), ngram_max=int(s.get("ngram_max", 4)),
                   draft_confidence=s.get("draft_confidence"),
                   policy=Policy.from_dict(s["policy"]) if s.get("policy") else None, **kw)

    def make_job(self, prompt_ids: list[int], *, max_tokens, temperature=0.0, top_p=1.0, top_k=0, seed=None,
                 stop: tuple[str, ...] = (), task: str | None = None, k=None, stream: bool = False) -> Job:
        """Validate a request (SpecDeployError on anything malformed)."""
        if not prompt_ids:
            raise SpecDeployError("empty prompt")
        params = SamplingParams(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                                seed=None if seed is None else int(seed), max_new_tokens=int(max_tokens), stop=tuple(stop))
        if len(prompt_ids) + params.max_new_tokens > self.max_length:
            raise SpecDeployError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_new_tokens}) exceeds "
                                  f"the context window of {self.max_length} tokens")
        task = task or "default"
        if not TASK_RE.match(task):
            raise SpecDeployError(f"task must match {TASK_RE.pattern}, got {task!r}")
        if k is not None and not (isinstance(k, int) and 0 <= k <= MAX_K):
            raise SpecDeployError(f"num_draft_tokens must be an integer in [0, {MAX_K}], got {k!r}")
        return Job(list(map(int, prompt_ids)), params, task, k, bool(stream))

    def decide(self, job: Job) -> Decision:
        """Method and k for this request; k = 0 is plain decoding. The request's num_draft_tokens
        wins (with the repository's method, reason "request"), then the policy's decision for the
        task, then the repository's method and k (reason "repository")."""
        if job.k is None and self.policy is not None:
            return self.policy.decide(job.task, job.params.temperature)
        k = self.k if job.k is None else job.k
        reason = "request" if job.k is not None else "repository"
        if self.method == "none" or k == 0:
            return Decision(job.task, "none", 0, reason)
        return Decision(job.task, self.method, k, reason)

    def run(self, job: Job, on_tokens: Callable[[list[int]], None] | None = None,
            cancelled: Callable[[], bool] | None = None) -> Outcome:
        """Generate; for a streaming job `on_tokens(generated so far)` after each token that does
        not end the text. `cancelled()` is asked after each token (RequestCancelled if true)."""
        decision = self.decide(job)
        k = decision.k
        target = TritonRunner(self.target_model, self.vocab_size, self.max_length, self.transport)
        draft_runner = None
        if k > 0 and decision.method in ("draft", "layerskip"):
            if self.draft_model is None:
                raise SpecDeployError(f"method {decision.method!r} needs the draft model, which this repository does not serve")
            draft_runner = TritonRunner(self.draft_model, self.vocab_size, self.max_length, self.transport,
                                        sequence_id=target.sequence_id)
        failures: list[BaseException] = []

        def failed(e: BaseException) -> None:
            failures.append(e)
            if self.on_fallback:
                self.on_fallback(job.task, e)

        proposer = FallbackProposer(
            build_proposer(decision.method if k > 0 else "none", draft_runner=draft_runner,
                           ngram_min=self.ngram_min, ngram_max=self.ngram_max,
                           draft_confidence=draft_confidence_for(decision.method, self.draft_confidence)), failed)

        def on_token(generated: list[int]) -> None:
            if cancelled is not None and cancelled():
                raise RequestCancelled(f"cancelled after {len(generated)} tokens")
            if job.stream and on_tokens is not None:
                on_tokens(generated)

        stop = StreamingStop(self.eos_ids, job.params.max_new_tokens, job.params.stop, self.decode, on_token=on_token)
        try:
            switch = self.switches.get(decision.switch, (job.task, decision.method, k, job.params.greedy)) if k > 0 \
                else decision.switch
            gen = speculative_generate(target, proposer, job.prompt_ids, job.params, stop, k=k, switch=switch)
        finally:
            for runner in (target, draft_runner):
                if runner is not None:
                    with contextlib.suppress(Exception):  # the servers evict it anyway
                        runner.release()
        if self.policy is not None and decision.reason not in ("request", "repository"):
            self.policy.observe(decision, gen.stats)  # adaptive policies learn from each request
        return Outcome(gen, decision, failures[0] if failures else None)
