"""speculative_generate: the one decoding loop every runner and proposer goes through."""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from specdeploy.config import SamplingParams
from specdeploy.errors import SpecDeployError
from specdeploy.runtime import kernels as fused_kernels
from specdeploy.runtime.proposers import Proposer
from specdeploy.runtime.runner import Runner, ids_on
from specdeploy.runtime.stats import SpecStats
from specdeploy.runtime.switch import SpecSwitch
from specdeploy.runtime.types import Context, Draft
from specdeploy.runtime.verify import DeviceVerdict, verify


@dataclass(frozen=True)
class StopCondition:
    """When generation ends: an EOS id, a stop string, or max_new_tokens."""

    eos_ids: frozenset[int]
    max_new_tokens: int
    stop_strings: tuple[str, ...] = ()
    decode: Callable[[list[int]], str] | None = None  # needed only for stop strings

    def check(self, generated: list[int]) -> str | None:
        """The finish reason after the last generated token, or None to go on."""
        if generated[-1] in self.eos_ids:
            return "eos"
        if self.stop_strings and any(s in self.decode(generated) for s in self.stop_strings):
            return "stop"
        if len(generated) >= self.max_new_tokens:
            return "length"
        return None

    def ends_within(self, generated: int, tokens: list[int]) -> bool:
        """Will `check` end the request at one of `tokens`, committed after `generated` tokens, by EOS
        or max_new_tokens? (A stop string may still end it earlier.)"""
        return generated + len(tokens) >= self.max_new_tokens or not self.eos_ids.isdisjoint(tokens)


@dataclass(frozen=True)
class Generation:
    token_ids: list[int]  # generated tokens only (EOS included when it ended the text)
    finish_reason: str  # "eos" | "stop" | "length"
    stats: SpecStats


def speculative_generate(
    target: Runner,
    proposer: Proposer,
    prompt_ids: list[int],
    params: SamplingParams,
    stop: StopCondition,
    k: int = 4,
    switch: str | SpecSwitch = "on",
) -> Generation:
    """Generate from `target`, with drafts from `proposer` verified k at a time.

    switch: "on" drafts every step; "auto" lets a `SpecSwitch` decode plain steps wherever this
    request's measured acceptance does not pay for its measured spec step time (the proposer then
    catches up on the skipped tokens at its next draft); "off" is plain decoding. A `SpecSwitch`
    is used as given (tests drive it).

    Invariant: once the last step's rollback is applied, the target's KV cache holds every
    committed token but the last one (the pending token), which is fed first in the next step.
    The next draft is queued as soon as the verdict's tokens are in the context, before the stop
    checks and the rollback, so that on a GPU the drafting overlaps the host's work on the step.

    Where the fused kernels run and the target stages its inputs (`CudaGraphRunner`), a plain step and
    a step of a proposer with `draft_ahead` (EAGLE trees over CUDA graphs) go further: the verdict is
    decided on the device (`DeviceVerdict`: greedy, or sampled point-mass drafts), and before the host
    reads it the next draft is queued from it, the accepted branch's cache entries moved and the next
    verify's inputs staged. Once read, the next verify is a position update and a replay, launched
    before the step's bookkeeping: the GPU does not wait for the host between steps.
    """
    start = time.perf_counter()
    stats = SpecStats(requests=1)
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=target.device).manual_seed(params.seed)
    ctx = Context(token_ids=list(prompt_ids), prompt_len=len(prompt_ids), params=params, generator=generator)
    generated: list[int] = []

    # 0. prefill everything but the pending token
    target.reset()
    proposer.reset()
    if len(prompt_ids) > 1:
        ctx.target_hidden = target.forward(torch.tensor(prompt_ids[:-1], dtype=torch.long)).hidden

    hidden_buffer = None  # storage behind ctx.target_hidden once it grows
    reason = None
    rollback: Callable[[], None] | None = None  # the last step's, applied once the next draft is queued
    spec_switch = switch if isinstance(switch, SpecSwitch) else SpecSwitch(switch if k > 0 else "off")
    on_device = fused_kernels.available(target.device) and hasattr(target, "forward_staged")
    ahead = getattr(proposer, "draft_ahead", None) if on_device and k > 0 else None

    def next_draft(emitted: int) -> tuple[bool, Draft]:
        """Speculate in the next step? and its draft, never past max_new_tokens or the context window
        (`emitted`: tokens this step emits that `generated` does not hold yet)."""
        spec = spec_switch.choose()
        room = target.max_length - len(ctx.token_ids)  # cache positions left after the pending token
        budget = min(k if spec else 0, stop.max_new_tokens - len(generated) - emitted - 1, room)
        draft = proposer.propose(ctx, budget) if budget > 0 else Draft.empty()
        return spec, _fit(draft, budget, room)

    step_start = time.perf_counter()
    spec, draft = next_draft(0)
    launched = None  # (cache length before it, step) of a verify launched from staged inputs
    while True:
        # 1. verify: one target forward scores the pending token and every draft token (chain or tree).
        # A draft left on the device stays there: the verify forward queues behind the drafting, and the
        # verdict's host copy is the step's one sync
        if launched is None:
            if rollback is not None:
                rollback()
            base = target.length
            tokens, parents = _feed(ids_on(draft.tokens.device, ctx.token_ids[-1:]), draft, target)
            step = target.forward(tokens) if parents is None else target.forward(tokens, tree_parents=parents)
        else:
            base, step = launched
        accept = staged = None
        if on_device and (draft.k == 0 or ahead is not None) and (params.greedy or draft.probs is None):
            # decided on the device; before the host reads it, the next draft is queued from it (a draft wasted
            # where the next step goes plain), the accepted branch moved in the cache and the next verify staged
            accept = DeviceVerdict(draft, step.logits, params, generator)
            if not spec_switch.expects_spec():
                staged = Draft.empty()
            elif ahead is not None:
                staged = ahead(ctx, step.hidden, accept, k)
            if draft.is_tree:
                target.gather_path(base + 1, accept.rows[1 : accept.max_count] + base)
            if staged is not None:
                target.stage(*_feed(accept.pending(), staged, target))
            verdict = accept.verdict()
        else:
            verdict = verify(draft, step.logits, params, generator)
        # 2. the KV entries of rejected draft tokens go (a tree keeps its accepted branch, moved already where the
        # verdict was on the device): before the next verify. rows: the step's committed positions
        keep = base + 1 + verdict.num_accepted
        if not draft.is_tree:
            rollback, rows = partial(target.rollback, keep), slice(0, keep - base)  # a view: a chain's prefix
        elif accept is not None:
            rollback, rows = partial(target.rollback, keep), accept.rows[: keep - base]
        else:
            rollback = partial(target.keep_path, base + 1, [base + 1 + i for i in verdict.path])
            rows = ids_on(target.device, [0] + [1 + i for i in verdict.path])
        if step.hidden is not None:  # hidden states of the committed positions, for EAGLE/Medusa
            hidden_buffer, ctx.target_hidden = _append_rows(hidden_buffer, ctx.target_hidden, step.hidden[rows])
        emitted = verdict.emitted(draft)
        ctx.token_ids.extend(emitted)
        # the verdict's tokens are on the host by now: the step's device work is done. A step whose
        # proposer drafted nothing (no lookup match, a draft below its confidence) verified one token
        # like a plain step: it is no evidence against speculation, whose gains come in bursts
        now = time.perf_counter()
        spec_switch.record(spec and draft.k > 0, verdict.num_accepted + 1, now - step_start)
        stats.record_step(verdict.proposed, verdict.num_accepted)
        stats.switched_off += not spec and spec_switch.mode != "off"  # plain decoding is not switched off
        # 3. the next draft is queued before this step's tokens are checked one by one, so that a drafter on
        # the GPU runs while the host does it; not when an EOS or max_new_tokens ends the request here
        # (a stop string among them leaves that draft unused). A staged verify of that draft is launched now.
        step_start = now
        launched = None
        if not stop.ends_within(len(generated), emitted):
            next_spec, next_one = next_draft(len(emitted))
            if staged is not None and (next_one is staged or next_one.k == staged.k == 0):
                rollback()
                launched = target.length, target.forward_staged()
        # 4. commit token by token, so EOS / stop / length cut exactly where they occur
        for token in emitted:
            generated.append(token)
            reason = stop.check(generated)
            if reason:
                break
        if reason:
            break
        spec, draft = next_spec, next_one

    rollback()  # the runner ends with the committed tokens cached (again after a launched verify: a length)
    stats.emitted = len(generated)
    stats.wall_s = time.perf_counter() - start
    return Generation(token_ids=generated, finish_reason=reason, stats=stats)


