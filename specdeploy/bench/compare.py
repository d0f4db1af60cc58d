"""Run prompts through several methods on one loaded target and compare them per task."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from specdeploy.bench.tasks import Prompt
from specdeploy.config import SamplingParams
from specdeploy.runtime.engine import RequestResult, SpecEngine
from specdeploy.runtime.stats import SpecStats, TaskStats


@dataclass(frozen=True)
class MethodRun:
    name: str  # "none", "ngram", "layerskip k=4", ...
    stats: TaskStats
    results: list[RequestResult]


def run_method(engine: SpecEngine, name: str, prompts: list[Prompt], encoded: list[list[int]],
               params: SamplingParams, on_done: Callable[[RequestResult], None] | None = None) -> MethodRun:
    """Generate every prompt with one engine; per-task stats and results in prompt order."""
    stats = TaskStats()
    results = []
    for p, ids in zip(prompts, encoded):
        r = engine.generate_ids(ids, params, p.task)
        stats.add(p.task, r.stats)
        results.append(r)
        if on_done:
            on_done(r)
    return MethodRun(name, stats, results)


def compare_methods(engines: Iterable[tuple[str, SpecEngine]], prompts: list[Prompt],
                    params: SamplingParams, raw: bool = False) -> list[MethodRun]:
    """Every engine on the same prompts, with a progress bar (stderr)."""
    engines = list(engines)
    encoded = [engines[0][1].encode(p.prompt, raw, params.max_new_tokens) for p in prompts]
    runs = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True) as progress:
        bar = progress.add_task("generating", total=len(engines) * len(prompts))
        for name, engine in engines:
            progress.update(bar, description=f"method {name}")
            runs.append(run_method(engine, name, prompts, encoded, params, lambda _: progress.advance(bar)))
    return runs


def task_table(runs: list[MethodRun], baseline: str = "none", title: str | None = None) -> Table:
    """α, acceptance length, tokens/s and speedup against `baseline`, per task and method."""
    base = next((r for r in runs if r.name == baseline), None)
    table = Table(title=title)
    for col in ("task", "method", "α", "acc. length", "tokens/s", f"speedup vs {baseline}"):
        table.add_column(col, justify="left" if col in ("task", "method") else "right")
    tasks = list(dict.fromkeys(t for r in runs for t in r.stats.by_task))
    rows = [(t, r, r.stats.by_task[t], base.stats.by_task[t] if base else None) for t in tasks for r in runs]
    rows += [("all", r, r.stats.total(), base.stats.total() if base else None) for r in runs]
    for i, (task, run, s, b) in enumerate(rows):
        table.add_row(task if i % len(runs) == 0 else "", run.name, _fmt(s.alpha), _fmt(s.acceptance_length),
                      f"{s.tokens_per_s:.1f}", _speedup(s, b), end_section=(i % len(runs) == len(runs) - 1))
    return table


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _speedup(s: SpecStats, base: SpecStats | None) -> str:
    if base is None or base.tokens_per_s == 0:
        return "-"
    return f"{s.tokens_per_s / base.tokens_per_s:.2f}x"
