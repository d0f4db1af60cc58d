"""`specdeploy monitor`: α and acceptance length per task, from the server's Prometheus metrics.

Reads the spec-decode counters (specdeploy.triton_repo.metrics) from Triton's metrics
endpoint. Besides the totals it shows α over the last interval, which is what drops
when a draft meets a new domain or goes stale; a task whose recent α (or, before any
new traffic, its total α) is under the threshold is flagged.
"""
from __future__ import annotations

import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.live import Live
from rich.table import Table

from specdeploy.errors import SpecDeployError
from specdeploy.triton_repo.metrics import COUNTERS, DECISIONS, PER_POSITION

_FIELDS = {
    "spec_decode_num_requests": "requests",
    "spec_decode_num_drafts": "drafts",
    "spec_decode_num_draft_tokens": "draft_tokens",
    "spec_decode_num_accepted_tokens": "accepted",
    "spec_decode_num_emitted_tokens": "emitted",
    "spec_decode_num_target_forwards": "forwards",
    "spec_decode_fallbacks": "fallbacks",
}


@dataclass
class TaskCounters:
    requests: float = 0
    drafts: float = 0
    draft_tokens: float = 0
    accepted: float = 0
    emitted: float = 0
    forwards: float = 0
    fallbacks: float = 0
    accepted_per_pos: dict[int, float] = field(default_factory=dict)
    decisions: dict[str, float] = field(default_factory=dict)  # "ngram k=4" / "off" -> requests

    @property
    def alpha(self) -> float | None:
        return self.accepted / self.draft_tokens if self.draft_tokens else None

    @property
    def acceptance_length(self) -> float | None:
        return self.emitted / self.forwards if self.forwards else None

    def minus(self, before: "TaskCounters") -> "TaskCounters":
        return TaskCounters(**{f: getattr(self, f) - getattr(before, f) for f in _FIELDS.values()})


def parse_metrics(text: str) -> dict[str, TaskCounters]:
    """Per-task counters from Prometheus text exposition."""
    tasks: dict[str, TaskCounters] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in COUNTERS and family.name.removesuffix("_total") not in COUNTERS:
            continue
        for sample in family.samples:
            name = sample.name.removesuffix("_total")
            task = sample.labels.get("task", "default")
            row = tasks.setdefault(task, TaskCounters())
            if name == PER_POSITION:
                pos = int(sample.labels.get("position", 0))
                row.accepted_per_pos[pos] = row.accepted_per_pos.get(pos, 0) + sample.value
            elif name == DECISIONS:
                k = sample.labels.get("k", "")
                key = "off" if k == "off" else f"{sample.labels.get('method', '?')} k={k}"
                row.decisions[key] = row.decisions.get(key, 0) + sample.value
            elif name in _FIELDS:
                setattr(row, _FIELDS[name], getattr(row, _FIELDS[name]) + sample.value)
    return tasks


def fetch_metrics(url: str) -> dict[str, TaskCounters]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return parse_metrics(r.read().decode("utf-8"))
    except (urllib.error.URLError, OSError) as e:
        raise SpecDeployError(f"cannot read metrics from {url}: {e}") from None


def flagged(now: TaskCounters, recent: TaskCounters | None, threshold: float) -> tuple[bool, float | None]:
    """Whether a task's α is under the threshold: recent α if there was new drafting, else total α."""
    alpha = recent.alpha if recent is not None and recent.draft_tokens else now.alpha
    return (alpha is not None and alpha < threshold), alpha


def build_table(tasks: dict[str, TaskCounters], previous: dict[str, TaskCounters] | None, threshold: float,
                url: str = "") -> Table:
    table = Table(title=f"speculative decoding per task  {url}  {time.strftime('%H:%M:%S')}")
    for col in ("task", "requests", "draft tokens", "accepted", "α", "α (last interval)", "acceptance length",
                "α by position", "decisions", "fallbacks", "status"):
        table.add_column(col, justify="left" if col in ("task", "status", "α by position", "decisions") else "right")
    for task in sorted(tasks):
        now = tasks[task]
        recent = now.minus(previous[task]) if previous and task in previous else None
        low, _ = flagged(now, recent, threshold)
        per_pos = " ".join(f"{now.accepted_per_pos.get(i, 0) / now.drafts:.2f}" if now.drafts else "-"
                           for i in range(max(now.accepted_per_pos, default=-1) + 1))
        status = f"[red]α < {threshold:g}[/red]" if low else ("[yellow]fallbacks[/yellow]" if now.fallbacks else "[green]ok[/green]")
        if now.draft_tokens == 0:
            status = "off (policy)" if set(now.decisions) == {"off"} else "no drafts"
        table.add_row(task, f"{now.requests:.0f}", f"{now.draft_tokens:.0f}", f"{now.accepted:.0f}", _fmt(now.alpha),
                      _fmt(recent.alpha if recent else None), _fmt(now.acceptance_length), per_pos or "-",
                      ", ".join(f"{d} ×{n:.0f}" for d, n in sorted(now.decisions.items())) or "-", f"{now.fallbacks:.0f}", status)
    return table


def run_monitor(url: str, interval: float = 2.0, threshold: float = 0.2, once: bool = False,
                console: Console | None = None, max_updates: int | None = None) -> int:
    """Show the table (live unless `once`). With `once`, exit code 1 when a task is flagged."""
    console = console or Console()
    tasks = fetch_metrics(url)
    if once:
        console.print(build_table(tasks, None, threshold, url))
        low = [t for t, c in tasks.items() if flagged(c, None, threshold)[0]]
        for t in low:
            console.print(f"task {t}: α {tasks[t].alpha:.3f} is under the threshold {threshold:g}")
        return 1 if low else 0
    previous = None
    updates = 0
    with Live(build_table(tasks, previous, threshold, url), console=console, refresh_per_second=4) as live:
        try:
            while max_updates is None or updates < max_updates:
                time.sleep(interval)
                previous, tasks = tasks, fetch_metrics(url)
                live.update(build_table(tasks, previous, threshold, url))
                updates += 1
        except KeyboardInterrupt:
            pass
    return 0


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"
