"""Acceptance of every proposer on the evaluation prompts: the results in results/drafts/.

`python -m specdeploy.training.report run --label eagle --method eagle --k 6 ...` runs one
method on the packaged eval prompts (8 per task type) and writes its per-task counters
(and each greedy output, to compare with plain decoding) as JSON, rewritten after every
prompt so a run cut short still reports what it did. Several runs can share one GPU in
parallel processes (each is launch-bound). `... table A.json B.json --out DIR` merges them
into results.json and a markdown table: α and mean acceptance length per task, greedy and
T=0.7, and how many greedy outputs differ from plain decoding.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from specdeploy.bench.tasks import TASKS, builtin_prompts
from specdeploy.config import SamplingParams, SpecConfig
from specdeploy.runtime.engine import SpecEngine
from specdeploy.runtime.stats import TaskStats


def run(args: argparse.Namespace) -> None:
    spec = SpecConfig(method=args.method, k=args.k, draft=args.draft, tree_size=args.tree_size, tree_topk=args.tree_topk,
                      draft_confidence=args.draft_confidence)
    engine = SpecEngine.load(spec, args.target, args.device, args.dtype)
    per_task = [[q for q in builtin_prompts("eval") if q.task == t][: args.limit or None] for t in TASKS]
    # round robin over tasks, so that a run cut short still covers every task
    prompts = [group[i] for i in range(max(map(len, per_task))) for group in per_task if i < len(group)]
    stats, outputs = TaskStats(), []
    out = Path(args.out)
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        params = SamplingParams(temperature=args.temperature, seed=i, max_new_tokens=args.max_new_tokens)
        ids = engine.encode(p.prompt, max_new_tokens=args.max_new_tokens)
        r = engine.generate_ids(ids, params, p.task)
        stats.add(p.task, r.stats)
        outputs.append(r.token_ids)
        record = {
            "label": args.label, "method": args.method, "k": args.k, "tree_size": args.tree_size,
            "tree_topk": args.tree_topk, "draft_confidence": spec.confidence, "draft": args.draft, "temperature": args.temperature,
            "max_new_tokens": args.max_new_tokens, "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "dtype": str(next(engine.target.model.parameters()).dtype), "prompts_done": i + 1, "prompts_total": len(prompts),
            "seconds": round(time.perf_counter() - start, 1),
            "by_task": {t: s.as_dict() for t, s in stats.by_task.items()}, "total": stats.total().as_dict(),
            "outputs": outputs,
        }
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(out)
        print(f"[{args.label} T={args.temperature}] {i + 1}/{len(prompts)} {p.task} α={r.stats.alpha} "
              f"len={r.stats.acceptance_length:.2f}", file=sys.stderr, flush=True)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def table(args: argparse.Namespace) -> None:
    runs = [json.loads(Path(f).read_text()) for f in args.files]
    none = {r["temperature"]: r for r in runs if r["method"] == "none"}
    for r in runs:  # greedy outputs that differ from plain decoding (bf16 can flip near-ties)
        base = none.get(r["temperature"])
        if r["temperature"] == 0 and base is not None:
            pairs = list(zip(r["outputs"], base["outputs"]))
            r["greedy_mismatches"] = sum(a != b for a, b in pairs)
            r["greedy_compared"] = len(pairs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    labels = list(dict.fromkeys(r["label"] for r in runs))
    temps = sorted({r["temperature"] for r in runs})
    by = {(r["label"], r["temperature"]): r for r in runs}
    lines = [f"# Acceptance per task on the eval prompts ({runs[0]['device']}, {runs[0]['dtype']}, "
             f"max_new_tokens={runs[0]['max_new_tokens']})", "",
             "α = accepted / proposed draft tokens (for trees: per tree depth, the most one step can accept); "
             "acc. length = tokens emitted per target forward (bonus token included). ", ""]
    header = "| task | " + " | ".join(f"{lab} T={t:g}" for lab in labels for t in temps) + " |"
    lines += ["## mean acceptance length", "", header, "|" + "---|" * (1 + len(labels) * len(temps))]
    for task in list(TASKS) + ["all"]:
        cells = []
        for lab in labels:
            for t in temps:
                r = by.get((lab, t))
                s = None if r is None else (r["total"] if task == "all" else r["by_task"].get(task))
                cells.append(_fmt(s and s["acceptance_length"]))
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines += ["", "## α", "", header, "|" + "---|" * (1 + len(labels) * len(temps))]
    for task in list(TASKS) + ["all"]:
        cells = []
        for lab in labels:
            for t in temps:
                r = by.get((lab, t))
                s = None if r is None else (r["total"] if task == "all" else r["by_task"].get(task))
                cells.append(_fmt(s and s["alpha"]))
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines += ["", "## runs", "", "| label | method | k | tree size | T | prompts | greedy outputs ≠ none | tokens/s | seconds | run |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        mism = f"{r['greedy_mismatches']}/{r['greedy_compared']}" if "greedy_mismatches" in r else "-"
        lines.append(f"| {r['label']} | {r['method']} | {r['k']} | {r['tree_size'] if r['tree_size'] is not None else 'default'} "
                     f"| {r['temperature']:g} | {r['prompts_done']}/{r['prompts_total']} | {mism} "
                     f"| {r['total']['tokens_per_s']:.1f} | {r['seconds']} | {r.get('run', '')} |")
    (out / "README.md").write_text("\n".join(lines) + "\n")
    for r in runs:
        r.pop("outputs", None)
    (out / "results.json").write_text(json.dumps(runs, indent=1) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m specdeploy.training.report")
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--label", required=True)
    r.add_argument("--method", required=True)
    r.add_argument("--k", type=int, default=4)
    r.add_argument("--draft")
    r.add_argument("--tree-size", type=int)
    r.add_argument("--tree-topk", type=int, default=8)
    r.add_argument("--draft-confidence", type=float, help="default: the method's")
    r.add_argument("--temperature", type=float, default=0.0)
    r.add_argument("--max-new-tokens", type=int, default=128)
    r.add_argument("--limit", type=int, help="prompts per task (default: all 8)")
    r.add_argument("--target", default="smollm2")
    r.add_argument("--device", default="cpu")
    r.add_argument("--dtype")
    r.add_argument("--out", required=True)
    r.set_defaults(func=run)
    t = sub.add_parser("table")
    t.add_argument("files", nargs="+")
    t.add_argument("--out", required=True)
    t.set_defaults(func=table)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
