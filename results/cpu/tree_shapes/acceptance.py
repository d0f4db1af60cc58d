"""EAGLE acceptance length against tree shape (depth k, tree_size nodes): CPU, float32, greedy, the shipped head
(with its draft vocabulary), the eval prompts (LIMIT per task), MAX_NEW new tokens. Acceptance does not depend on the
device (up to float32 against bfloat16 rounding); the GPU prices each shape by its verify query bucket
(results/gpu/session27).

    python results/cpu/tree_shapes/acceptance.py LIMIT MAX_NEW K:N,K:N,... OUT.json
"""
import json
import sys
import time

import torch

from specdeploy.bench.tasks import TASKS, builtin_prompts
from specdeploy.config import SamplingParams, SpecConfig
from specdeploy.runtime.engine import SpecEngine

limit, max_new = int(sys.argv[1]), int(sys.argv[2])
shapes = [tuple(int(x) for x in s.split(":")) for s in sys.argv[3].split(",")]
torch.set_num_threads(2)
prompts = [q for t in TASKS for q in [p for p in builtin_prompts("eval") if p.task == t][:limit]]
out, outputs = {}, {}
for k, n in shapes:
    engine = SpecEngine.load(SpecConfig(method="eagle", k=k, tree_size=n), "smollm2", "cpu")
    t0 = time.perf_counter()
    acc, texts = {}, []
    for p in prompts:
        ids = engine.encode(p.prompt, max_new_tokens=max_new)
        r = engine.generate_ids(ids, SamplingParams(max_new_tokens=max_new), p.task)
        a = acc.setdefault(p.task, [0, 0])
        a[0] += r.stats.emitted
        a[1] += r.stats.target_forwards
        texts.append(r.token_ids)
    key = f"{k}:{n}"
    out[key] = {"all": sum(a[0] for a in acc.values()) / sum(a[1] for a in acc.values()),
                **{t: a[0] / a[1] for t, a in acc.items()}}
    outputs[key] = texts
    print(key, f"{time.perf_counter() - t0:.0f}s", {t: round(v, 3) for t, v in out[key].items()}, flush=True)
    first = next(iter(outputs.values()))
    json.dump({"limit": limit, "max_new_tokens": max_new,
               "outputs_equal_across_shapes": all(v == first for v in outputs.values()),
               "acceptance_length": out}, open(sys.argv[4], "w"), indent=1)
