"""The shipped drafts with and without their draft vocabulary, side by side with plain decoding, on this machine's
CPU (the README demo's setting: float32, eager runner, chains of k=4 for the heads), greedy.

    OMP_NUM_THREADS=2 python results/cpu/draft_vocab/cpu_side_by_side.py OUT_DIR [PER_TASK] [MAX_NEW] [METHODS]

The eval prompts (PER_TASK per task, default 2; MAX_NEW new tokens, default 64), engines taking turns on each prompt
(`compare_methods`). METHODS (default eagle; comma-separated, of draft, medusa, eagle): for each, the shipped
artifact and a copy of it without its draft vocabulary (the same weights). Writes OUT_DIR/side_by_side.json (per
method and task: tokens/s, acceptance length, speedup; greedy outputs that differ from plain) and .md.
Session 26's first run (`cpu_side_by_side/`, eagle only) came from this script before METHODS existed.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console
from safetensors.torch import load_file, save_file

from specdeploy.bench.compare import compare_methods, task_table
from specdeploy.bench.tasks import TASKS, builtin_prompts
from specdeploy.config import SamplingParams, SpecConfig
from specdeploy.models import artifacts
from specdeploy.models.loader import load_model
from specdeploy.runtime.engine import SpecEngine

KINDS = {"draft": "draft_lm", "medusa": "medusa", "eagle": "eagle"}
out = Path(sys.argv[1])
per_task = int(sys.argv[2]) if len(sys.argv) > 2 else 2
max_new = int(sys.argv[3]) if len(sys.argv) > 3 else 64
methods = sys.argv[4].split(",") if len(sys.argv) > 4 else ["eagle"]
out.mkdir(parents=True, exist_ok=True)
torch.set_num_threads(2)
target = load_model("smollm2", device="cpu", dtype=torch.float32)
engines = [("none", SpecEngine(target, SpecConfig(method="none")))]
vocab_records = {}
for method in methods:
    shipped = artifacts.resolve(KINDS[method])
    whole = Path(tempfile.mkdtemp()) / shipped.name
    shutil.copytree(shipped, whole)
    weights = load_file(str(whole / artifacts.WEIGHTS))
    weights.pop("draft_vocab")
    save_file(weights, str(whole / artifacts.WEIGHTS))
    vocab_records[method] = artifacts.read_manifest(shipped, KINDS[method]).get("draft_vocab")
    engines += [(f"{method} whole vocab", SpecEngine(target, SpecConfig(method=method, k=4, draft=str(whole)))),
                (f"{method} draft vocab", SpecEngine(target, SpecConfig(method=method, k=4)))]
prompts = [q for t in TASKS for q in [p for p in builtin_prompts("eval") if p.task == t][:per_task]]
runs = compare_methods(engines, prompts, SamplingParams(max_new_tokens=max_new))
plain = runs[0]
result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
          "device": "cpu", "dtype": "float32", "threads": torch.get_num_threads(), "prompts": len(prompts),
          "max_new_tokens": max_new, "draft_vocab": vocab_records, "rows": []}
for run in runs:
    mismatches = sum(r.token_ids != p.token_ids for r, p in zip(run.results, plain.results))
    for task, s in [*run.stats.by_task.items(), ("all", run.stats.total())]:
        base = plain.stats.by_task[task] if task != "all" else plain.stats.total()
        result["rows"].append({"method": run.name, "task": task, "tokens_per_s": round(s.tokens_per_s, 2),
                               "acceptance_length": round(s.acceptance_length, 3),
                               "speedup_vs_plain": round(s.tokens_per_s / base.tokens_per_s, 3),
                               "greedy_mismatches": mismatches if task == "all" else None})
(out / "side_by_side.json").write_text(json.dumps(result, indent=1))
console = Console(record=True, width=110)
console.print(task_table(runs, title=f"CPU float32, k=4 chains, {len(prompts)} prompts, {max_new} new tokens"))
for run in runs[1:]:
    console.print(f"{run.name}: greedy outputs differing from plain: "
                  f"{sum(r.token_ids != p.token_ids for r, p in zip(run.results, plain.results))} / {len(prompts)}")
(out / "side_by_side.md").write_text("```\n" + console.export_text() + "```\n")
