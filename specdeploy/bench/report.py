"""bench.json -> bench.md: the tables people read. Every number comes from the JSON."""
from __future__ import annotations

import statistics

AIM_TASKS = ("code", "sql", "api_call")


# ---- selections shared with plots.py -------------------------------------------------------
def label(row: dict) -> str:
    name = row["method"] if row["system"] == "specdeploy" else f"HF {row['method']}"
    return name if row["system"] == "hf" or row["method"] in ("none", "policy") else f"{name} k={row['k']}"


def rows_where(rows: list[dict], **kw) -> list[dict]:
    return [r for r in rows if all(r.get(k) == v for k, v in kw.items())]


def temperatures(result: dict) -> list[float]:
    return sorted({r["temperature"] for r in result["rows"]})


def temperature_name(temperature: float) -> str:
    return "greedy" if temperature == 0 else f"temperature {temperature:g}"


def tasks_of(result: dict) -> list[str]:
    seen = result.get("tasks") or [r["task"] for r in result["rows"]]
    return [t for t in dict.fromkeys(seen) if t != "all"]


def best_configs(result: dict, temperature: float = 0.0, batch: int = 1) -> list[dict]:
    """One 'all' row per (system, method) at this temperature and batch: the k of highest speedup."""
    best: dict[tuple, dict] = {}
    for r in rows_where(result["rows"], task="all", temperature=temperature, batch=batch):
        key = (r["system"], r["method"])
        if key not in best or r["speedup_vs_plain"] > best[key]["speedup_vs_plain"]:
            best[key] = r
    order = {"none": 0, "policy": 99}
    return sorted(best.values(), key=lambda r: (r["system"] == "hf", order.get(r["method"], 1), r["method"]))


def cell(result: dict, cfg: dict, task: str) -> dict | None:
    return next((r for r in result["rows"] if r["system"] == cfg["system"] and r["method"] == cfg["method"]
                 and r["k"] == cfg["k"] and r["temperature"] == cfg["temperature"] and r["batch"] == cfg["batch"]
                 and r["task"] == task), None) if cfg["method"] != "policy" else \
        next((r for r in result["rows"] if r["method"] == "policy" and r["temperature"] == cfg["temperature"]
              and r["batch"] == cfg["batch"] and r["task"] == task), None)


def task_mean_speedup(result: dict, cfg: dict) -> float | None:
    xs = [c["speedup_vs_plain"] for t in tasks_of(result) if (c := cell(result, cfg, t)) is not None]
    return statistics.mean(xs) if xs else None


