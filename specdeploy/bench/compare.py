"""Run prompts through several methods on one loaded target and compare them per task."""
from __future__ import annotations

from collections.abc import Iterable
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


def compare_methods(engines: Iterable[tuple[str, SpecEngine]], prompts: list[Prompt],
                    params: SamplingParams, raw: bool = False) -> list[MethodRun]:
    """Every engine on the same prompts, with a progress bar (stderr).

    Methods take turns on each prompt (not one method over all prompts, then the next), so
    that a change in machine load while the comparison runs lands on every method alike.
    """
    engines = list(engines)
    encoded = [engines[0][1].encode(p.prompt, raw, params.max_new_tokens) for p in prompts]
    stats = {name: TaskStats() for name, _ in engines}
    results: dict[str, list[RequestResult]] = {name: [] for name, _ in engines}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True) as progress:
        bar = progress.add_task("generating", total=len(engines) * len(prompts))
        for p, ids in zip(prompts, encoded):
            progress.update(bar, description=f"task {p.task}")
            for name, engine in engines:
                r = engine.generate_ids(ids, params, p.task)
                stats[name].add(p.task, r.stats)
                results[name].append(r)
                progress.advance(bar)
    return [MethodRun(name, stats[name], results[name]) for name, _ in engines]


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
