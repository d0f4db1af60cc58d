"""The advisor: will speculation pay on YOUR prompts, for which tasks, with which method and k?

It measures, on this machine and the user's prompts,

1. step costs: the target's verify step at query length 1 and k + 1 (forward + argmax + host
   copy, what a decoding step pays), one draft-model token, one n-gram lookup; for the head
   methods (medusa, eagle, multi), their drafting time per step and their trees' mean verify
   length at each k: the runs of 2 draft at K, and every few steps the same context is drafted
   again at each k, timed apart (a depth-8 EAGLE tree costs twice a depth-2 one);
2. acceptance per task, from ONE run per method at the largest k (K), and one plain run;
3. each method's per-step overhead: the wall time per step of its runs in 2 minus what 1 accounts
   for (the loop's host work: acceptance, tree bookkeeping, cache compaction, hidden-state
   appends). Without it the advisor sent code to Medusa expecting 1.45x and measured 0.90x
   (results/bench at commit fc7fe4f): a tree step's host work is about 1 ms on an H100
   (results/gpu/README.md).

Predicting any k <= K from the run at K. Let ``reach[i]`` = fraction of decoding steps whose
first i + 1 draft tokens were all accepted (`SpecStats.accepted_at[i] / target_forwards`) and
``drafted[i]`` = fraction of steps whose draft had at least i + 1 tokens. A draft of k tokens
is the first k tokens of the draft of K tokens (draft models and n-gram lookup both extend
their draft token by token), so at k:

    acceptance length  L(k) = 1 + sum(reach[:k])           (tokens per target forward)
    α(k)                    = sum(reach[:k]) / sum(drafted[:k])
    mean verify length q(k) = 1 + sum(drafted[:k])

(assumption: the mix of contexts the steps see does not depend on k; exact for greedy output,
which is the same for every k). With i.i.d. acceptance of rate α, reach[i] = α^(i+1) and
L(k) = (1 − α^(k+1)) / (1 − α).

Expected speedup over plain decoding (same runner): tokens per step over time per step, in
units of a plain step,

    S(k) = L(k) · (T_target(1) + o_plain) / (draft cost of a step + T_target(q(k)) + o_method)

with o the per-step overheads of 3 (0 when not measured, as in the textbook formula below).

A draft model pays k forwards a step: draft cost / T_target(1) = k·c, c = T_draft(1) /
T_target(1); an n-gram lookup pays c once a step. With T_target(k + 1) = T_target(1) (verify
as cheap as one token, memory-bound hardware) and i.i.d. acceptance this is the textbook
(1 − α^(k+1)) / ((1 − α)(1 + k·c)); on a CPU the verify step of k + 1 tokens costs more than
one token, which the measured ratio v(k) = T_target(k + 1) / T_target(1) accounts for.

A token tree cut at depth k (Medusa) is the depth-k tree; an EAGLE-2 depth-k tree holds at
least the depth-<=k nodes of the depth-K tree of the same size, so L(k) from the run at K is
exact for Medusa and a lower bound for EAGLE (greedy).

Recommendation per task: the (method, k) of highest S; "off" when even that is below
`min_speedup` (1.0 by default). Acceptance depends on the temperature, so the advice is per
temperature: greedy advice writes the policy's rules, sampled advice its "sampled" section.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from specdeploy.errors import SpecDeployError
from specdeploy.runtime.stats import SpecStats

DRAFT_MODEL_METHODS = ("draft", "layerskip")  # drafting costs k draft forwards a step


# ---- arithmetic ----------------------------------------------------------------------------
def expected_speedup(alpha: float, k: int, c: float, verify_ratio: float = 1.0, per_token: bool = True) -> float:
    """(1 − α^(k+1)) / ((1 − α)(1 + k·c)), generalised: the denominator is k·c + v (v = T_target(k+1) /
    T_target(1), 1 in the textbook formula); `per_token=False` charges c once a step (n-gram lookup)."""
    if not 0 <= alpha <= 1:
        raise SpecDeployError(f"alpha must be in [0, 1], got {alpha}")
    if k < 0 or c < 0 or verify_ratio <= 0:
        raise SpecDeployError("need k >= 0, cost ratio >= 0 and verify ratio > 0")
    if k == 0:
        return 1.0
    return geometric_length(alpha, k) / ((k * c if per_token else c) + verify_ratio)


def geometric_length(alpha: float, k: int) -> float:
    """Expected tokens per target forward with i.i.d. acceptance α: (1 − α^(k+1)) / (1 − α)."""
    return float(k + 1) if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def fit_alpha(acceptance_length: float, k: int) -> float:
    """The i.i.d. per-token α whose expected acceptance length at k equals `acceptance_length` (bisection)."""
    target = min(max(acceptance_length, 1.0), k + 1.0)
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if geometric_length(mid, k) < target else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class Profile:
    """Per-position acceptance of one method on one task, measured at k = len(reach)."""

    steps: int  # target forwards (decoding steps)
    reach: tuple[float, ...]  # [K] fraction of steps whose first i+1 draft tokens were accepted
    drafted: tuple[float, ...]  # [K] fraction of steps whose draft had at least i+1 tokens

    @classmethod
    def from_stats(cls, stats: SpecStats) -> "Profile":
        n = stats.target_forwards
        if n == 0:
            return cls(0, (), ())
        return cls(n, tuple(a / n for a in stats.accepted_at), tuple(p / n for p in stats.proposed_at))

    @property
    def max_k(self) -> int:
        return len(self.reach)

    def acceptance_length(self, k: int) -> float:
        return 1.0 + sum(self.reach[:k])

    def alpha(self, k: int) -> float | None:
        proposed = sum(self.drafted[:k])
        return sum(self.reach[:k]) / proposed if proposed else None

    def query_length(self, k: int) -> float:
        return 1.0 + sum(self.drafted[:k])


@dataclass(frozen=True)
class StepCosts:
    """Measured milliseconds: the target's verify step by query length, and one draft unit."""

    target_ms: dict[int, float]  # {query length: ms}, 1 included
    draft_ms: float = 0.0  # one draft-model forward (per_token) or one lookup / head draft (per step)
    per_token: bool = True
    # token trees (medusa, eagle, multi): the mean verify length measured in the runs at K, used
    # for every k (a shallower tree verifies fewer nodes: conservative), as the depth-based q(k)
    # of a tree would count one node per depth
    verify_query: float | None = None
    overhead_ms: float = 0.0  # per-step wall time the parts above miss, measured in the runs at K
    # token trees: drafting ms and mean verify length per depth k, where timed (else draft_ms, verify_query)
    draft_ms_at: dict[int, float] = field(default_factory=dict)
    verify_query_at: dict[int, float] = field(default_factory=dict)

    def target(self, q: float) -> float:
        """Linear interpolation between measured query lengths (clamped at the ends)."""
        pts = sorted(self.target_ms.items())
        if q <= pts[0][0]:
            return pts[0][1]
        for (q0, t0), (q1, t1) in zip(pts, pts[1:]):
            if q <= q1:
                return t0 + (t1 - t0) * (q - q0) / (q1 - q0)
        return pts[-1][1]

    @property
    def c(self) -> float:
        """Cost ratio: draft unit / target step at query length 1."""
        return self.draft_ms / self.target_ms[1]

    def query(self, profile: "Profile", k: int) -> float:
        """The verify step's query length at k: the tree's measured one at k (or at K), or the profile's."""
        if k in self.verify_query_at:
            return self.verify_query_at[k]
        return self.verify_query if self.verify_query is not None else profile.query_length(k)

    def verify_ratio(self, q: float) -> float:
        return self.target(q) / self.target_ms[1]

    def as_dict(self) -> dict:
        out = {"target_ms": {str(q): round(t, 4) for q, t in sorted(self.target_ms.items())},
               "draft_ms": round(self.draft_ms, 4), "per_token": self.per_token, "c": round(self.c, 4)}
        if self.verify_query is not None:
            out["verify_query"] = round(self.verify_query, 2)
        if self.draft_ms_at:
            out["draft_ms_at"] = {str(k): round(v, 4) for k, v in sorted(self.draft_ms_at.items())}
            out["verify_query_at"] = {str(k): round(v, 2) for k, v in sorted(self.verify_query_at.items())}
        if self.overhead_ms:
            out["overhead_ms"] = round(self.overhead_ms, 4)
        return out

    def modelled_step_ms(self, profile: "Profile", k: int) -> float:
        """Drafting + verify of one step at k, from the component timings (no overhead)."""
        draft = self.draft_ms * sum(profile.drafted[:k]) if self.per_token else self.draft_ms_at.get(k, self.draft_ms)
        return draft + self.target(self.query(profile, k))


