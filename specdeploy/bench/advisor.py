"""The advisor: will speculation pay on YOUR prompts, for which tasks, with which method and k?

It measures, on this machine and the user's prompts,

1. acceptance per task, from ONE run per method at the largest k (K) over every prompt, and one
   plain run: their wall time per decoding step (prefill included, as users feel it) is each
   method's step time per task at K;
2. the step time at every other k, relative to K: each method runs again at k on one prompt per
   task (the timing prompts), and the ratio of its milliseconds per step there to those of the same
   prompts in the run at K scales the step time at K.

Step times are measured whole, not assembled from timed parts. The parts (drafting synced on
its own, verify at the query length, a per-step overhead) mispriced the methods in opposite
directions on an H200: on code they put an EAGLE k=4 step at 2.16 plain steps (the bench measured
1.79) and a lookup-first multi k=8 step at 1.71 (measured 2.05), so the advised policy ran 1.65x
over the tasks where eagle k=4 alone ran 1.76x (results/bench_history/ee55983: log.txt's advisor
tables against bench.json). Syncing after each draft, which timing it apart needs, also stops the
GPU drafting while the host works: a likely part of EAGLE's overcharge.

Predicting acceptance at any k <= K from the run at K. Let ``reach[i]`` = fraction of decoding
steps whose first i + 1 draft tokens were all accepted (`SpecStats.accepted_at[i] /
target_forwards`) and ``drafted[i]`` = fraction of steps whose draft had at least i + 1 tokens.
A draft of k tokens is the first k tokens of the draft of K tokens (draft models and n-gram
lookup both extend their draft token by token), so at k:

    acceptance length  L(k) = 1 + sum(reach[:k])           (tokens per target forward)
    α(k)                    = sum(reach[:k]) / sum(drafted[:k])
    mean verify length q(k) = 1 + sum(drafted[:k])

(assumption: the mix of contexts the steps see does not depend on k; exact for greedy output,
which is the same for every k). With i.i.d. acceptance of rate α, reach[i] = α^(i+1) and
L(k) = (1 − α^(k+1)) / (1 − α). A token tree cut at depth k (Medusa) is the depth-k tree; an
EAGLE-2 depth-k tree holds at least the depth-<=k nodes of the depth-K tree of the same size,
so L(k) from the run at K is exact for Medusa and a lower bound for EAGLE (greedy).

Expected speedup over plain decoding of a task: tokens per step over time per step, in units of
a plain step, S(k) = L(k) · t_plain / t_method(k).

The textbook formula, for "what if" questions and the bench's check against measurement: a
draft model pays k forwards a step, c = T_draft(1) / T_target(1), and with T_target(k + 1) =
T_target(1) (verify as cheap as one token) and i.i.d. acceptance S = (1 − α^(k+1)) / ((1 −
α)(1 + k·c)); v(k) = T_target(k + 1) / T_target(1) generalises it where verifying k + 1 tokens
costs more (a CPU), and an n-gram lookup pays c once a step (`StepCosts`, `predicted_speedup`).

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
    """Measured milliseconds of the textbook model's parts: the target's verify step by query
    length, and one draft unit (a draft-model forward, or an n-gram lookup)."""

    target_ms: dict[int, float]  # {query length: ms}, 1 included
    draft_ms: float = 0.0
    per_token: bool = True  # a draft model pays draft_ms per drafted token, a lookup once a step

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

    def as_dict(self) -> dict:
        return {"target_ms": {str(q): round(t, 4) for q, t in sorted(self.target_ms.items())},
                "draft_ms": round(self.draft_ms, 4), "per_token": self.per_token, "c": round(self.c, 4)}

    def modelled_step_ms(self, profile: "Profile", k: int) -> float:
        """Drafting + verify of one step at k."""
        draft = self.draft_ms * sum(profile.drafted[:k]) if self.per_token else self.draft_ms
        return draft + self.target(profile.query_length(k))


def predicted_speedup(profile: Profile, k: int, costs: StepCosts) -> float:
    """The textbook model's S(k) from a measured acceptance profile (k <= profile.max_k) and measured parts."""
    if k == 0:
        return 1.0
    if k > profile.max_k:
        raise SpecDeployError(f"cannot predict k={k} from a run at k={profile.max_k}")
    return profile.acceptance_length(k) * costs.target_ms[1] / costs.modelled_step_ms(profile, k)


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


def step_ms(stats: Sequence[SpecStats]) -> float | None:
    """Wall milliseconds per decoding step over some requests (None before any step)."""
    steps = sum(s.target_forwards for s in stats)
    return 1e3 * sum(s.wall_s for s in stats) / steps if steps else None


def task_step_ms(tasks: Sequence[str], stats: Sequence[SpecStats]) -> dict[str, float]:
    """Per task, the median over its requests of wall milliseconds per step: one slow request (a stall,
    a cost paid once) does not decide a task's timing as it would a ratio of sums."""
    per: dict[str, list[float]] = {}
    for task, s in zip(tasks, stats):
        ms = step_ms([s])
        if ms is not None:
            per.setdefault(task, []).append(ms)
    return {t: statistics.median(v) for t, v in per.items()}