def _feed(pending: torch.Tensor, draft: Draft, target: Runner) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A verify forward's inputs: the pending token [1] then the draft's tokens, and for a tree the
    parent of each among them (-1: the last cache entry)."""
    tokens = torch.cat([pending.to(draft.tokens.device), draft.tokens]) if draft.k else pending
    if not draft.is_tree:
        return tokens, None
    if not getattr(target, "supports_tree", False):
        raise SpecDeployError(f"{type(target).__name__} cannot score token trees; use a chain draft")
    return tokens, torch.cat([draft.parents.new_full((1,), -1), draft.parents + 1])


def _append_rows(buffer: torch.Tensor | None, rows: torch.Tensor | None,
                 new: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(buffer, rows + new as a view of it): the buffer doubles when full, so appending a few rows
    per step stays linear over a request (a `torch.cat` per step would copy every row so far)."""
    if rows is None:
        return buffer, new
    n, m = rows.shape[0], new.shape[0]
    if buffer is None or buffer.shape[0] < n + m:
        grown = new.new_empty((max(2 * (n + m), 64), *rows.shape[1:]))
        grown[:n] = rows
        buffer = grown
    buffer[n : n + m] = new
    return buffer, buffer[: n + m]


def _fit(draft: Draft, max_depth: int, max_nodes: int) -> Draft:
    """Cut a draft to at most `max_depth` tokens per path and `max_nodes` tokens in all.

    A tree on the device is only cut by its size: reading its depth would be a host sync, and
    a proposer asked for `max_depth` never drafts deeper."""
    if not draft.is_tree:
        if draft.k <= max_depth:
            return draft
        return Draft(draft.tokens[:max_depth], None if draft.probs is None else draft.probs[:max_depth])
    if draft.parents.device.type != "cpu" and draft.k <= max_nodes:
        return draft
    depths = draft.depths()
    keep = [i for i, d in enumerate(depths) if d <= max_depth][:max_nodes]
    if len(keep) == draft.k:
        return draft
    if not keep:
        return Draft.empty()
    # nodes stay in order and a kept node's parent is kept too (it is shallower and earlier)
    new_index = {old: new for new, old in enumerate(keep)}
    parents = [new_index.get(p, -1) for p in draft.parents[keep].tolist()]
    return Draft(tokens=draft.tokens[keep], probs=None if draft.probs is None else draft.probs[keep],
                 parents=torch.tensor(parents, dtype=torch.long))