def predicted_speedup(profile: Profile, k: int, costs: StepCosts, plain_overhead_ms: float = 0.0) -> float:
    """S(k) from a measured acceptance profile (k <= profile.max_k) and measured costs (module docstring);
    `plain_overhead_ms`: plain decoding's own per-step overhead."""
    if k == 0:
        return 1.0
    if k > profile.max_k:
        raise SpecDeployError(f"cannot predict k={k} from a run at k={profile.max_k}")
    plain = costs.target_ms[1] + plain_overhead_ms
    return profile.acceptance_length(k) * plain / (costs.modelled_step_ms(profile, k) + costs.overhead_ms)


def step_overhead_ms(stats: SpecStats, modelled_ms: float, excluded_s: float = 0.0) -> float:
    """Wall milliseconds per step of measured runs beyond the modelled step time (never negative).
    The runs' wall time includes their prefills, a small share over a generation of many steps;
    `excluded_s`: time inside it that was not decoding (TimedProposer's extra drafts)."""
    if not stats.target_forwards:
        return 0.0
    return max(0.0, 1e3 * (stats.wall_s - excluded_s) / stats.target_forwards - modelled_ms)


# ---- measuring costs -----------------------------------------------------------------------
def time_ms(fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
    """Median wall milliseconds of fn() (fn must sync with the device itself, e.g. by a host copy)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def runner_step_ms(runner, context: list[int], query: int, reps: int) -> float:
    """One decoding step of `runner` at `query` tokens after `context`: forward, argmax, host copy, rollback."""
    runner.reset()
    if len(context) > 1:
        runner.forward(torch.tensor(context[:-1], dtype=torch.long))
    base = runner.length
    feed = torch.tensor((context * (query // len(context) + 1))[-query:], dtype=torch.long)

    def step():
        runner.forward(feed).logits.argmax(-1).tolist()
        runner.rollback(base)

    return time_ms(step, reps)


def measure_costs(target_runner, ks: Sequence[int], context: list[int], draft_runners: dict[str, object] | None = None,
                  ngram: object | None = None, reps: int = 5) -> dict[str, StepCosts]:
    """StepCosts per method: 'none' (target only), each draft model in `draft_runners`, and 'ngram'."""
    queries = sorted({1, *(k + 1 for k in ks if k > 0)})
    target: dict[int, float] = {}
    for q in queries:  # a longer query never costs less: keep the curve monotone against timing noise
        target[q] = max(runner_step_ms(target_runner, context, q, reps), max(target.values(), default=0.0))
    out = {"none": StepCosts(target, 0.0)}
    for method, runner in (draft_runners or {}).items():
        out[method] = StepCosts(target, runner_step_ms(runner, context, 1, reps), per_token=True)
    if ngram is not None:
        from specdeploy.config import SamplingParams
        from specdeploy.runtime.types import Context

        ctx = Context(token_ids=list(context) * 4, prompt_len=len(context), params=SamplingParams())
        kmax = max(ks)
        out["ngram"] = StepCosts(target, time_ms(lambda: ngram.propose(ctx, kmax), max(reps, 20)), per_token=False)
    return out


def _steady_mean(ms: Sequence[float]) -> float:
    """Mean of timings after the first (a first call may compile kernels or fill caches)."""
    return statistics.fmean(ms[1:] if len(ms) > 1 else ms)


def _done(draft):
    """The draft, once the device work behind it is done (a draft left on the device is still being made)."""
    if draft.tokens.is_cuda:
        torch.cuda.synchronize(draft.tokens.device)
    return draft


class TimedProposer:
    """A proposer wrapper recording each draft's wall time (up to the end of the device's work
    behind it) and size; `tree` tells whether any draft was a tree.

    With `ks`, every `every`-th step also drafts the same context again at each of them, timed
    apart (`at_ms`, `at_nodes`; their total in `extra_s`); the step's own draft is returned.
    Re-drafting one context is harmless for the head proposers: their state only follows the
    committed tokens, which the first call of a step has already synced.
    """

    def __init__(self, inner, ks: Sequence[int] = (), every: int = 4) -> None:
        self.inner = inner
        self.needs_hidden = getattr(inner, "needs_hidden", False)
        self.ks, self.every = tuple(ks), every
        self.ms: list[float] = []
        self.nodes: list[int] = []
        self.at_ms: dict[int, list[float]] = {k: [] for k in self.ks}
        self.at_nodes: dict[int, list[int]] = {k: [] for k in self.ks}
        self.extra_s = 0.0
        self.tree = False

    def reset(self) -> None:
        self.inner.reset()

    def propose(self, ctx, k: int):
        t = time.perf_counter()
        draft = _done(self.inner.propose(ctx, k))
        self.ms.append((time.perf_counter() - t) * 1e3)
        self.nodes.append(int(draft.tokens.numel()))
        self.tree = self.tree or draft.is_tree
        if self.ks and len(self.ms) % self.every == 0:
            start = time.perf_counter()
            for kk in self.ks:
                t = time.perf_counter()
                n = int(_done(self.inner.propose(ctx, kk)).tokens.numel())
                self.at_ms[kk].append((time.perf_counter() - t) * 1e3)
                self.at_nodes[kk].append(n)
            self.extra_s += time.perf_counter() - start
        return draft

    def mean_ms(self) -> float:
        """Mean drafting ms per step (0 before any)."""
        return _steady_mean(self.ms) if self.ms else 0.0

    def costs_at(self, K: int) -> tuple[dict[int, float], dict[int, float]]:
        """({k: drafting ms}, {k: verify query length}) per k: the step's own mean at K, shifted by
        the re-drafts' difference between k and K (the step's own draft also syncs new tokens).
        Means, not medians: a lookup-first proposer's steps are a mix of near-free lookups and model
        drafts, and a step's expected cost is their mean (the median is whichever kind is commoner)."""
        if not self.ms or not all(self.at_ms.values()) or K not in self.at_ms:
            return {}, {}
        base = self.mean_ms() - _steady_mean(self.at_ms[K])
        draft = {k: max(0.0, base + _steady_mean(v)) for k, v in self.at_ms.items()}
        return draft, {k: 1.0 + statistics.fmean(v) for k, v in self.at_nodes.items()}