# ---- markdown ------------------------------------------------------------------------------
def _f(x, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def _x(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(row) + " |" for row in body]
    return out + [""]


def render_markdown(result: dict) -> str:
    lines = [f"# specdeploy bench — {result['device']}, {result['dtype']}", "",
             f"- command: `{result['command']}`",
             f"- date: {result['date']}; runner: {result.get('runner', '-')}; torch {result.get('torch', '-')}, "
             f"transformers {result.get('transformers', '-')}",
             f"- prompts: {result.get('prompts', '-')} ({result.get('num_prompts', '-')} prompts, "
             f"{len(tasks_of(result))} tasks), max_new_tokens {result.get('max_new_tokens', '-')}",
             "", "tokens/s at batch 1: a task's tokens over the sum of its requests' wall times (prefill included); "
             "at batch > 1: all tokens over the run's wall time. speedup = tokens/s over specdeploy plain decoding "
             "(method none) through the same runner at the same temperature and batch. α = accepted / proposed "
             "draft tokens; acc. len = tokens per target forward (bonus token included).", ""]
    lines += _capture_failures(result)
    for t in temperatures(result):
        lines += _aims(result, t) + _per_task(result, t)
    lines += _vs_k(result)
    lines += _batch(result)
    lines += _costs(result)
    lines += _policy(result)
    if result.get("skipped"):
        lines += ["## Skipped", ""] + [f"- {s['what']}: {s['reason']}" for s in result["skipped"]] + [""]
    lines += _all_rows(result)
    return "\n".join(lines)


def _capture_failures(result: dict) -> list[str]:
    failed = result.get("graph_capture_failures") or []
    if not failed:
        return []
    return [f"**{len(failed)} CUDA graph capture(s) failed in this run**; their steps ran eagerly, so some rows "
            f"are slower than the runtime is. First error: `{failed[0]}`", ""]


def _speed_lines(result: dict, configs: list[dict], spec: list[dict], pol: dict | None, temperature: float) -> list[str]:
    """The best method's mean, code / sql / api_call, and the HF peers against it."""
    def aim_note(text: str) -> str:  # the speed aims are set for greedy decoding
        return f" (aim: {text})" if temperature == 0 else ""

    means = {c["method"]: task_mean_speedup(result, c) for c in spec}
    top = max(spec, key=lambda c: means[c["method"]] or 0)
    out = [f"- best specdeploy method averaged over the tasks: **{label(top)}**, "
           f"{_x(means[top['method']])} over plain{aim_note('≥ 2x')}"]
    if any(t in tasks_of(result) for t in AIM_TASKS):
        best_per = []
        for t in AIM_TASKS:
            cs = [c for c in (cell(result, s, t) for s in spec) if c is not None]
            if cs:
                b = max(cs, key=lambda c: c["speedup_vs_plain"])
                best_per.append(f"{t} {_x(b['speedup_vs_plain'])} ({label(b)})")
        pol_cells = [(t, cell(result, pol, t)) for t in AIM_TASKS] if pol else []
        by_policy = ", ".join(f"{t} {_x(c['speedup_vs_plain'])}" for t, c in pol_cells if c is not None)
        by_policy = f"; the advisor's policy (method and k per task): {by_policy}" if by_policy else ""
        out.append("- code / sql / api_call, best method each (at its best k over all tasks): " + ", ".join(best_per)
                   + by_policy + aim_note("≥ 3x"))
    for p in (c for c in configs if c["system"] == "hf" and c["method"].startswith("assisted")):
        ratio = top["tokens_per_s"] / p["tokens_per_s"] if p["tokens_per_s"] else None
        out.append(f"- {label(top)} vs {label(p)}: {_x(ratio)} tokens/s ({'aim: ≥ 10x; ' if temperature == 0 else ''}HF: "
                   f"{p.get('notes') or str(p['prompts']) + ' prompts'})")
    gen = next((c for c in configs if c["system"] == "hf" and c["method"] == "generate"), None)
    if gen:
        out.append(f"- {label(top)} vs HF generate eager: {_x(top['tokens_per_s'] / gen['tokens_per_s'] if gen['tokens_per_s'] else None)}"
                   f" (HF on {gen['prompts']} prompts)")
    return out


def _policy_line(result: dict, pol: dict) -> list[str]:
    """The advisor's policy: its slowest task and mean (the aim: no task below plain)."""
    cells = [(t, c) for t in tasks_of(result) if (c := cell(result, pol, t)) is not None]
    if not cells:
        return []
    t, worst = min(cells, key=lambda tc: tc[1]["speedup_vs_plain"])
    off = [t2 for t2, c in cells if set((c.get("policy_decisions") or {})) == {"off"}]
    t += " (speculation off: plain decoding, timing noise)" if t in off else ""
    drifts = [abs(c["plain_drift"]) for _, c in cells if c.get("plain_drift") is not None]
    paired = (f"; timed paired with plain, whose two passes differ by up to {100 * max(drifts):.0f}% per task"
              if drifts else "")
    return [f"- advisor's policy (off for {', '.join(off) or 'no task'}): slowest task {t} at "
            f"{_x(worst['speedup_vs_plain'])} of plain, mean "
            f"{_x(task_mean_speedup(result, pol))} (aim: no task < 1x){paired}"]


def _aims(result: dict, temperature: float = 0.0) -> list[str]:
    """The summary at one temperature: the issue's aims (speedups at batch 1 greedy; the policy's at every one)."""
    configs = best_configs(result, temperature, 1)
    spec = [c for c in configs if c["system"] == "specdeploy" and c["method"] not in ("none", "policy")]
    pol = next((c for c in configs if c["method"] == "policy"), None)
    if not spec and not pol:
        return []
    out = [f"## Summary (batch 1, {temperature_name(temperature)})", ""]
    if spec:
        out += _speed_lines(result, configs, spec, pol, temperature)
    if pol:
        out += _policy_line(result, pol)
    if temperature != 0:
        return out + [""]
    mism = sum(r["greedy_mismatches"] for r in result["rows"] if r["task"] == "all" and r["system"] == "specdeploy")
    checked = sum(r["prompts"] for r in result["rows"] if r["task"] == "all" and r["system"] == "specdeploy" and r.get("mismatch_checked"))
    out.append(f"- specdeploy greedy outputs differing from plain: {mism} of {checked} checked "
               f"({result['dtype']}; exactness is guaranteed in float32, low precision may flip near-ties)")
    hf_m = [(label(r), r["greedy_mismatches"], r["prompts"]) for r in result["rows"]
            if r["task"] == "all" and r["system"] == "hf" and r.get("mismatch_checked") and r["method"] != "generate"]
    if hf_m:
        out.append("- HF peers' greedy outputs differing from specdeploy plain: " + ", ".join(f"{n} {m}/{p}" for n, m, p in hf_m))
    return out + [""]


def _per_task(result: dict, temperature: float) -> list[str]:
    cfgs = best_configs(result, temperature, 1)
    if not cfgs:
        return []
    name = temperature_name(temperature)
    out = [f"## Batch 1, {name}: speedup over plain per task (each method at its best k overall)", ""]
    header = ["task", "plain tok/s"] + [label(c) for c in cfgs if c["method"] != "none"]
    body = []
    plain = next((c for c in cfgs if c["method"] == "none" and c["system"] == "specdeploy"), None)
    for t in tasks_of(result) + ["all"]:
        p = cell(result, plain, t) if plain else None
        body.append([t, _f(p["tokens_per_s"] if p else None, "{:.1f}")] +
                    [_x(c2["speedup_vs_plain"]) if (c2 := cell(result, c, t)) else "-" for c in cfgs if c["method"] != "none"])
    body.append(["mean over tasks", ""] + [_x(task_mean_speedup(result, c)) for c in cfgs if c["method"] != "none"])
    out += _table(header, body)
    spec = [c for c in cfgs if c["system"] == "specdeploy" and c["method"] != "none"]
    if spec:
        out += [f"### α / acceptance length per task ({name})", ""]
        body = []
        for t in tasks_of(result) + ["all"]:
            body.append([t] + [f"{_f(c2['alpha'])} / {_f(c2['acceptance_length'])}" if (c2 := cell(result, c, t)) else "-" for c in spec])
        out += _table(["task"] + [label(c) for c in spec], body)
        out += [f"### latency per request p50 / p95, seconds ({name})", ""]
        body = [[t] + [f"{_f(c2['latency_p50_s'], '{:.3f}')} / {_f(c2['latency_p95_s'], '{:.3f}')}" if (c2 := cell(result, c, t)) else "-"
                       for c in cfgs] for t in tasks_of(result) + ["all"]]
        out += _table(["task"] + [label(c) for c in cfgs], body)
    return out


def _vs_k(result: dict) -> list[str]:
    rows = [r for r in result["rows"] if r["task"] == "all" and r["batch"] == 1 and r["system"] == "specdeploy"
            and r["method"] not in ("none", "policy")]
    if not rows:
        return []
    out = ["## Speedup against k: measured and expected (all tasks, batch 1)", "",
           "expected = (1 − α^(k+1)) / ((1 − α)(1 + k·c)) with α the i.i.d. per-token rate fitted to the acceptance "
           "length of the same method's run at the largest k, c = draft step cost / target step cost (measured, table "
           "below; n-gram: lookup cost once a step); predicted = the advisor's generalisation: acceptance per position "
           "from the run at the largest k and the measured cost of verifying k + 1 tokens.", ""]
    body = [[f"{r['temperature']:g}", r["method"], str(r["k"]), _f(r["alpha"]), _f(r["acceptance_length"]),
             _x(r["speedup_vs_plain"]), _x(r.get("expected_speedup")), _x(r.get("predicted_speedup")),
             f"{r['greedy_mismatches']}/{r['prompts']}" if r.get("mismatch_checked") else "-"]
            for r in sorted(rows, key=lambda r: (r["temperature"], r["method"], r["k"]))]
    return out + _table(["T", "method", "k", "α", "acc. len", "measured", "expected", "predicted", "greedy ≠ plain"], body)


def _batch(result: dict) -> list[str]:
    rows = [r for r in result["rows"] if r["task"] == "all"]
    batches = sorted({r["batch"] for r in rows})
    if len(batches) < 2:
        return []
    out = ["## Throughput against batch size (all tasks)", "",
           "batch 1: per-request loop; batch > 1: the batched engine (all prompts through that many slots, as many "
           "passes on one engine as the command's `--batch-passes`, one where it has none; the median pass timed) "
           "and HF `generate` on left-padded batches. Where a row notes its paired plain, its passes alternated with "
           "a plain engine's, and its speedup is over that engine's median pass; the note says how far that pass "
           "was from the plain row's.", ""]

    def notes(r: dict) -> str:
        paired = f"paired plain {100 * r['plain_drift']:+.1f}%" if r.get("plain_drift") is not None and r["batch"] > 1 else ""
        return "; ".join(x for x in (paired, r.get("notes", "")) if x)

    body = [[f"{r['temperature']:g}", str(r["batch"]), label(r), f"{r['tokens_per_s']:.1f}", _x(r["speedup_vs_plain"]),
             _f(r["alpha"]), f"{r['greedy_mismatches']}/{r['prompts']}" if r.get("mismatch_checked") else "-", notes(r)]
            for r in sorted(rows, key=lambda r: (r["temperature"], r["batch"], r["system"], r["method"], r["k"]))
            if r["batch"] > 1 or r["method"] in ("none", "generate") or r["k"] == result.get("peer_k")]
    return out + _table(["T", "batch", "config", "tokens/s", "speedup vs plain", "α", "greedy ≠ plain", "notes"], body)


def _costs(result: dict) -> list[str]:
    costs = result.get("costs") or {}
    if not costs:
        return []
    tm = next(iter(costs.values()))["target_ms"]
    out = ["## Measured step costs", "", "target verify step (forward + argmax + host copy), ms by query length: "
           + ", ".join(f"{q}: {t:.3f}" for q, t in tm.items()), ""]
    body = [[m, f"{c['draft_ms']:.4f}", "per draft token" if c["per_token"] else "per step", f"{c['c']:.4f}"]
            for m, c in costs.items() if m != "none"]
    return out + _table(["method", "draft ms", "charged", "c"], body) if body else out


def _policy(result: dict) -> list[str]:
    pol = result.get("policy")
    if not pol:
        return []
    out = ["## The advisor's policy used by the `policy` rows", "",
           f"advised on: {pol.get('advised_on', 'a given policy file')}; default for other tasks: {pol['default']}. "
           "Measured: the policy row's speedup over its paired plain pass on the bench's prompts.", ""]
    sections = [(pol.get("temperature", 0.0), pol)] + ([(pol["sampled"].get("temperature"), pol["sampled"])] if pol.get("sampled") else [])
    body = []
    for temp, sec in sections:
        for t, r in sec["tasks"].items():
            row = next((x for x in result["rows"] if x["method"] == "policy" and x["task"] == t and x["batch"] == 1
                        and (temp is None or x["temperature"] == temp)), None)
            body.append([t, "-" if temp is None else f"{temp:g}", r["method"], str(r["k"]), _x(r.get("expected_speedup")),
                         _x(row["speedup_vs_plain"]) if row else "-"])
    return out + _table(["task", "T", "method", "k", "expected speedup", "measured"], body)


def _all_rows(result: dict) -> list[str]:
    out = ["<details><summary>All rows</summary>", ""]
    body = [[r["system"], r["method"], str(r["k"]), r["task"], f"{r['temperature']:g}", str(r["batch"]),
             f"{r['tokens_per_s']:.1f}", _f(r["alpha"]), _f(r["acceptance_length"]), _x(r["speedup_vs_plain"]),
             str(r["greedy_mismatches"]) if r.get("mismatch_checked") else "-",
             _f(r.get("latency_p50_s"), "{:.3f}"), _f(r.get("latency_p95_s"), "{:.3f}"),
             " ".join(f"{x:.2f}" for x in (r.get("acceptance_by_position") or []))]
            for r in result["rows"]]
    out += _table(["system", "method", "k", "task", "T", "batch", "tok/s", "α", "acc. len", "speedup", "≠ plain",
                   "p50 s", "p95 s", "acceptance by position"], body)
    return out + ["</details>", ""]


def render_readme_block(result: dict, bench_dir: str = "results/bench") -> str:
    """The README's results section of one run: at each temperature the summary and the per-task table, then
    speedup vs k and batch, and the plot links."""
    from specdeploy.bench.plots import planned  # plots.py imports this module

    lines = [f"Measured by `{result['command']}` on {result['device']}, {result['dtype']}, {result['date']} "
             f"(full tables: [{bench_dir}/bench.md]({bench_dir}/bench.md); generated by "
             "`scripts/render_readme_results.py`, do not edit by hand).", ""]
    for t in temperatures(result):
        lines += _aims(result, t) + _per_task(result, t)
    lines += _vs_k(result)
    lines += _batch(result)
    lines += [f"![{title}]({bench_dir}/{name})" for name, title, _ in planned(result)]
    return "\n".join(lines).rstrip() + "\n"
