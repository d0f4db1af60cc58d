"""EAGLE acceptance length against tree shape (depth k, tree_size nodes): CPU, float32, greedy, the shipped head
(with its draft vocabulary), the eval prompts (LIMIT per task), MAX_NEW new tokens. Acceptance does not depend on the
device (up to float32 against bfloat16 rounding); the GPU prices each shape by its verify query bucket
(results/gpu/session27).

    python results/cpu/tree_shapes/acceptance.py LIMIT MAX_NEW K:N,K:N,... OUT.json
"""
import json
import sys

import torch

from specdeploy.bench.compare import compare_methods
from specdeploy.bench.tasks import TASKS, builtin_prompts
from specdeploy.config import SamplingParams, SpecConfig
from specdeploy.runtime.engine import SpecEngine

limit, max_new, shapes = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(",")
torch.set_num_threads(2)
prompts = [q for t in TASKS for q in [p for p in builtin_prompts("eval") if p.task == t][:limit]]
engines = [(s, SpecEngine.load(SpecConfig(method="eagle", k=int(s.split(":")[0]), tree_size=int(s.split(":")[1])),
                               "smollm2", "cpu")) for s in shapes]
runs = compare_methods(engines, prompts, SamplingParams(max_new_tokens=max_new))
out = {r.name: {"all": r.stats.total().acceptance_length,
                **{t: s.acceptance_length for t, s in r.stats.by_task.items()}} for r in runs}
for name, acc in out.items():
    print(name, {t: round(v, 3) for t, v in acc.items()}, flush=True)
outputs = [[x.token_ids for x in r.results] for r in runs]
json.dump({"limit": limit, "max_new_tokens": max_new,
           "outputs_equal_across_shapes": all(o == outputs[0] for o in outputs),
           "acceptance_length": out}, open(sys.argv[4], "w"), indent=1)