# ---- recommendations -----------------------------------------------------------------------
@dataclass(frozen=True)
class Option:
    task: str
    method: str
    k: int
    alpha: float | None  # α(k), predicted from the run at K
    acceptance_length: float  # L(k)
    c: float
    verify_ratio: float
    expected_speedup: float


@dataclass
class Advice:
    options: list[Option]  # every (task, method, k) considered
    costs: dict[str, StepCosts]
    measured: dict[str, dict[str, SpecStats]]  # method -> task -> stats of the run at K
    min_speedup: float = 1.0
    notes: list[str] = field(default_factory=list)
    temperature: float = 0.0  # the sampling temperature the acceptance was measured at
    step_costs: dict[str, StepCosts] = field(default_factory=dict)  # measure_costs's timings, before the runs

    def tasks(self) -> list[str]:
        return list(dict.fromkeys(o.task for o in self.options))

    def best(self, task: str) -> Option | None:
        opts = [o for o in self.options if o.task == task]
        return max(opts, key=lambda o: o.expected_speedup, default=None)

    def choice(self, task: str) -> tuple[str, int, Option | None]:
        """(method, k) for the task; ("none", 0) when no option reaches min_speedup."""
        b = self.best(task)
        if b is None or b.expected_speedup < self.min_speedup:
            return "none", 0, b
        return b.method, b.k, b

    def policy(self, adaptive: bool = False, sampled: "Advice | None" = None):
        """The Policy of this advice; `sampled`: the advice measured at a temperature > 0, written
        as the policy's sampled section (this one then rules greedy requests only)."""
        from specdeploy.runtime.policy import Adaptation, Policy

        tasks, default, extra = self._rules()
        ks = sorted({o.k for o in self.options})
        extra.update({"costs": {m: c.as_dict() for m, c in self.costs.items()}, "min_speedup": self.min_speedup,
                      "temperature": self.temperature,
                      "advisor": "specdeploy advise: speedup predicted from acceptance per position and measured step costs"})
        rules = None
        if sampled is not None:
            s_tasks, s_default, s_extra = sampled._rules()
            s_extra.update({"temperature": sampled.temperature, "costs": {m: c.as_dict() for m, c in sampled.costs.items()}})
            rules, extra["sampled"] = (s_tasks, s_default), s_extra
        # the switch guards each request: per-task advice comes from a few prompts, and prompts of one task differ
        return Policy(tasks, default, Adaptation(enabled=adaptive, min_k=min(ks), max_k=max(ks)), extra, rules,
                      switch="auto")

    def _rules(self):
        """(tasks, default, {"tasks": evidence}) of this advice."""
        from specdeploy.runtime.policy import TaskRule

        tasks, evidence = {}, {}
        for t in self.tasks():
            method, k, b = self.choice(t)
            tasks[t] = TaskRule(method, k)
            evidence[t] = {"expected_speedup": None if b is None else round(b.expected_speedup if k else 1.0, 3),
                           "best_option": None if b is None else {"method": b.method, "k": b.k, "expected_speedup": round(b.expected_speedup, 3),
                                                                  "alpha": _r(b.alpha), "acceptance_length": round(b.acceptance_length, 3)}}
        # default for unseen tasks: the (method, k) with the best mean expected speedup over tasks
        pool: dict[tuple[str, int], list[float]] = {}
        for o in self.options:
            pool.setdefault((o.method, o.k), []).append(o.expected_speedup)
        (dm, dk), scores = max(pool.items(), key=lambda kv: statistics.mean(kv[1]), default=(("none", 0), [1.0]))
        default = TaskRule(dm, dk) if statistics.mean(scores) >= self.min_speedup else TaskRule("none", 0)
        return tasks, default, {"tasks": evidence}

    def table(self, title: str = "advisor: expected speedup per task (best k per method)"):
        from rich.table import Table

        table = Table(title=title)
        for col in ("task", "method", "α at K", "acc. len at K", "c", "best k", "v(k)", "overhead ms", "expected speedup",
                    "decision"):
            table.add_column(col, justify="left" if col in ("task", "method", "decision") else "right")
        for t in self.tasks():
            method, k, _ = self.choice(t)
            methods = list(dict.fromkeys(o.method for o in self.options if o.task == t))
            for i, m in enumerate(methods):
                opts = [o for o in self.options if o.task == t and o.method == m]
                top = max(opts, key=lambda o: o.expected_speedup)
                at_k = max(opts, key=lambda o: o.k)
                chosen = method == m and k == top.k
                decision = ("→ " + (f"{m} k={k}" if k else "off")) if (chosen or (k == 0 and i == 0)) else ""
                table.add_row(t if i == 0 else "", m, _f(at_k.alpha), f"{at_k.acceptance_length:.2f}", f"{top.c:.3f}",
                              str(top.k), f"{top.verify_ratio:.2f}", f"{self.costs[m].overhead_ms:.2f}",
                              f"{top.expected_speedup:.2f}x", decision,
                              end_section=i == len(methods) - 1)
        return table


