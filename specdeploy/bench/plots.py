"""PNG plots of a bench.json (matplotlib, Agg): speedup by task, α by task, speedup vs k, speedup vs batch,
one set per temperature the run has, each plot where its rows exist (`planned`)."""
from __future__ import annotations

from pathlib import Path

from specdeploy.bench.report import best_configs, cell, label, tasks_of, temperature_name, temperatures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_file(name: str, temperature: float) -> str:
    """A plot's file name: greedy plots keep the plain name, sampled ones carry the temperature."""
    return f"{name}.png" if temperature == 0 else f"{name}_t{temperature:g}.png"


def _selected(result: dict):
    """(file name, title, temperature, rows, drawing) of each plot whose rows exist in this result."""
    for t in temperatures(result):
        for name, (title, select, draw) in PLOTS.items():
            if data := select(result, t):
                yield plot_file(name, t), title if t == 0 else f"{title} ({temperature_name(t)})", t, data, draw


def planned(result: dict) -> list[tuple[str, str, float]]:
    """(file name, title, temperature) of every plot `make_plots` writes for this result."""
    return [(name, title, t) for name, title, t, _, _ in _selected(result)]


def make_plots(result: dict, out: str | Path) -> list[Path]:
    """Every plot of `planned`; the paths written."""
    return [draw(result, data, Path(out) / name, t) for name, _, t, data, draw in _selected(result)]


def _title(result: dict, what: str) -> str:
    return f"{what}\n{result['device']}, {result['dtype']}, {result.get('num_prompts', '?')} prompts"


def _grouped(result: dict, cfgs: list[dict], value, ylabel: str, title: str, path: Path, hline: float | None = None):
    plt = _plt()
    tasks = tasks_of(result) + ["all"]
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(tasks) + 2), 4.8))
    width = 0.8 / max(1, len(cfgs))
    for i, c in enumerate(cfgs):
        ys = [(value(x) if (x := cell(result, c, t)) is not None and value(x) is not None else 0.0) for t in tasks]
        ax.bar([j + i * width - 0.4 + width / 2 for j in range(len(tasks))], ys, width, label=label(c))
    if hline is not None:
        ax.axhline(hline, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _by_task_configs(result: dict, temperature: float) -> list[dict]:
    return [c for c in best_configs(result, temperature, 1) if c["method"] != "none"]


def speedup_by_task(result: dict, cfgs: list[dict], path: Path, temperature: float) -> Path:
    return _grouped(result, cfgs, lambda r: r["speedup_vs_plain"], "speedup over specdeploy plain (x)",
                    _title(result, f"Speedup by task and method (batch 1, {temperature_name(temperature)}; "
                                   "each method at its best k)"), path, hline=1.0)


def _alpha_configs(result: dict, temperature: float) -> list[dict]:
    return [c for c in best_configs(result, temperature, 1) if c["system"] == "specdeploy" and c["method"] not in ("none", "policy")]


def alpha_by_task(result: dict, cfgs: list[dict], path: Path, temperature: float) -> Path:
    return _grouped(result, cfgs, lambda r: r["alpha"], "α (accepted / proposed)",
                    _title(result, f"α by task (batch 1, {temperature_name(temperature)})"), path)


def _k_rows(result: dict, temperature: float) -> list[dict]:
    return [r for r in result["rows"] if r["task"] == "all" and r["batch"] == 1 and r["temperature"] == temperature
            and r["system"] == "specdeploy" and r["method"] not in ("none", "policy")]


def speedup_vs_k(result: dict, rows: list[dict], path: Path, temperature: float) -> Path:
    from specdeploy.bench.advisor import expected_speedup

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.8))
    costs = result.get("costs") or {}
    for i, m in enumerate(dict.fromkeys(r["method"] for r in rows)):
        mine = sorted((r for r in rows if r["method"] == m), key=lambda r: r["k"])
        color = f"C{i}"
        ax.plot([r["k"] for r in mine], [r["speedup_vs_plain"] for r in mine], "o-", color=color, label=f"{m} measured")
        big = mine[-1]
        a = big.get("alpha_token_fit")
        if a is not None and m in costs:
            c, per_token = costs[m]["c"], costs[m]["per_token"]
            ks = [x / 4 for x in range(4, 4 * big["k"] + 1)]
            ax.plot(ks, [expected_speedup(a, k, c, 1.0, per_token) if per_token else _nonint(a, k, c) for k in ks], ":",
                    color=color, label=f"{m} (1−α^(k+1))/((1−α)(1+kc)), α={a:.2f}, c={c:.3f}")
        pred = [(r["k"], r["predicted_speedup"]) for r in mine if r.get("predicted_speedup") is not None]
        if pred:
            ax.plot(*zip(*pred), "x--", color=color, alpha=0.6, label=f"{m} predicted (per-position α, measured verify cost)")
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xlabel("k (draft tokens per step)")
    ax.set_ylabel("speedup over plain (x)")
    ax.set_title(_title(result, "Measured speedup against k, with the analytic expectation "
                                f"(all tasks, {temperature_name(temperature)})"), fontsize=10)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _nonint(a: float, k: float, c: float) -> float:
    """The formula at a fractional k (smooth curve), n-gram flavour: c charged once a step."""
    return (1 - a ** (k + 1)) / (1 - a) / (1 + c) if a < 1 else (k + 1) / (1 + c)


def _batch_rows(result: dict, temperature: float) -> list[dict]:
    return [r for r in result["rows"] if r["task"] == "all" and r["temperature"] == temperature and r["method"] != "none"]


def speedup_vs_batch(result: dict, rows: list[dict], path: Path, temperature: float) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.8))
    peer_k = result.get("peer_k")
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if r["batch"] == 1 and r["system"] == "specdeploy" and r["method"] != "policy" and r["k"] != peer_k:
            continue  # batch > 1 runs use peer_k: compare like with like
        series.setdefault(label(r) if r["system"] == "hf" else f"{r['method']} k={r['k']}" if r["k"] else r["method"], []).append(
            (r["batch"], r["speedup_vs_plain"]))
    for name, pts in series.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xscale("log", base=2)
    batch_ticks = sorted({r["batch"] for r in rows})
    ax.set_xticks(batch_ticks)
    ax.set_xticklabels([str(b) for b in batch_ticks])
    ax.set_xlabel("batch size")
    ax.set_ylabel("speedup over plain at the same batch (x)")
    batches = sorted({r["batch"] for r in rows})
    note = "" if len(batches) > 1 else " (batch > 1 not run: see bench.md, Skipped)"
    ax.set_title(_title(result, f"Speedup against batch size ({temperature_name(temperature)}, all tasks)" + note),
                 fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# name -> (title, the rows it needs at a temperature, drawing): a plot is made where its rows exist
PLOTS = {"speedup_by_task": ("speedup by task", _by_task_configs, speedup_by_task),
         "alpha_by_task": ("α by task", _alpha_configs, alpha_by_task),
         "speedup_vs_k": ("speedup vs k", _k_rows, speedup_vs_k),
         "speedup_vs_batch": ("speedup vs batch", _batch_rows, speedup_vs_batch)}
