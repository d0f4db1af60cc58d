"""`specdeploy bench`: every method and its peers, side by side, on the same prompts, in one run.

Rows, per task (and "all") × method × k × temperature × batch:
- specdeploy, batch 1: `speculative_generate` over one shared target runner (eager torch on
  CPU; CUDA graphs, `CudaGraphRunner`, on a GPU), each method's proposer; "none" is plain
  decoding through the same runner: the baseline of `speedup_vs_plain`;
- specdeploy, batch > 1 (greedy and sampled): `specdeploy.runtime.batch.BatchSpeculator` when that module
  exists (recorded as skipped otherwise), against its own plain rows at the same batch;
- peers (`--peers hf`): Hugging Face `generate` eager, assisted generation with the same draft
  models (`assistant_model=`), prompt lookup (`prompt_lookup_num_tokens=`);
- "policy" (a method name): an engine obeying `--policy FILE`, or the advisor's policy measured
  on held-out prompts of the same set. Its requests are timed paired with plain decoding (plain,
  then the policy, prompt by prompt), so that its speedup, which is 1.0 by construction where the
  policy is off, is not buried in the drift between runs minutes apart; the row also records
  `plain_drift`, the paired plain pass against the first one (the run-to-run noise floor).

Per row: tokens/s (a task's tokens over the sum of its requests' wall times, prefill included;
batch > 1: all tokens over the run's wall time), α, acceptance length, acceptance per
position, latency p50/p95, speedup vs plain, greedy outputs differing from plain, and the
analytic expectation (see advisor.py). Writes DIR/bench.json, DIR/bench.md and PNG plots.
"""
from __future__ import annotations

import argparse
import gc
import shlex
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from statistics import median

import torch

from specdeploy.bench.backend import Backend, _has_module, encode_all
from specdeploy.bench.tasks import Prompt, builtin_prompts, load_prompts
from specdeploy.config import METHODS, SamplingParams
from specdeploy.errors import SpecDeployError
from specdeploy.runtime.engine import BATCH_METHODS
from specdeploy.runtime.stats import SpecStats, merged


# ---- prompts and progress ------------------------------------------------------------------
def select_prompts(source: str, per_task: int = 0, skip: int = 0) -> list[Prompt]:
    """Prompts from a JSONL file or a built-in set ('eval', 'demo'); per task, skip `skip` then keep `per_task` (0: all)."""
    prompts = builtin_prompts(source) if source in ("eval", "demo") else load_prompts(source)
    seen: dict[str, int] = defaultdict(int)
    out = []
    for p in prompts:
        seen[p.task] += 1
        if seen[p.task] > skip and (per_task <= 0 or seen[p.task] <= skip + per_task):
            out.append(p)
    if not out:
        raise SpecDeployError(f"no prompts selected from {source}")
    return out


def progress_bar():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from rich.console import Console

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=Console(stderr=True))


# ---- runs ----------------------------------------------------------------------------------
@dataclass
class Run:
    """One configuration over the prompts: what each request produced and its stats."""

    system: str  # "specdeploy" | "hf"
    method: str
    k: int
    temperature: float
    batch: int
    path: str  # "loop" | "fused" | "hf"
    prompts: list[Prompt]
    token_ids: list[list[int]]
    stats: list[SpecStats]
    wall_s: float | None = None  # batch > 1: the whole run's wall time
    decisions: list[dict] = field(default_factory=list)
    notes: str = ""
    baseline: "Run | None" = None  # plain decoding timed paired with this run (else the run's plain row)