@dataclass(frozen=True)
class StepTimes:
    """A method's measured wall milliseconds per decoding step: per task in the run at K, and at
    every k relative to K (the same timing prompts run at k and at K)."""

    at_K: dict[str, float]  # task -> ms per step
    ratio: dict[int, float]  # k -> ms per step at k / at K; K -> 1

    def ms(self, task: str, k: int) -> float:
        return self.at_K[task] * self.ratio[k]

    def as_dict(self) -> dict:
        return {"ms_per_step_at_K": {t: round(v, 4) for t, v in self.at_K.items()},
                "ratio_to_K": {str(k): round(v, 4) for k, v in sorted(self.ratio.items())}}


# ---- recommendations -----------------------------------------------------------------------
@dataclass(frozen=True)
class Option:
    task: str
    method: str
    k: int
    alpha: float | None  # α(k), predicted from the run at K
    acceptance_length: float  # L(k)
    step_ms: float  # a step at k
    plain_ms: float  # a plain step
    expected_speedup: float


@dataclass
class Advice:
    options: list[Option]  # every (task, method, k) considered
    times: dict[str, StepTimes]  # "none" (plain decoding) and each method
    measured: dict[str, dict[str, SpecStats]]  # method -> task -> stats of the run at K
    min_speedup: float = 1.0
    notes: list[str] = field(default_factory=list)
    temperature: float = 0.0  # the sampling temperature the acceptance and times were measured at

    def tasks(self) -> list[str]:
        return list(dict.fromkeys(o.task for o in self.options))

    def best(self, task: str) -> Option | None:
        """The task's option of highest expected speedup among those that accepted any token: an option
        that accepted none emits one token a step at no less than a plain step's cost, so a measured
        speedup above 1 there is timing noise (results/cpu/policy_before_rule.json: qa's n-gram lookup, which never
        matched, at 1.06x)."""
        opts = [o for o in self.options if o.task == task and o.acceptance_length > 1]
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
        extra.update({"advisor": "specdeploy advise: speedup predicted from acceptance per position and measured step times",
                      "min_speedup": self.min_speedup})
        rules = None
        if sampled is not None:
            s_tasks, s_default, s_extra = sampled._rules()
            rules, extra["sampled"] = (s_tasks, s_default), s_extra
        # the switch guards each request: per-task advice comes from a few prompts, and prompts of one task differ
        return Policy(tasks, default, Adaptation(enabled=adaptive, min_k=min(ks), max_k=max(ks)), extra, rules,
                      switch="auto")

    def _rules(self):
        """(tasks, default, {"tasks": evidence, "temperature", "step_times"}) of this advice."""
        from specdeploy.runtime.policy import TaskRule

        tasks, evidence = {}, {}
        for t in self.tasks():
            method, k, b = self.choice(t)
            tasks[t] = TaskRule(method, k)
            evidence[t] = {"expected_speedup": None if b is None else round(b.expected_speedup if k else 1.0, 3),
                           "best_option": None if b is None else {"method": b.method, "k": b.k, "expected_speedup": round(b.expected_speedup, 3),
                                                                  "alpha": _r(b.alpha), "acceptance_length": round(b.acceptance_length, 3),
                                                                  "step_ms": round(b.step_ms, 4), "plain_ms": round(b.plain_ms, 4)}}
        # default for unseen tasks: the (method, k) with the best mean expected speedup over tasks
        pool: dict[tuple[str, int], list[float]] = {}
        for o in self.options:
            pool.setdefault((o.method, o.k), []).append(o.expected_speedup)
        (dm, dk), scores = max(pool.items(), key=lambda kv: statistics.mean(kv[1]), default=(("none", 0), [1.0]))
        default = TaskRule(dm, dk) if statistics.mean(scores) >= self.min_speedup else TaskRule("none", 0)
        return tasks, default, {"tasks": evidence, "temperature": self.temperature,
                                "step_times": {m: t.as_dict() for m, t in self.times.items()}}

    def table(self, title: str = "advisor: expected speedup per task (best k per method)"):
        from rich.table import Table

        table = Table(title=title)
        for col in ("task", "method", "α at K", "acc. len at K", "best k", "acc. len at k", "ms/step at k",
                    "plain ms/step", "expected speedup", "decision"):
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
                table.add_row(t if i == 0 else "", m, _f(at_k.alpha), f"{at_k.acceptance_length:.2f}", str(top.k),
                              f"{top.acceptance_length:.2f}", f"{top.step_ms:.3f}", f"{top.plain_ms:.3f}",
                              f"{top.expected_speedup:.2f}x", decision, end_section=i == len(methods) - 1)
        return table