def recommend(measured: dict[str, dict[str, SpecStats]], costs: dict[str, StepCosts], ks: Sequence[int],
              min_speedup: float = 1.0) -> Advice:
    """Options for every task × method × k from the runs at K = max(ks), and the advice built on them.
    A measured "none" is the baseline (its overhead enters every prediction), not an option."""
    options = []
    plain_overhead = costs["none"].overhead_ms if "none" in costs else 0.0
    for method, by_task in measured.items():
        if method == "none":
            continue
        cost = costs[method]
        for task, stats in by_task.items():
            prof = Profile.from_stats(stats)
            for k in sorted(ks):
                if k > prof.max_k and prof.max_k > 0:
                    continue
                if prof.max_k == 0:  # nothing was ever drafted: no gain, only cost
                    options.append(Option(task, method, k, None, 1.0, cost.c, 1.0, 1.0 / (1.0 + (k * cost.c if cost.per_token else cost.c))))
                    continue
                options.append(Option(task, method, k, prof.alpha(k), prof.acceptance_length(k), cost.c,
                                      cost.verify_ratio(cost.query(prof, k)),
                                      predicted_speedup(prof, k, cost, plain_overhead)))
    return Advice(options, costs, measured, min_speedup)


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


# ---- running it ----------------------------------------------------------------------------
def advise(backend, prompts, encoded: list[list[int]], methods: Sequence[str], ks: Sequence[int], params,
           min_speedup: float = 1.0, progress=None, reps: int | None = None,
           step_costs: dict[str, StepCosts] | None = None) -> Advice:
    """Measure costs and acceptance on `backend` (see bench.backend.Backend) and recommend per task.
    `step_costs`: `measure_costs`'s timings from an earlier call (they do not depend on the
    temperature), measured here when None; the advice keeps them as `step_costs`."""
    from specdeploy.runtime.stats import TaskStats

    K = max(ks)
    notes, measured, totals, engines = [], {}, {}, {"none": backend.engine("none", 0)}  # plain: the baseline's overhead
    for m in methods:
        if m == "none":
            continue
        try:
            engines[m] = backend.engine(m, K)
        except SpecDeployError as e:
            notes.append(f"{m}: skipped ({e})")
    if len(engines) == 1:
        raise SpecDeployError("no method to advise on: " + "; ".join(notes))
    reps = reps or (20 if backend.device.startswith("cuda") else 3)
    context = max(encoded, key=len)
    if step_costs is None:
        draft_runners = {m: backend.draft_runner(m) for m in engines if m in DRAFT_MODEL_METHODS}
        step_costs = measure_costs(backend.runner(), ks, context, {m: r for m, r in draft_runners.items() if r is not None},
                                   ngram=engines["ngram"].proposer if "ngram" in engines else None, reps=reps)
    costs = dict(step_costs)
    timed = {m: TimedProposer(e.proposer, ks) for m, e in engines.items() if m not in costs}  # medusa / eagle / multi
    for m, engine in engines.items():
        if m in timed:
            engine.proposer = timed[m]
        stats = TaskStats()
        for p, ids in zip(prompts, encoded):
            stats.add(p.task, engine.generate_ids(ids, params, p.task).stats)
            if progress:
                progress()
        measured[m], totals[m] = stats.by_task, stats.total()
    for m, t in timed.items():  # their drafting and tree verify cost, as measured in those runs
        q = 1.0 + statistics.fmean(t.nodes) if t.nodes else 1.0
        draft_at, query_at = t.costs_at(K) if t.tree else ({}, {})
        target = dict(costs["none"].target_ms)
        for qi in sorted({max(1, round(x)) for x in (q, *query_at.values())}):
            if qi not in target:  # monotone in the query length, as measure_costs keeps it
                below = max((ms for q0, ms in target.items() if q0 < qi), default=0.0)
                target[qi] = max(runner_step_ms(backend.runner(True), context, qi, reps), below)
        costs[m] = StepCosts(target, t.mean_ms(), per_token=False,
                             verify_query=q if t.tree else None, draft_ms_at=draft_at, verify_query_at=query_at)
    for m, total in totals.items():  # what the component timings miss, from the runs' wall time
        modelled = costs[m].modelled_step_ms(Profile.from_stats(total), K)  # plain: T_target(1)
        extra = timed[m].extra_s if m in timed else 0.0
        costs[m] = dataclasses.replace(costs[m], overhead_ms=step_overhead_ms(total, modelled, extra))
    advice = recommend(measured, costs, ks, min_speedup)
    advice.notes.extend(notes)
    advice.temperature, advice.step_costs = params.temperature, step_costs
    return advice


