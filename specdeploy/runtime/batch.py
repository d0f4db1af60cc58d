"""Batched speculation on the GPU: many requests advance together, one host sync a step.

Each of `max_batch` slots holds one request at its own length (ragged positions in a static KV
cache, see cuda_runner.py). A step is one CUDA graph that, for every slot at once,

1. drafts k tokens: the n-gram lookup of `NGramProposer` run on the GPU over the slot's token
   history, a draft model (a layerskip draft or a trained one) decoding k tokens greedily, or
   an EAGLE head drafting a chain (`EagleProposer` with tree_size 0) from the target's features;
2. verifies them with one target forward of [pending, d_1 .. d_k] per slot;
3. accepts by the rules of verify.py: greedy (longest draft prefix equal to the target's argmax,
   then the target's argmax: `greedy_accept_batch`, tested equal to `verify`), or, where the engine
   samples, speculative sampling (`verify.sampled_accept_batch`, which `verify` runs for one row:
   drafts kept with probability min(1, p/q), the residual or the target drawn after them);
4. commits: lengths, pending tokens and histories are updated on the device; rolling back is
   a length update.

The host reads one small tensor per step ([slots, k + 3] int64: accepted, proposed, emitted
tokens), one step behind (`overlap`): step t + 1 is launched before step t's tokens are read,
so the GPU never waits for Python. A slot that finished at step t computes one more, ignored,
step. Requests join and leave between steps: a join prefills its slot and resets its state. A
draft model is prefilled with the prompt only while the engine speculates; one that joins during
plain steps catches up over the prompt when speculation resumes.

EAGLE: the target's final hidden state at every committed position is kept per slot (`hidden`,
written by prefills and verify steps). The head's cache holds the pairs (feature at p, token at
p + 1) for p below the slot's `draft_valid`; a spec step feeds the last k + 1 committed pairs
again (those the previous step committed, and some known ones: same values), whose last output
is the feature predicted at the pending position, then drafts the chain from it. The head
catches up over plain steps from `hidden` like a draft model.
Sampling parameters (temperature, top-k, top-p) are the engine's, shared by its requests: they are
part of the captured step. Draws come from torch's default generator, so a seed fixes a whole run,
not each request alone.

Greedy, per-request output equals the request run alone (the target argmax at each position does not
depend on other slots), up to GEMM-shape rounding in low precision; tests check it in fp32.

`SpecSwitch` turns speculation off for the whole batch when it does not pay (large batches,
low acceptance), from measured step times and acceptance lengths, and back on when it does.
"""
from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F

from specdeploy.config import SamplingParams
from specdeploy.errors import SpecDeployError
from specdeploy.models.draft_vocab import DraftVocabLMHead
from specdeploy.models.eagle import EagleHead
from specdeploy.runtime.cuda_runner import CapturedFn, LeanLlama, bucket, graphs_default, kv_buckets_for
from specdeploy.runtime.eagle_graphs import LeanEagleHead
from specdeploy.runtime.loop import StopCondition
from specdeploy.runtime.stats import SpecStats
from specdeploy.runtime.switch import SpecSwitch
from specdeploy.runtime.verify import sample, sampled_accept_batch, sampling_probs

METHODS = ("none", "ngram", "draft", "eagle")  # "draft": any LeanLlama draft (layerskip or trained)
PREFILL_BUCKETS: tuple[int, ...] = (16, 32, 64, 128)
CATCHUP = 64  # tokens per slot fed to a draft model per catch-up pass (after plain steps)


def cache_positions(max_length: int, k: int, prefill_buckets: Sequence[int] = PREFILL_BUCKETS) -> int:
    """KV cache positions per slot: the context, the padding of a last prefill chunk, the over-run
    of one step past max_new_tokens (+ one in flight), and a scratch slot at the very end."""
    return int(max_length) + max(max(prefill_buckets), 2 * (k + 1), CATCHUP) + 1