def recommend(measured: dict[str, dict[str, SpecStats]], times: dict[str, StepTimes], ks: Sequence[int],
              min_speedup: float = 1.0) -> Advice:
    """Options for every task × method × k from the runs at K = max(ks) and the measured step
    times ("none": plain decoding, the baseline, not an option), and the advice built on them."""
    options = []
    plain = times["none"]
    for method, by_task in measured.items():
        if method == "none":
            continue
        for task, stats in by_task.items():
            prof = Profile.from_stats(stats)
            for k in sorted(ks):
                if k > prof.max_k > 0 or k not in times[method].ratio:
                    continue  # cannot predict a deeper draft than was run (max_k 0: nothing drafted, L = 1)
                t, p = times[method].ms(task, k), plain.ms(task, 0)
                if t <= 0 or p <= 0:
                    continue  # no decoding step timed (every request ended at its first token)
                options.append(Option(task, method, k, prof.alpha(k), prof.acceptance_length(k), t, p,
                                      prof.acceptance_length(k) * p / t))
    return Advice(options, times, measured, min_speedup)


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


# ---- running it ----------------------------------------------------------------------------
def timing_prompts(prompts) -> list[int]:
    """Indices of the first prompt of each task: the prompts every method runs again at each k."""
    first: dict[str, int] = {}
    for i, p in enumerate(prompts):
        first.setdefault(p.task, i)
    return list(first.values())


def advise(backend, prompts, encoded: list[list[int]], methods: Sequence[str], ks: Sequence[int], params,
           min_speedup: float = 1.0, progress=None) -> Advice:
    """Measure acceptance and step times on `backend` (see bench.backend.Backend) and recommend per task."""
    from specdeploy.runtime.stats import TaskStats

    K = max(ks)
    notes: list[str] = []
    engines = {"none": backend.engine("none", 0)}  # plain decoding: the baseline's step time
    for m in methods:
        if m == "none":
            continue
        try:
            engines[m] = backend.engine(m, K)
        except SpecDeployError as e:
            notes.append(f"{m}: skipped ({e})")
    if len(engines) == 1:
        raise SpecDeployError("no method to advise on: " + "; ".join(notes))
    timing = timing_prompts(prompts)
    warmup = dataclasses.replace(params, max_new_tokens=4)

    def run(engine, idx: Sequence[int]) -> list[SpecStats]:
        engine.generate_ids(encoded[idx[0]], warmup, "warmup")  # first-call allocations and graph captures
        out = []
        for i in idx:
            out.append(engine.generate_ids(encoded[i], params, prompts[i].task).stats)
            if progress:
                progress()
        return out

    def ratios(m: str, base: float | None) -> dict[int, float]:
        """{k: ms per step of `m` at k / `base`} on the timing prompts, for every k but K."""
        out = {}
        for k in sorted(set(ks) - {K}):
            ms = step_ms(run(backend.engine(m, k), timing))
            if ms is not None and base:
                out[k] = ms / base
        return out

    measured, times = {}, {}
    for m, engine in engines.items():
        stats = run(engine, range(len(prompts)))
        by_task = TaskStats()
        for p, s in zip(prompts, stats):
            by_task.add(p.task, s)
        measured[m] = by_task.by_task
        # plain decoding has one step time (k = 0); a method's other k are timed on the timing prompts
        ratio = {0: 1.0} if m == "none" else {K: 1.0, **ratios(m, step_ms([stats[i] for i in timing]))}
        times[m] = StepTimes({t: 0.0 for t in measured[m]} | task_step_ms([p.task for p in prompts], stats), ratio)
    advice = recommend(measured, times, ks, min_speedup)
    advice.notes.extend(notes)
    advice.temperature = params.temperature
    return advice


def advise_temperatures(backend, prompts, encoded: list[list[int]], methods: Sequence[str], ks: Sequence[int],
                        temperatures: Sequence[float], max_new_tokens: int, min_speedup: float = 1.0,
                        adaptive: bool = False, progress=None):
    """(policy, advices): `advise` at each temperature (at most one 0 and one > 0); with both, the
    greedy advice rules greedy requests and the sampled one requests with temperature > 0."""
    from specdeploy.config import SamplingParams

    advices: list[Advice] = []
    for t in check_temperatures(temperatures):  # step times too: a sampled verify costs more than a greedy one
        params = SamplingParams(temperature=t, max_new_tokens=max_new_tokens, seed=0 if t > 0 else None)
        advices.append(advise(backend, prompts, encoded, methods, ks, params, min_speedup, progress))
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
        spec = len(set(methods) - {"none"})  # each at K on every prompt, at every other k on the timing prompts
        per_t = (spec + 1) * len(prompts) + spec * (len(set(ks)) - 1) * len(timing_prompts(prompts))
        task = bar.add_task("advise: measuring α at k=%d and step times" % max(ks), total=per_t * len(set(temps)))
        policy, advices = advise_temperatures(backend, prompts, encoded, methods, ks, temps, args.max_new_tokens,
                                              args.min_speedup, args.adaptive, lambda: bar.advance(task))
    for advice in advices:
        for n in advice.notes:
            console.print(f"[yellow]note:[/] {n}")
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