def advise_temperatures(backend, prompts, encoded: list[list[int]], methods: Sequence[str], ks: Sequence[int],
                        temperatures: Sequence[float], max_new_tokens: int, min_speedup: float = 1.0,
                        adaptive: bool = False, progress=None):
    """(policy, advices): `advise` at each temperature (at most one 0 and one > 0); with both, the
    greedy advice rules greedy requests and the sampled one requests with temperature > 0."""
    from specdeploy.config import SamplingParams

    advices: list[Advice] = []
    for t in check_temperatures(temperatures):  # the step timings once: they do not depend on t
        params = SamplingParams(temperature=t, max_new_tokens=max_new_tokens, seed=0 if t > 0 else None)
        advices.append(advise(backend, prompts, encoded, methods, ks, params, min_speedup, progress,
                              step_costs=advices[0].step_costs if advices else None))
    sampled = advices[1] if len(advices) == 2 else None
    return advices[0].policy(adaptive=adaptive, sampled=sampled), advices


def check_temperatures(temperatures: Sequence[float]) -> list[float]:
    """The sorted temperatures to advise at: one, or 0 and one above it."""
    temps = sorted(set(temperatures))
    if not temps or min(temps) < 0 or len(temps) > 2 or (len(temps) == 2 and temps[0] != 0):
        raise SpecDeployError(f"advise at one temperature, or at 0 and one above it; got {list(temperatures)}")
    return temps