class Bench:
    def __init__(self, args: argparse.Namespace, backend: Backend, prompts: list[Prompt], encoded: list[list[int]]) -> None:
        self.args, self.backend, self.prompts, self.encoded = args, backend, prompts, encoded
        self.batch_prompts, self.batch_encoded = prompts, encoded  # batch > 1 rows (may be a larger set)
        self.runs: list[Run] = []
        self.skipped: list[dict] = []
        self.costs: dict = {}
        self._plain_engines: dict = {}  # batch size -> the plain batched engine
        self.bar = None
        self.bar_task = None
        loaded = backend.loaded
        self.eos = loaded.stop_ids()  # as SpecEngine's

    def skip(self, what: str, reason: str) -> None:
        self.skipped.append({"what": what, "reason": reason})
        from rich.console import Console

        Console(stderr=True).print(f"[yellow]skipped[/] {what}: {reason}")

    def _advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.advance(self.bar_task, n)

    def _describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.update(self.bar_task, description=text)

    def params(self, temperature: float, max_new_tokens: int | None = None) -> SamplingParams:
        return SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens or self.args.max_new_tokens,
                              seed=0 if temperature > 0 else None)

    # specdeploy, batch 1
    def loop(self, engine, method: str, k: int, temperature: float, label: str | None = None, paired=None) -> Run:
        """One engine over the prompts at batch 1; `paired`: a plain engine run just before it on each
        prompt, kept as the run's `baseline`."""
        self._describe(f"specdeploy {label or method} k={k} T={temperature}")
        if engine.policy is None:  # (a policy engine reuses runners the other runs warmed up)
            engine.generate_ids(self.encoded[0], self.params(temperature, 4), "warmup")  # first-call allocations
        ids, stats, decisions, plain_ids, plain_stats = [], [], [], [], []
        for p, enc in zip(self.prompts, self.encoded):
            if paired is not None:
                r = paired.generate_ids(enc, self.params(temperature), p.task)
                plain_ids.append(r.token_ids)
                plain_stats.append(r.stats)
            r = engine.generate_ids(enc, self.params(temperature), p.task)
            ids.append(r.token_ids)
            stats.append(r.stats)
            if r.decision is not None:
                decisions.append(r.decision.as_dict())
            self._advance()
        run = Run("specdeploy", label or method, k, temperature, 1, "loop", self.prompts, ids, stats, decisions=decisions)
        if paired is not None:
            run.baseline = Run("specdeploy", "none", 0, temperature, 1, "loop", self.prompts, plain_ids, plain_stats)
        self.runs.append(run)
        return run

    # specdeploy, batch > 1
    def _batch_engine(self, method: str, k: int, batch: int, switch: str, temperature: float):
        """A warmed-up batched engine (sampling at `temperature` > 0)."""
        from specdeploy.runtime.batch import BatchRequest

        eng = self.backend.batch_engine(method, max(k, 1), batch, switch, sampling=self.params(temperature))
        eng.run([BatchRequest(self.batch_encoded[0], 4)])  # warm-up
        return eng

    def _plain_batch_engine(self, batch: int, temperature: float):
        """The plain batched engine of this batch size and temperature, made once and shared by the plain row
        and the paired passes."""
        if (batch, temperature) not in self._plain_engines:
            self._plain_engines[batch, temperature] = self._batch_engine("none", 0, batch, "on", temperature)
        return self._plain_engines[batch, temperature]

    def fused(self, method: str, k: int, batch: int, switch: str = "on", temperature: float = 0.0) -> None:
        """switch "auto": the batch decodes plain steps where speculation does not pay (row "METHOD (auto)").
        A speculative row alternates its passes with a plain engine's, kept as its `baseline`."""
        from specdeploy.runtime.batch import BatchRequest

        label = method if switch == "on" else f"{method} ({switch})"
        self._describe(f"specdeploy {label} k={k} T={temperature:g} batch {batch}")
        reqs = [BatchRequest(enc, self.args.max_new_tokens, p.task) for p, enc in zip(self.batch_prompts, self.batch_encoded)]
        # A pass over the prompts is ~0.5 s on a GPU: one pass measures mostly the switch's first decisions and
        # the machine's noise. Passes on one engine measure what a long-lived server sees; outputs and
        # acceptance are the last pass's, the time the median pass's. The machine's speed drifts by a few
        # percent between rows timed seconds apart, so plain runs pass by pass beside each speculative row.
        plain = self._plain_batch_engine(batch, temperature)
        engines = {"run": plain} if method == "none" else {"run": self._batch_engine(method, k, batch, switch, temperature),
                                                           "plain": plain}
        walls: dict[str, list[float]] = {name: [] for name in engines}
        res: dict[str, list] = {}
        cuda = self.backend.device.startswith("cuda")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for _ in range(self.args.batch_passes):
            for name in reversed(engines):  # plain first
                _sync(self.backend.device)
                t = time.perf_counter()
                res[name] = sorted(engines[name].run(reqs), key=lambda r: r.index)
                _sync(self.backend.device)
                walls[name].append(time.perf_counter() - t)

        def as_run(name: str, run_label: str, run_k: int) -> Run:
            return Run("specdeploy", run_label, run_k, temperature, batch, "fused", self.batch_prompts,
                       [r.token_ids for r in res[name]], [r.stats for r in res[name]], wall_s=median(walls[name]))

        run = as_run("run", label, k)
        run.notes = f"caches {engines['run'].cache_bytes / 2**20:.0f} MiB"
        if cuda:  # everything the process holds: the model, both engines, activations
            run.notes += f", process peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
        if "plain" in engines:
            run.baseline = as_run("plain", "none", 0)
        self.runs.append(run)
        self._advance(len(self.batch_prompts))

    # peers
    def hf(self, name: str, temperature: float, extra: dict, batch: int = 1, k: int = 0) -> None:
        model = self.backend.loaded.model
        params = self.params(temperature)
        kw = dict(max_new_tokens=params.max_new_tokens, pad_token_id=self.eos[0], eos_token_id=self.eos, **extra)
        if temperature > 0:
            kw.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        self._describe(f"hf {name} T={temperature} batch {batch}")
        cap = self.args.peer_time_cap
        prompts, encoded = (self.prompts, self.encoded) if batch == 1 else (self.batch_prompts, self.batch_encoded)
        order = _round_robin(prompts)  # under a time cap, every task still gets its first prompts
        dev = self.backend.device
        self._hf_call(model, [encoded[order[0]]], {**kw, "max_new_tokens": 4})  # warm-up
        done: dict[int, tuple[list[int], float]] = {}
        start = time.perf_counter()
        total_wall = 0.0
        for i in range(0, len(order), batch):
            if cap and time.perf_counter() - start > cap:
                break
            chunk = order[i : i + batch]
            if temperature > 0:
                torch.manual_seed(0)
            t = time.perf_counter()
            outs = self._hf_call(model, [encoded[j] for j in chunk], kw)
            _sync(dev)
            wall = time.perf_counter() - t
            total_wall += wall
            for j, out in zip(chunk, outs):
                done[j] = (out, wall)
            self._advance(len(chunk))
        self._advance(len(order) - len(done))
        idx = sorted(done)
        stats = []
        for j in idx:
            s = SpecStats(requests=1)
            s.emitted, s.wall_s = len(done[j][0]), done[j][1]
            stats.append(s)
        note = "" if len(idx) == len(prompts) else f"{len(idx)} of {len(prompts)} prompts (time cap {cap:g}s)"
        self.runs.append(Run("hf", name, k, temperature, batch, "hf", [prompts[j] for j in idx],
                             [done[j][0] for j in idx], stats, wall_s=total_wall if batch > 1 else None, notes=note))

    def _hf_call(self, model, batch_ids: list[list[int]], kw: dict) -> list[list[int]]:
        dev = self.backend.device
        width = max(len(x) for x in batch_ids)
        ids = torch.full((len(batch_ids), width), self.eos[0], dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, x in enumerate(batch_ids):  # left padding
            ids[r, width - len(x):] = torch.tensor(x)
            mask[r, width - len(x):] = 1
        with torch.inference_mode():
            out = model.generate(ids.to(dev), attention_mask=mask.to(dev), **kw)
        return [_until_eos(row[width:].tolist(), self.eos) for row in out]


def _round_robin(prompts: list[Prompt]) -> list[int]:
    by: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        by[p.task].append(i)
    order, lists = [], list(by.values())
    for r in range(max(len(v) for v in lists)):
        order += [v[r] for v in lists if r < len(v)]
    return order


def _until_eos(ids: list[int], eos: list[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos:
            return ids[: i + 1]
    return ids


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---- rows ----------------------------------------------------------------------------------
def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def build_rows(runs: list[Run], costs: dict) -> list[dict]:
    """Rows per task and 'all' for every run, with speedups against the matching plain run."""
    from specdeploy.bench.advisor import Profile, expected_speedup, fit_alpha, predicted_speedup

    def plain_for(run: Run) -> Run | None:
        path = "fused" if run.batch > 1 else "loop"
        return next((r for r in runs if r.system == "specdeploy" and r.method == "none" and r.batch == run.batch
                     and r.temperature == run.temperature and r.path == path), None)

    def largest_k(run: Run) -> Run:
        same = [r for r in runs if r.system == run.system and r.method == run.method and r.batch == run.batch
                and r.temperature == run.temperature and r.path == run.path]
        return max(same, key=lambda r: r.k)

    hf_generate = {(r.temperature, r.batch): r for r in runs if r.system == "hf" and r.method == "generate"}
    rows = []
    for run in runs:
        first_plain = plain_for(run)
        plain = run.baseline or first_plain
        tasks = list(dict.fromkeys(p.task for p in run.prompts))
        groups = ([(t, [i for i, p in enumerate(run.prompts) if p.task == t]) for t in tasks] if run.batch == 1 else []) \
            + [("all", list(range(len(run.prompts))))]
        cost = _costs_of(costs, run.method)
        big = largest_k(run)
        for task, idx in groups:
            s = merged([run.stats[i] for i in idx])
            tps = _tps(run, s, task)
            row = {"system": run.system, "method": run.method, "k": int(run.k), "task": task,
                   "temperature": float(run.temperature), "batch": int(run.batch), "tokens_per_s": round(tps, 3),
                   "alpha": _round(s.alpha), "acceptance_length": _round(s.acceptance_length) if run.system == "specdeploy" else None,
                   "speedup_vs_plain": 0.0, "greedy_mismatches": 0,
                   "path": run.path, "prompts": len(idx), "tokens": s.emitted,
                   "latency_p50_s": _round(_pct([run.stats[i].wall_s for i in idx], 0.5)),
                   "latency_p95_s": _round(_pct([run.stats[i].wall_s for i in idx], 0.95)),
                   "acceptance_by_position": [round(x, 4) for x in s.acceptance_by_position] if s.proposed else None}
            if plain is not None:
                pidx, ptps = _tps_over(plain, run, idx, task)
                row["speedup_vs_plain"] = round(tps / ptps, 4) if ptps > 0 else 0.0
                if run.temperature == 0:
                    row["greedy_mismatches"] = sum(run.token_ids[i] != plain.token_ids[j] for i, j in zip(idx, pidx))
                if run.baseline is not None and first_plain is not None:
                    _, ftps = _tps_over(first_plain, run, idx, task)
                    row["plain_drift"] = round(ptps / ftps - 1, 4) if ftps > 0 else None
            row["mismatch_checked"] = plain is not None and run.temperature == 0
            if s.switched_off:  # steps the speculation switch decoded plain (policy "switch": "auto")
                row["switched_off"] = round(s.switched_off / s.target_forwards, 4)
            gen = hf_generate.get((run.temperature, run.batch))
            if gen is not None and gen is not run:
                _, gtps = _tps_over(gen, run, idx, task)
                row["speedup_vs_hf_generate"] = round(tps / gtps, 4) if gtps > 0 else None
            if run.system == "specdeploy" and run.method not in ("none", "policy") and cost is not None and s.target_forwards:
                bs = merged([big.stats[i] for i in _matching(big, run, idx)])
                prof = Profile.from_stats(bs)
                if prof.max_k >= run.k and bs.acceptance_length:
                    a_tok = fit_alpha(bs.acceptance_length, big.k)
                    row["alpha_token_fit"] = round(a_tok, 4)
                    row["expected_speedup"] = round(expected_speedup(a_tok, run.k, cost.c, 1.0, cost.per_token), 4)
                    row["predicted_speedup"] = round(predicted_speedup(prof, run.k, cost), 4)
            if run.decisions:
                ks = [d["k"] for i, d in enumerate(run.decisions) if i in set(idx)]
                row["policy_decisions"] = dict(sorted({str(x): ks.count(x) for x in ks}.items()))
            if run.notes:
                row["notes"] = run.notes
            rows.append(row)
    return rows


def _costs_of(costs: dict, method: str):
    from specdeploy.bench.advisor import StepCosts

    c = costs.get(method)
    return c if isinstance(c, StepCosts) else None


def _tps(run: Run, s: SpecStats, task: str) -> float:
    if run.batch > 1 and task == "all" and run.wall_s:
        return s.emitted / run.wall_s  # throughput of the whole batched run
    return s.tokens_per_s


def _tps_over(ref: Run, run: Run, idx: list[int], task: str) -> tuple[list[int], float]:
    """The indices in `ref` of the prompts run[idx], and `ref`'s tokens/s over them."""
    ridx = _matching(ref, run, idx)
    return ridx, _tps(ref, merged([ref.stats[i] for i in ridx]), task)


def _matching(ref: Run, run: Run, idx: list[int]) -> list[int]:
    """Indices in `ref` of the prompts run[idx] (runs may cover different prompt subsets)."""
    pos = {id(p): i for i, p in enumerate(ref.prompts)}
    return [pos[id(run.prompts[i])] for i in idx if id(run.prompts[i]) in pos]


def _round(x: float | None, n: int = 4) -> float | None:
    return None if x is None else round(float(x), n)


# ---- the command ---------------------------------------------------------------------------
def _list(s: str, cast=str) -> list:
    try:
        return [cast(x.strip()) for x in str(s).split(",") if x.strip()]
    except ValueError:
        raise SpecDeployError(f"cannot parse the list {s!r}") from None


def command_line(args: argparse.Namespace) -> str:
    """The exact command, rebuilt from the parsed arguments (defaults spelled out)."""
    parts = ["specdeploy", "bench"]
    for name in ("prompts", "prompts_per_task", "methods", "k", "temperature", "batch", "batch_prompts_per_task", "batch_passes", "peers", "peer_k", "peer_time_cap",
                 "policy", "policy_min_speedup", "target", "device", "dtype", "runner", "max_new_tokens", "time_budget", "out"):
        v = getattr(args, name, None)
        if v not in (None, ""):
            parts += [f"--{name.replace('_', '-')}", str(v)]
    return shlex.join(parts)


def run_bench(args: argparse.Namespace) -> dict:
    """Run every configuration (most important first), writing bench.json after each; see the module docstring."""
    from rich.console import Console

    from specdeploy.bench import advisor

    t0 = time.perf_counter()
    console = Console(stderr=True)
    methods = _list(args.methods)
    unknown = [m for m in methods if m not in (*METHODS, "policy")]
    if unknown:
        raise SpecDeployError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}, policy")
    ks = _list(args.k, int)
    temps = _list(args.temperature, float)
    batches = _list(args.batch, int)
    peers = _list(args.peers) if args.peers else []
    if not ks or min(ks) < 1 or not temps or min(temps) < 0 or not batches or min(batches) < 1 or args.batch_passes < 1:
        raise SpecDeployError("--k, --batch and --batch-passes need integers >= 1, --temperature numbers >= 0")
    if any(p != "hf" for p in peers):
        raise SpecDeployError("--peers: only 'hf' is known")
    peer_k = args.peer_k or (4 if 4 in ks else max(ks))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = select_prompts(args.prompts, args.prompts_per_task)
    backend = Backend.load(args.target, args.device, args.dtype, runner=args.runner, max_new_tokens=args.max_new_tokens,
                           max_k=max(ks))
    encoded = encode_all(backend, prompts, args.max_new_tokens)
    batches_ = _list(args.batch, int)
    bprompts = select_prompts(args.prompts, args.batch_prompts_per_task) if max(batches_) > 1 else prompts
    bencoded = encode_all(backend, bprompts, args.max_new_tokens) if bprompts is not prompts else encoded
    backend.max_length = max(len(x) for x in encoded + bencoded) + args.max_new_tokens + max(ks) + 16  # before any runner exists
    bench = Bench(args, backend, prompts, encoded)
    bench.batch_prompts, bench.batch_encoded = bprompts, bencoded
    console.print(f"loaded {args.target} on {backend.device} ({backend.dtype}, {backend.kind} runner) in "
                  f"{time.perf_counter() - t0:.1f}s; {len(prompts)} prompts")

    # which methods can run here: build each once (a missing artifact skips the method with a note)
    available = []
    for m in ["none"] + [m for m in methods if m not in ("none", "policy")]:
        try:
            backend.proposer(m, max(ks))
            available.append(m)
        except SpecDeployError as e:
            bench.skip(f"specdeploy {m}", str(e))
    costs = advisor.measure_costs(backend.runner(), ks, max(encoded, key=len),
                                  {m: backend.draft_runner(m) for m in available if m in ("layerskip", "draft")},
                                  ngram=backend.proposer("ngram", max(ks)) if "ngram" in available else None,
                                  reps=20 if backend.device.startswith("cuda") else 2)
    bench.costs = costs
    meta = {"runner": backend.kind, "max_new_tokens": args.max_new_tokens, "prompts": args.prompts, "num_prompts": len(prompts),
            "tasks": list(dict.fromkeys(p.task for p in prompts)), "peer_k": peer_k, "torch": torch.__version__,
            "transformers": _version("transformers"), "costs": {m: c.as_dict() for m, c in costs.items()}, "policy": None}
    console.print(f"step costs measured ({time.perf_counter() - t0:.1f}s): " +
                  ", ".join(f"{m} c={c.c:.3f}" for m, c in costs.items() if m != "none"))

    # the jobs, most important first
    n = len(prompts)
    jobs: list[tuple[str, int, object]] = []
    fused_sizes = [b for b in batches if b > 1]
    batch_ok = _has_module("specdeploy.runtime.batch")
    policy_box: dict = {}

    def loop_jobs(t: float, main_k: bool) -> None:
        # main_k: every method at peer_k (and the policy); else the other k values, which a budget cuts first
        configs = [(m, k) for m in available for k in ([0] if m == "none" else ks) if (k in (0, peer_k)) == main_k]
        cheap = {m: (costs[m].c if m in costs else 0.0) for m in available}  # cheaper drafting first
        configs.sort(key=lambda mk: (cheap[mk[0]], ks.index(mk[1]) if mk[1] in ks else -1))
        jobs.extend((f"specdeploy {m} k={k} T={t:g}", n, lambda m=m, k=k, t=t: bench.loop(backend.engine(m, k), m, k, t))
                    for m, k in configs)
        if main_k and "policy" in methods:
            jobs.append((f"specdeploy policy T={t:g}", n, lambda t=t: _policy_run(bench, backend, policy_box, available, ks, t, console)))

    def peer_jobs(t: float) -> None:
        if not peers:
            return
        jobs.append((f"hf generate T={t:g}", n, lambda: bench.hf("generate", t, {})))
        jobs.append((f"hf prompt_lookup T={t:g}", n, lambda: bench.hf("prompt_lookup", t, {"prompt_lookup_num_tokens": peer_k,
                                                                                          "max_matching_ngram_size": 4}, k=peer_k)))
        for m in (x for x in available if x in ("layerskip", "draft")):
            jobs.append((f"hf assisted_{m} T={t:g}", n, lambda m=m: bench.hf(f"assisted_{m}", t, {"assistant_model": _assistant(backend, m, peer_k)}, k=peer_k)))

    def fused_jobs(t: float) -> None:
        for b in fused_sizes:
            if not batch_ok:
                bench.skip(f"specdeploy T={t:g} batch {b}", "specdeploy.runtime.batch is not available")
                continue
            for m in (x for x in available if x in BATCH_METHODS):
                jobs.append((f"specdeploy {m} T={t:g} batch {b}", len(bprompts),
                             lambda m=m, b=b: bench.fused(m, 0 if m == "none" else peer_k, b, temperature=t)))
                if m != "none":  # what a server would run: speculation switched off where it does not pay
                    jobs.append((f"specdeploy {m} (auto) T={t:g} batch {b}", len(bprompts),
                                 lambda m=m, b=b: bench.fused(m, peer_k, b, switch="auto", temperature=t)))
            if peers and t == 0:
                jobs.append((f"hf generate batch {b}", len(bprompts), lambda b=b: bench.hf("generate", 0.0, {}, batch=b)))
            for m in (x for x in available if x not in BATCH_METHODS):
                bench.skip(f"specdeploy {m} T={t:g} batch {b}", "the batched engine drafts with n-gram, a draft model or EAGLE chains only")

    # greedy first, then the sampled temperatures in the order given; at each, what the tables need
    # (every method at peer_k, the peers, batch > 1) before the k sweep
    for t in sorted(temps, key=lambda t: t > 0):
        loop_jobs(t, main_k=True)
        peer_jobs(t)
        fused_jobs(t)
        loop_jobs(t, main_k=False)

    from specdeploy.runtime.cuda_runner import CAPTURE_FAILURES, no_collection

    def write() -> dict:
        result = {"device": _device_name(backend.device), "dtype": backend.dtype,
                  "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": command_line(args),
                  "rows": build_rows(bench.runs, costs), **meta, "skipped": bench.skipped,
                  "wall_s": round(time.perf_counter() - t0, 1), "graph_capture_failures": list(CAPTURE_FAILURES)}
        if "policy" in policy_box:
            result["policy"] = policy_box["policy"].to_dict()
        _write_json(out / "bench.json", result)
        return result

    budget = args.time_budget
    with progress_bar() as bar:
        bench.bar, bench.bar_task = bar, bar.add_task("bench", total=sum(j[1] for j in jobs))
        for what, count, job in jobs:
            if budget and time.perf_counter() - t0 > budget:
                bench.skip(what, f"time budget of {budget:g}s spent")
                bar.advance(bench.bar_task, count)
                continue
            done = bar.tasks[0].completed
            # the engines of earlier jobs hold CUDA graphs in reference cycles: free them here, and keep the
            # collector (a pass that destroys CUDA graphs, not timed here) out of the job's timed runs, as timeit does
            gc.collect()
            try:
                with no_collection():
                    job()
            except Exception as e:  # noqa: BLE001 - one broken configuration must not stop the benchmark
                bench.skip(what, f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            bar.update(bench.bar_task, completed=done + count)
            write()
    result = write()
    finish(result, out, console)
    return result


def finish(result: dict, out: Path, console=None) -> None:
    """bench.md, command.txt and the plots, all from the JSON (so they can be redone anywhere)."""
    from specdeploy.bench import plots, report

    (out / "bench.md").write_text(report.render_markdown(result))
    (out / "command.txt").write_text(result["command"] + "\n")
    made = plots.make_plots(result, out)
    if console is not None:
        console.print(f"wrote {out / 'bench.json'}, {out / 'bench.md'} and {len(made)} plots")


def _write_json(path: Path, obj: dict) -> None:
    import json

    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)


def _assistant(backend: Backend, method: str, k: int):
    """The same draft model, as HF assisted generation's assistant drafting k tokens a step."""
    import copy

    assistant = backend.draft_hf(method)
    assistant.generation_config = copy.deepcopy(backend.loaded.model.generation_config)
    assistant.generation_config.num_assistant_tokens = k
    assistant.generation_config.num_assistant_tokens_schedule = "constant"
    return assistant


def _policy_run(bench: "Bench", backend: Backend, box: dict, available: list[str], ks: list[int], t: float, console) -> None:
    from specdeploy.runtime.policy import Policy

    if "policy" not in box:
        box["policy"] = _bench_policy(bench.args, backend, [m for m in available if m != "none"], ks, console)
    p = Policy.from_dict(box["policy"].to_dict())  # fresh counters per temperature
    named = {r.method for _, r in p.rules()}
    engine = backend.engine("none", 1, policy=p, more={m: backend.proposer(m, max(ks)) for m in named - {"none"}})
    bench.loop(engine, "policy", 0, t, label="policy", paired=backend.engine("none", 0))


def _bench_policy(args, backend: Backend, methods: list[str], ks: list[int], console):
    """--policy FILE, or the advisor's policy measured on held-out prompts (every prompt of a task after the bench's)."""
    from specdeploy.bench import advisor
    from specdeploy.runtime.policy import Policy

    if args.policy:
        return Policy.load(args.policy)
    if not methods:
        raise SpecDeployError("method 'policy' needs at least one speculative method to advise on")
    try:
        held = select_prompts(args.prompts, 0, skip=args.prompts_per_task) if args.prompts_per_task else []  # all the rest
    except SpecDeployError:
        held = []
    note = "held-out prompts"
    if not held:
        held, note = select_prompts(args.prompts, args.prompts_per_task), "the bench's own prompts (no held-out ones left)"
    console.print(f"policy: advising on {len(held)} {note}")
    enc = encode_all(backend, held, args.max_new_tokens)
    # a margin (10% by default): a task whose predicted gain is within the noise of a few held-out prompts stays off
    temps = sorted(set(_list(args.temperature, float)))
    temps = [t for t in temps if t == 0] + [t for t in temps if t > 0][:1]  # greedy, and one sampled section
    policy, advices = advisor.advise_temperatures(backend, held, enc, methods, ks, temps, args.max_new_tokens,
                                                  args.policy_min_speedup)
    for advice in advices:
        console.print(advice.table(f"advisor at temperature {advice.temperature:g} (policy row)"))
    policy.extra["advised_on"] = f"{len(held)} {note}"
    return policy


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (cuda)"
    import platform

    return f"{platform.processor() or platform.machine()} cpu, {torch.get_num_threads()} threads"


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


def cmd_bench(args: argparse.Namespace) -> int:
    run_bench(args)
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("bench", help="every method and HF peers side by side: bench.json, bench.md, plots")
    p.add_argument("--prompts", default="eval", help="JSONL prompts with task labels, or 'eval' / 'demo'")
    p.add_argument("--prompts-per-task", type=int, default=0, help="at most N prompts per task (0: all)")
    p.add_argument("--methods", default="none,ngram,layerskip,draft,medusa,eagle,multi",
                   help="comma-separated: none, ngram, draft, layerskip, medusa, eagle, multi, policy")
    p.add_argument("--k", default="1,2,4,8", help="draft lengths (comma-separated)")
    p.add_argument("--temperature", default="0", help="comma-separated temperatures (0 = greedy)")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes (> 1: the batched greedy engine)")
    p.add_argument("--peers", default="", help="'hf': HF generate, assisted generation and prompt lookup")
    p.add_argument("--peer-k", type=int, default=0, help="k of the peers and of batch > 1 rows (default 4, or the largest --k)")
    p.add_argument("--peer-time-cap", type=float, default=0.0, help="seconds per peer configuration (0: no cap)")
    p.add_argument("--batch-prompts-per-task", type=int, default=0,
                   help="prompts per task of the batch > 1 rows (0: all of the set; batches need many requests)")
    p.add_argument("--batch-passes", type=int, default=3,
                   help="passes over the prompts per batch > 1 row, on one engine (a speculative row's alternate with a plain engine's); the median pass is timed")
    p.add_argument("--policy", help="policy.json for the 'policy' method (default: advise on held-out prompts)")
    p.add_argument("--policy-min-speedup", type=float, default=1.1,
                   help="the advised policy turns a task off below this expected speedup")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--target", default="smollm2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--runner", choices=["auto", "torch", "graph"], default="auto",
                   help="auto: CUDA graphs on cuda (specdeploy.runtime.cuda_runner), eager torch on cpu")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds: configurations not started by then are skipped with a note (0: no limit)")
    p.add_argument("--out", default="results/bench")
    p.set_defaults(func=cmd_bench)


def main(argv: list[str] | None = None) -> int:
    """`python -m specdeploy.bench.run ...` = `specdeploy bench ...` (without the other subcommands' imports)."""
    import sys

    parser = argparse.ArgumentParser(prog="specdeploy bench")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    try:
        return cmd_bench(args)
    except SpecDeployError as e:
        print(f"specdeploy: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