def greedy_accept_batch(
    draft_tokens: torch.Tensor,  # [B, k] int64 (entries past draft_lens are ignored)
    draft_lens: torch.Tensor,  # [B] int64 usable draft tokens per row, <= k
    target_tokens: torch.Tensor,  # [B, k + 1] int64 target argmax after pending, d_1 .. d_k
) -> tuple[torch.Tensor, torch.Tensor]:
    """verify.py's greedy rule for a batch, on the device: (num_accepted [B], next_token [B]).

    num_accepted = the longest prefix of the row's draft equal to the target's argmax;
    next_token = the target's argmax after it (the recovered or bonus token).
    """
    k = draft_tokens.shape[1]
    if k == 0:
        return torch.zeros_like(target_tokens[:, 0]), target_tokens[:, 0]
    usable = torch.arange(k, device=draft_tokens.device)[None, :] < draft_lens[:, None]
    ok = (draft_tokens == target_tokens[:, :k]) & usable
    n = ok.long().cumprod(dim=1).sum(dim=1)
    return n, target_tokens.gather(1, n[:, None])[:, 0]


def ngram_propose_batch(
    hist: torch.Tensor,  # [B, P] int64 token history, position p = token p (prompt, then generated)
    last: torch.Tensor,  # [B] int64 position of the pending token (the last committed one)
    caps: torch.Tensor,  # [B] int64 most draft tokens allowed per row (0 = none)
    k: int,
    min_n: int,
    max_n: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`NGramProposer.propose` for every row, on the device: (draft [B, k], draft_lens [B]).

    For n from max_n down to min_n: the latest earlier occurrence of the last n committed tokens
    (the match ending before the pending token), drafting the (up to k) tokens that followed it.
    """
    B, P = hist.shape
    dev = hist.device
    j = torch.arange(P, device=dev)[None, :]  # [1, P] candidate match ends
    tail = hist.gather(1, (last[:, None] - torch.arange(max_n, device=dev)[None, :]).clamp(min=0))  # [B, max_n]
    run = torch.ones(B, P, dtype=torch.bool, device=dev)  # run[b, j]: hist[j - t] == tail[t] for all t so far
    ends = []  # latest match end per n, -1 if none
    for t in range(max_n):
        shifted = F.pad(hist, (t, 0))[:, :P]  # shifted[:, j] = hist[:, j - t]
        run = run & (shifted == tail[:, t : t + 1])
        n = t + 1
        ok = run & (j >= n - 1) & (j <= last[:, None] - 1) & (last[:, None] >= n)
        ends.append(torch.where(ok, j, -1).amax(dim=1))
    best = torch.full((B,), -1, dtype=torch.long, device=dev)
    for n in range(max_n, min_n - 1, -1):
        best = torch.where((best < 0) & (ends[n - 1] >= 0), ends[n - 1], best)
    draft = hist.gather(1, (best[:, None] + 1 + torch.arange(k, device=dev)[None, :]).clamp(0, P - 1))
    lens = torch.where(best >= 0, torch.minimum(last - best, caps.clamp(max=k)), torch.zeros_like(best))
    return draft, lens.clamp(min=0)


@dataclass(frozen=True)
class BatchRequest:
    prompt_ids: Sequence[int]
    max_new_tokens: int
    task: str = "default"
    stop_strings: tuple[str, ...] = ()  # end the request once its text holds one (needs the engine's `decode`)


@dataclass(frozen=True)
class BatchResult:
    index: int  # position of the request in the list given to `run`
    task: str
    token_ids: list[int]  # generated tokens only (EOS included when it ended the text)
    finish_reason: str  # "eos" | "stop" | "length"
    stats: SpecStats  # wall_s: from the request's join to its last token


@dataclass
class _Slot:
    index: int
    request: BatchRequest
    tokens: list[int]  # prompt + generated
    first_step: int  # first step whose results belong to this request
    start: float
    stop: StopCondition
    stats: SpecStats = field(default_factory=lambda: SpecStats(requests=1))
    generated: list[int] = field(default_factory=list)


@dataclass
class _Launched:
    step: int
    spec: bool
    host: torch.Tensor  # [B, k + 3] pinned copy of the step's result
    event: torch.cuda.Event | None  # recorded after the step graph, on CUDA
    started: torch.cuda.Event | float  # before the step graph: an event on CUDA, a host clock otherwise
    copied: torch.cuda.Event | None = None  # recorded after the result's copy to the host


class BatchSpeculator:
    """Greedy speculative decoding of up to `max_batch` requests at once (see module docstring)."""

    def __init__(self, target: LeanLlama, *, method: str = "ngram", draft: LeanLlama | None = None,
                 head: EagleHead | None = None, k: int = 4, max_batch: int = 1, max_length: int = 1024,
                 eos_ids: Sequence[int] = (), ngram_min: int = 1, ngram_max: int = 4, switch: str = "on",
                 overlap: bool = True, use_graphs: bool | None = None,
                 prefill_buckets: Sequence[int] = PREFILL_BUCKETS, decode: Callable[[list[int]], str] | None = None,
                 sampling: SamplingParams | None = None) -> None:
        if method not in METHODS:
            raise SpecDeployError(f"batched method must be one of {', '.join(METHODS)}, not {method!r}")
        if method == "draft" and draft is None:
            raise SpecDeployError("method 'draft' needs a draft LeanLlama")
        if method == "eagle" and head is None:
            raise SpecDeployError("method 'eagle' needs an EAGLE head")
        self.target, self.method, self.draft = target, method, (draft if method == "draft" else None)
        self.k = 0 if method == "none" else int(k)
        self.B, self.max_length = int(max_batch), int(max_length)
        self.eos_ids = frozenset(int(e) for e in eos_ids)
        self.decode = decode  # token ids -> text, for requests with stop strings
        # temperature / top-k / top-p of every request (baked into the step graphs); None: greedy
        self.sampling = sampling if sampling is not None and not sampling.greedy else None
        self.ngram_min, self.ngram_max = ngram_min, ngram_max
        self.switch = SpecSwitch(switch if self.k else "off")
        self.device = target.device
        self.use_graphs = graphs_default(self.device) if use_graphs is None else use_graphs
        self.overlap = overlap and self.device.type == "cuda"
        self.prefill_buckets = tuple(sorted(prefill_buckets))
        self.positions = cache_positions(self.max_length, self.k, self.prefill_buckets)
        self.scratch = self.positions - 1
        self.kv_buckets = kv_buckets_for(self.positions)
        self.tcache = target.new_cache(self.B, self.positions)
        self.head = LeanEagleHead(head, target.embed, target.lm_head, self.positions) if method == "eagle" else None
        vocab = head.draft_vocab if self.head is not None else None  # the head drafts from these ids only
        self.draft_lm = DraftVocabLMHead(target.lm_head, vocab) if vocab is not None else partial(F.linear, weight=target.lm_head)
        self.dcache = (self.draft.new_cache(self.B, self.positions) if self.draft is not None
                       else self.head.new_cache(self.B, self.positions) if self.head is not None else None)
        dev, B, k, long = self.device, self.B, self.k, torch.long
        # per-slot state, on the device: only graphs and joins change it
        self.lengths = torch.zeros(B, dtype=long, device=dev)  # [B] target cache entries (committed - pending)
        self.pending = torch.zeros(B, dtype=long, device=dev)  # [B] last committed token, fed next
        self.prev = torch.zeros(B, dtype=long, device=dev)  # [B] the token before pending
        self.generated = torch.zeros(B, dtype=long, device=dev)  # [B] tokens committed since the prompt
        self.max_new = torch.zeros(B, dtype=long, device=dev)  # [B] the request's max_new_tokens
        self.active = torch.zeros(B, dtype=torch.bool, device=dev)  # [B]
        self.draft_valid = torch.zeros(B, dtype=long, device=dev)  # [B] draft cache entries known good
        self.hist = torch.zeros(B, self.positions, dtype=long, device=dev)  # [B, positions] token at each position
        # [B, positions, H] the target's final hidden state at each position (EAGLE's features)
        self.hidden = (torch.zeros(B, self.positions, target.dims.hidden, dtype=target.dtype, device=dev)
                       if self.head is not None else None)
        self.result = torch.zeros(B, k + 3, dtype=long, device=dev)  # [B, k+3]: accepted, proposed, k+1 tokens
        maxq = self.prefill_buckets[-1]
        self._pf_tokens = torch.zeros(1, maxq, dtype=long, device=dev)  # [1, maxq] prefill input
        self._pf_pos = torch.zeros(1, maxq, dtype=long, device=dev)  # [1, maxq]
        self._pf_row = torch.zeros(1, dtype=long, device=dev)  # [1] slot being prefilled
        self._offsets = torch.arange(max(maxq, k + 1, CATCHUP), device=dev)
        self._keys = torch.arange(self.positions, device=dev)
        self._rows = torch.arange(B, device=dev)
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._stream = torch.cuda.Stream(self.device) if self.use_graphs else None  # warm-up and capture
        self._fns: dict[tuple, CapturedFn] = {}
        self._hosts = [self._host_buffer() for _ in range(2)]
        self.steps = 0
        self.slots: list[_Slot | None] = [None] * B
        self._draft_behind = 0  # most committed tokens a live slot's draft cache may lack (catch-up passes)
        self._in_flight_width = self.k + 1  # positions the last launched step wrote per slot
        if self.use_graphs:
            self.capture_all()

    # ---- graphs -------------------------------------------------------------------------
    def _host_buffer(self) -> torch.Tensor:
        buf = torch.zeros(self.B, self.k + 3, dtype=torch.long)
        return buf.pin_memory() if self.device.type == "cuda" else buf

    def _fn(self, key: tuple, make: Callable[[], Callable[[], object]]) -> CapturedFn:
        fn = self._fns.get(key)
        if fn is None:
            fn = self._fns[key] = CapturedFn(make(), self.use_graphs, self._pool, self._stream)
        return fn

    def capture_all(self) -> None:
        """Capture every graph now (at load), then clear the state the warm-ups touched."""
        for kv in self.kv_buckets:
            self._step_fn(False, kv)
            if self.k:
                self._step_fn(True, kv)
            if self.cached_drafter:
                self._catchup_fn(kv)
            for q in self.prefill_buckets:
                if q <= kv:
                    self._prefill_fn(q, kv, draft=False)
                    if self.cached_drafter:
                        self._prefill_fn(q, kv, draft=True)
        self._clear_state()

    def _clear_state(self) -> None:
        for t in (self.lengths, self.pending, self.prev, self.generated, self.max_new, self.draft_valid, self.result):
            t.zero_()
        self.active.zero_()
        self._draft_behind = 0

    @property
    def cached_drafter(self) -> bool:
        """A draft model or EAGLE head with a KV cache of its own (prefilled, caught up after plain steps)."""
        return self.dcache is not None

    @property
    def cache_bytes(self) -> int:
        """Device memory of the per-slot state that grows with max_batch x max_length: KV caches (target,
        draft or head), token history and, for EAGLE, the kept hidden states."""
        tensors = [t for t in (self.hist, self.hidden) if t is not None]
        return (self.tcache.nbytes + (self.dcache.nbytes if self.dcache is not None else 0)
                + sum(t.numel() * t.element_size() for t in tensors))

    @property
    def num_graphs(self) -> int:
        return sum(f.graph is not None for f in self._fns.values())

    def close(self) -> None:
        """Drop the graphs now (their closures refer back to this engine, so only a GC pass would)."""
        self._fns.clear()

    def _prefill_fn(self, q: int, kv: int, draft: bool) -> CapturedFn:
        """A chunk of a joining prompt into the target's cache (and its hidden states, for EAGLE), or the
        drafter's (the head's pairs need the target's chunk first)."""
        tokens, pos, row = self._pf_tokens[:, :q], self._pf_pos[:, :q], self._pf_row

        def make():
            if draft and self.head is not None:
                return lambda: self._head_pairs(pos, kv, row)
            if draft:
                return lambda: self.draft.forward(self.dcache, tokens, pos, row, kv, logits="none")
            if self.hidden is None:
                return lambda: self.target.forward(self.tcache, tokens, pos, row, kv, logits="none")

            def prefill():
                _, hidden = self.target.forward(self.tcache, tokens, pos, row, kv, logits="none", want_hidden=True)
                self.hidden.index_put_((row[:, None], pos), hidden)
            return prefill
        return self._fn(("prefill", draft, q, kv), make)

    def _head_pairs(self, pos: torch.Tensor, kv: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The EAGLE head over the committed pairs at `pos` [R, m] (feature at p, token at p + 1) of cache
        rows `rows` [R] (None: every slot), causal; returns the predicted features [R, m, H]."""
        at = self._rows if rows is None else rows  # [R] slots
        feats = self.hidden[at[:, None], pos]  # [R, m, H]
        tokens = self.hist[at[:, None], (pos + 1).clamp(max=self.scratch)]  # [R, m]
        return self._head(feats, tokens, pos, kv, rows)

    def _head(self, features: torch.Tensor, tokens: torch.Tensor, pos: torch.Tensor, kv: int,
              rows: torch.Tensor | None = None) -> torch.Tensor:
        """Pairs (features [R, m, H], tokens [R, m]) through the EAGLE head at cache positions `pos` [R, m],
        each seeing the positions up to its own; returns the predicted features [R, m, H]."""
        R, m = pos.shape
        allowed = self._keys[None, None, :kv] <= pos[:, :, None]
        return self.head(self.dcache, features, tokens, pos, pos, allowed, rows).view(R, m, -1)

    def _catchup_fn(self, kv: int) -> CapturedFn:
        """Feed the drafter the committed tokens it missed during plain steps (CATCHUP a pass)."""
        def make():
            def catchup():
                pos = (self.draft_valid[:, None] + self._offsets[None, :CATCHUP]).clamp(max=self.scratch - 1)
                if self.head is not None:
                    self._head_pairs(pos, kv)
                else:
                    self.draft.forward(self.dcache, self.hist.gather(1, pos), pos, None, kv, logits="none")
                good = torch.minimum(self.draft_valid + CATCHUP, (self.lengths - 1).clamp(min=0))
                self.draft_valid.copy_(torch.where(self.active, torch.maximum(good, self.draft_valid), self.draft_valid))
            return catchup
        return self._fn(("catchup", kv), make)

    def _step_fn(self, spec: bool, kv: int) -> CapturedFn:
        def make():
            return lambda: self._step_body(spec, kv)
        return self._fn(("step", spec, kv), make)

    def _draw(self, logits: torch.Tensor, probs: list[torch.Tensor]) -> torch.Tensor:
        """A drafter's next token per row from its logits [B, vocab]: the argmax, or (sampling) a draw
        from its sampling distribution, which is appended to `probs`."""
        if self.sampling is None:
            return logits.argmax(-1)
        q = sampling_probs(logits, self.sampling)
        probs.append(q)
        return sample(q)

    def _propose(self, caps: torch.Tensor, kv: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Draft tokens [B, k], usable lengths [B] and the draft distributions [B, k, vocab] (None: greedy,
        or point masses) for every slot."""
        k, L = self.k, self.lengths
        if self.method == "ngram":
            return (*ngram_propose_batch(self.hist, L, caps, k, self.ngram_min, self.ngram_max), None)
        if self.head is not None:
            return self._propose_eagle(caps, kv)
        # draft model: re-feed the token before pending (its entry may be missing after a full
        # accept), then pending, then its own drafts; one graph, no host round trip
        prev_pos = torch.where(L > 0, L - 1, torch.full_like(L, self.scratch))
        feed, pos = torch.stack([self.prev, self.pending], 1), torch.stack([prev_pos, L], 1)
        tokens, probs = [], []
        for i in range(k):
            logits, _ = self.draft.forward(self.dcache, feed, pos, None, kv, logits="last")  # [B, 1, vocab]
            tok = self._draw(logits[:, 0], probs)
            tokens.append(tok)
            feed, pos = tok[:, None], (L + i + 1)[:, None]
        return torch.stack(tokens, 1), caps.clamp(min=0, max=k), torch.stack(probs, 1) if probs else None

    def _propose_eagle(self, caps: torch.Tensor, kv: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """EAGLE chains: the last k + 1 committed pairs again (every pair the previous step committed;
        clamped at position 0, where the same pair is simply fed twice), then k - 1 head steps from the
        feature predicted at the pending position, each drafting from its LM head (`_draw`)."""
        k, L = self.k, self.lengths
        window = (L[:, None] - (k + 1) + self._offsets[None, : k + 1]).clamp(min=0)  # [B, k+1]
        feature = self._head_pairs(window, kv)[:, -1]  # [B, H] at the pending position
        tokens, probs = [], []
        for i in range(k):
            tok = self._draw(self.draft_lm(feature), probs)  # [B]
            tokens.append(tok)
            if i < k - 1:
                pos = (L + i)[:, None]  # the pair (feature at L + i, d_{i+1})
                feature = self._head(feature[:, None], tok[:, None], pos, kv)[:, 0]
        self.draft_valid.copy_(torch.where(self.active, L, self.draft_valid))  # pairs below L: committed ones
        lens = torch.where(L > 0, caps, 0)  # no pair before a one-token prompt
        return torch.stack(tokens, 1), lens, torch.stack(probs, 1) if probs else None

    def _step_body(self, spec: bool, kv: int) -> None:
        k = self.k if spec else 0
        L, act = self.lengths, self.active
        # the loop's budget: never past max_new_tokens or the context window
        caps = torch.minimum(self.max_new - self.generated - 1, self.max_length - L - 1).clamp(min=0, max=k)
        if k:
            draft, lens, draft_probs = self._propose(caps, kv)  # [B, k], [B], [B, k, vocab] or None
        else:
            draft, lens, draft_probs = L.new_zeros(self.B, 0), L.new_zeros(self.B), None
        feed = torch.cat([self.pending[:, None], draft], 1)  # [B, k+1]
        pos = L[:, None] + self._offsets[None, : k + 1]
        logits, hidden = self.target.forward(self.tcache, feed, pos, None, kv, logits="all",
                                             want_hidden=self.hidden is not None)  # [B, k+1, vocab]
        if hidden is not None:  # rows past the accepted ones are rewritten before a pair reads them
            self.hidden.scatter_(1, pos[:, :, None].expand(-1, -1, hidden.shape[-1]), hidden)
        if self.sampling is None:
            n, nxt = greedy_accept_batch(draft, lens, logits.argmax(-1))
        else:
            probs = sampling_probs(logits.reshape(-1, logits.shape[-1]), self.sampling).view(logits.shape)
            n, nxt = sampled_accept_batch(draft, lens, draft_probs, probs)
        emitted = torch.where(self._offsets[None, : k + 1] < n[:, None], feed.roll(-1, dims=1), nxt[:, None])  # [B, k+1]
        if k:
            prev = torch.where(n > 0, draft.gather(1, (n - 1).clamp(min=0)[:, None])[:, 0], self.pending)
        else:
            prev = self.pending
        new_len = L + n + 1
        hist_pos = (L[:, None] + 1 + self._offsets[None, : k + 1]).clamp(max=self.scratch)
        self.hist.scatter_(1, hist_pos, torch.where(act[:, None], emitted, self.hist.gather(1, hist_pos)))
        if spec and self.draft is not None:  # (EAGLE's: set by its draft)
            self.draft_valid.copy_(torch.where(act, new_len - 1, self.draft_valid))
        self.prev.copy_(torch.where(act, prev, self.prev))
        self.pending.copy_(torch.where(act, nxt, self.pending))
        self.generated.copy_(torch.where(act, self.generated + n + 1, self.generated))
        self.lengths.copy_(torch.where(act, new_len, L))
        self.result[:, 0].copy_(n)
        self.result[:, 1].copy_(lens)
        self.result[:, 2 : k + 3].copy_(emitted)

    # ---- requests -----------------------------------------------------------------------
    def check(self, req: BatchRequest) -> None:
        """SpecDeployError if this engine cannot run the request."""
        P = len(req.prompt_ids)
        if P == 0:
            raise SpecDeployError("empty prompt")
        vocab = self.target.dims.vocab
        if any(not 0 <= int(t) < vocab for t in req.prompt_ids):  # on a GPU, a device-side assert would end the process
            raise SpecDeployError(f"prompt token ids must be in [0, {vocab})")
        if not isinstance(req.max_new_tokens, int) or req.max_new_tokens < 1:
            raise SpecDeployError(f"max_new_tokens must be an integer >= 1, got {req.max_new_tokens!r}")
        if P + req.max_new_tokens + self.k + 1 > self.max_length:
            raise SpecDeployError(f"prompt ({P} tokens) + max_new_tokens ({req.max_new_tokens}) + k + 1 exceeds the "
                                  f"batch engine's max_length of {self.max_length}")
        if req.stop_strings and self.decode is None:
            raise SpecDeployError("stop strings need the engine's decode function (a tokenizer)")

    def _join(self, slot: int, index: int, req: BatchRequest) -> None:
        ids = [int(t) for t in req.prompt_ids]
        P = len(ids)
        pre = ids[:-1]
        maxq = self.prefill_buckets[-1]
        # a draft that will not draft soon is not prefilled: the switch, off at large batches, would pay for it
        # at every join; the catch-up before the next spec step feeds it the prompt instead
        with_draft = self.cached_drafter and self.switch.expects_spec()
        if self.cached_drafter and not with_draft:
            self._draft_behind = max(self._draft_behind, P)
        self._pf_row.fill_(slot)
        self.hist[slot, :P].copy_(torch.tensor(ids, dtype=torch.long), non_blocking=True)  # the head's pairs read it
        for start in range(0, len(pre), maxq):
            chunk = pre[start : start + maxq]
            q = bucket(len(chunk), self.prefill_buckets)
            self._pf_tokens[0, : len(chunk)].copy_(torch.tensor(chunk, dtype=torch.long), non_blocking=True)
            torch.add(self._offsets[:q], start, out=self._pf_pos[0, :q])
            kv = bucket(start + q, self.kv_buckets)
            self._prefill_fn(q, kv, draft=False)()
            if with_draft:
                self._prefill_fn(q, kv, draft=True)()
        self.lengths[slot] = P - 1
        self.pending[slot] = ids[-1]
        self.prev[slot] = ids[-2] if P > 1 else ids[-1]
        self.generated[slot] = 0
        self.max_new[slot] = req.max_new_tokens
        self.draft_valid[slot] = P - 1 if with_draft else 0
        self.active[slot] = True
        stop = StopCondition(self.eos_ids, req.max_new_tokens, tuple(req.stop_strings), self.decode)
        self.slots[slot] = _Slot(index, req, list(ids), first_step=self.steps, start=time.perf_counter(), stop=stop)

    def _leave(self, slot: int) -> None:
        self.active[slot] = False
        self.slots[slot] = None

    def _launch(self) -> _Launched:
        live = [s for s in self.slots if s is not None]
        spec = bool(self.k) and self.switch.choose(len(live))
        width = self.k + 1 if spec else 1  # cache positions this step writes per slot
        catchup = spec and self.cached_drafter and self._draft_behind > 0
        # Attention reads the cache below kv, which must pass every position an active slot writes. A slot
        # whose host knows T tokens holds T - 1 + a cache entries on the device, a <= `ahead` being what
        # the step in flight adds (overlap), and writes `width` more (a catch-up pass: CATCHUP from the
        # draft's length, which is no longer), so the last is T + a + width - 2. No more: a speculating
        # engine's plain steps read as few keys as a plain engine's, which the switch compares them with.
        ahead = self._in_flight_width if self.overlap else 0
        need = max(len(s.tokens) for s in live) + ahead + (max(width, CATCHUP) if catchup else width) - 1
        kv = bucket(min(self.positions, need), self.kv_buckets)
        cuda = self.device.type == "cuda"
        started: torch.cuda.Event | float = time.perf_counter()
        if cuda:
            started = torch.cuda.Event(enable_timing=True)
            started.record()
        # the draft's catch-up over the tokens it missed (plain steps, prompts that joined during them) is
        # timed with the spec step that needs it: the switch must see what going back to speculation costs
        if catchup:
            for _ in range(math.ceil(self._draft_behind / CATCHUP)):
                self._catchup_fn(kv)()
        self._draft_behind = 0 if spec else self._draft_behind + 1
        self._in_flight_width = width
        self._step_fn(spec, kv)()
        event = None
        if cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        host = self._hosts[self.steps % 2]
        host.copy_(self.result, non_blocking=True)
        copied = None
        if cuda:
            copied = torch.cuda.Event()
            copied.record()
        launched = _Launched(self.steps, spec, host, event, started, copied)
        self.steps += 1
        return launched

    def _collect(self, launched: _Launched, on_done) -> list[BatchResult]:
        if launched.copied is not None:
            launched.copied.synchronize()  # this step and its copy only: the next step may run on
            seconds = launched.started.elapsed_time(launched.event) / 1e3
        else:
            seconds = time.perf_counter() - launched.started
        res = launched.host.tolist()
        done, tokens, slots = [], 0, 0
        for slot, s in enumerate(self.slots):
            if s is None or launched.step < s.first_step:
                continue
            n, proposed = res[slot][0], res[slot][1]
            s.stats.record_step(proposed, n)
            s.stats.switched_off += not launched.spec and self.switch.mode != "off"  # as in the loop
            slots += 1
            tokens += n + 1
            reason = None
            for tok in res[slot][2 : n + 3]:
                s.generated.append(tok)
                s.tokens.append(tok)
                reason = s.stop.check(s.generated)
                if reason:
                    break
            if reason:
                s.stats.emitted = len(s.generated)
                s.stats.wall_s = time.perf_counter() - s.start
                result = BatchResult(s.index, s.request.task, s.generated, reason, s.stats)
                done.append(result)
                if on_done:
                    on_done(result)
                self._leave(slot)
        self.switch.record(launched.spec, tokens / slots if slots else None, seconds, slots)
        return done

    def run(self, requests: Sequence[BatchRequest], on_done: Callable[[BatchResult], None] | None = None) -> list[BatchResult]:
        """Generate every request, up to max_batch at a time (continuous batching); results in request order.
        Every request is checked before any starts: a bad one raises and changes nothing."""
        for req in requests:
            self.check(req)
        queue = deque(enumerate(requests))
        results: list[BatchResult | None] = [None] * len(requests)
        in_flight: _Launched | None = None
        while queue or in_flight is not None or any(s is not None for s in self.slots):
            for slot in range(self.B):
                if self.slots[slot] is None and queue:
                    index, req = queue.popleft()
                    self._join(slot, index, req)
            launched = self._launch() if any(s is not None for s in self.slots) else None
            if not self.overlap and launched is not None:
                in_flight, launched = launched, None
            if in_flight is not None:
                for r in self._collect(in_flight, on_done):
                    results[r.index] = r
            in_flight = launched
        self._clear_state()
        self.slots = [None] * self.B
        return results  # type: ignore[return-value]