def what_if(alpha: float, ks: Sequence[int], c: float, verify_ratio: float = 1.0) -> list[tuple[int, float]]:
    return [(k, expected_speedup(alpha, k, c, verify_ratio)) for k in ks]


def cmd_advise(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console

    console = Console()
    ks = _int_list(args.k, "--k")
    if args.what_if:
        if args.alpha is None or args.cost_ratio is None:
            raise SpecDeployError("--what-if needs --alpha and --cost-ratio (and --k)")
        from rich.table import Table

        table = Table(title=f"what if: α={args.alpha}, c={args.cost_ratio}, v={args.verify_ratio}  "
                            "S = (1 − α^(k+1)) / ((1 − α)(k·c + v))")
        for col in ("k", "acceptance length", "expected speedup", "pays?"):
            table.add_column(col, justify="right")
        for k, s in what_if(args.alpha, ks, args.cost_ratio, args.verify_ratio):
            table.add_row(str(k), f"{geometric_length(args.alpha, k):.3f}", f"{s:.3f}x", "yes" if s >= 1 else "no (off)")
        console.print(table)
        if args.json:
            print(json.dumps([{"k": k, "expected_speedup": s} for k, s in what_if(args.alpha, ks, args.cost_ratio, args.verify_ratio)]))
        return 0
    if not args.prompts:
        raise SpecDeployError("advise needs --prompts FILE.jsonl (or --what-if)")
    from specdeploy.bench.backend import Backend, encode_all
    from specdeploy.bench.run import progress_bar, select_prompts

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        temps = [float(t) for t in str(args.temperature).split(",") if t.strip()]
    except ValueError:
        raise SpecDeployError(f"--temperature takes comma-separated numbers, got {args.temperature!r}") from None
    check_temperatures(temps)  # before loading anything
    prompts = select_prompts(args.prompts, args.prompts_per_task)
    backend = Backend.load(args.target, args.device, args.dtype, runner=args.runner,
                           max_new_tokens=args.max_new_tokens, max_k=max(ks))
    encoded = encode_all(backend, prompts, args.max_new_tokens)
    with progress_bar() as bar:
        runs = len({"none", *methods}) * len(set(temps))  # plain decoding runs too: the baseline's overhead
        task = bar.add_task("advise: measuring α at k=%d" % max(ks), total=runs * len(prompts))
        policy, advices = advise_temperatures(backend, prompts, encoded, methods, ks, temps, args.max_new_tokens,
                                              args.min_speedup, args.adaptive, lambda: bar.advance(task))
    for advice in advices:
        for n in advice.notes:
            console.print(f"[yellow]note:[/] {n}")
        costs = "; ".join(f"{m}: {c.draft_ms:.3f} ms (c={c.c:.3f})" for m, c in advice.costs.items() if m != "none")
        costs += f"; plain decoding's per-step overhead: {advice.costs['none'].overhead_ms:.2f} ms"
        tm = advice.costs["none"].target_ms
        console.print("target verify step: " + ", ".join(f"q={q}: {t:.2f} ms" for q, t in sorted(tm.items())) + f"; draft: {costs}")
        console.print(advice.table(f"advisor at temperature {advice.temperature:g}: expected speedup per task (best k per method)"))
    policy.save(args.out)
    console.print(f"wrote {args.out} (default for other tasks: {policy.default.as_dict()}"
                  + (f"; sampled: {policy.sampled.default.as_dict()})" if policy.sampled else ")"))
    return 0


def _int_list(s: str, flag: str) -> list[int]:
    try:
        out = [int(x) for x in str(s).split(",") if x.strip()]
    except ValueError:
        raise SpecDeployError(f"{flag} takes comma-separated integers, got {s!r}") from None
    if not out or any(k < 1 for k in out):
        raise SpecDeployError(f"{flag} needs integers >= 1, got {s!r}")
    return out


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("advise", help="measure α per task on your prompts and write policy.json (method, k or off per task)")
    p.add_argument("--prompts", help="JSONL prompts with task labels, or 'eval' / 'demo' (built-in sets)")
    p.add_argument("--prompts-per-task", type=int, default=0, help="use at most N prompts per task (0: all)")
    p.add_argument("--methods", default="ngram,layerskip,draft,eagle,multi",
                   help="comma-separated methods to consider (one without a draft for the target is skipped, with a note)")
    p.add_argument("--k", default="1,2,4,8", help="k values to consider (α measured once at the largest)")
    p.add_argument("--out", default="policy.json")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", default="0", help="0, a sampling temperature, or both (0,0.7): a policy "
                   "section per temperature (greedy requests, and those with temperature > 0)")
    p.add_argument("--min-speedup", type=float, default=1.0, help="below this expected speedup a task gets 'off'")
    p.add_argument("--adaptive", action="store_true", help="enable online adaptation in the written policy")
    p.add_argument("--target", default="smollm2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--runner", choices=["auto", "torch", "graph"], default="auto", help="auto: CUDA graphs on cuda, eager torch on cpu")
    p.add_argument("--what-if", action="store_true", help="only evaluate the formula for --alpha, --k, --cost-ratio")
    p.add_argument("--alpha", type=float)
    p.add_argument("--cost-ratio", type=float, help="c = draft step cost / target step cost")
    p.add_argument("--verify-ratio", type=float, default=1.0, help="v = target cost at k+1 tokens / at 1 token")
    p.add_argument("--json", action="store_true", help="with --what-if: also print JSON")
    p.set_defaults(func=cmd_advise)
