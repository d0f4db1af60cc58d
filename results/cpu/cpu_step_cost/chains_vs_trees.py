"""Chains against trees for each tree method on this CPU (float32, eager torch runner): speedup over plain,
acceptance length and greedy outputs that differ from plain, the first eval prompt of each task, 48 new
tokens, the engines taking turns on each prompt (`bench.compare.compare_methods`). Configs are
method:k:tree_size (0: a chain; 48: session 21's default trees, EAGLE's 48 nodes and Medusa's 48-node artifact tree).

    OMP_NUM_THREADS=2 python results/cpu/cpu_step_cost/chains_vs_trees.py eagle:2:0,eagle:4:48,...
"""
import sys

import torch

from specdeploy.bench.compare import compare_methods
from specdeploy.bench.tasks import builtin_prompts
from specdeploy.config import SamplingParams, SpecConfig
from specdeploy.models.loader import load_model
from specdeploy.runtime.engine import SpecEngine

torch.set_num_threads(2)
loaded = load_model("smollm2", device="cpu", dtype=torch.float32)
firsts = {}
for p in builtin_prompts("eval"):
    firsts.setdefault(p.task, p)
configs = ["none:1:0"] + sys.argv[1].split(",")
engines = []
for c in configs:
    method, k, size = c.split(":")
    engines.append((c, SpecEngine(loaded, SpecConfig(method=method, k=int(k), tree_size=int(size)))))
runs = compare_methods(engines, list(firsts.values()), SamplingParams(max_new_tokens=48))
plain = runs[0]
for run in runs:
    s = run.stats.total()
    mismatches = sum(a.token_ids != b.token_ids for a, b in zip(run.results, plain.results))
    print(run.name, f"speedup {s.tokens_per_s / plain.stats.total().tokens_per_s:.2f}x acc {s.acceptance_length:.2f} "
          f"mism {mismatches}", flush=True)
