"""EAGLE acceptance by tree depth k and expansion width (tree_topk), 63 nodes: CPU, float32, greedy."""
import json, sys, time
import torch
from specdeploy.bench.tasks import TASKS, builtin_prompts
from specdeploy.config import SamplingParams, SpecConfig
from specdeploy.runtime.engine import SpecEngine

limit, max_new = int(sys.argv[1]), int(sys.argv[2])
configs = [tuple(int(v) for v in c.split(":")) for c in sys.argv[3].split(",")]
torch.set_num_threads(2)
prompts = [q for t in TASKS for q in [p for p in builtin_prompts("eval") if p.task == t][:limit]]
out = {}
for depth, topk in configs:
    engine = SpecEngine.load(SpecConfig(method="eagle", k=depth, tree_size=63, tree_topk=topk), "smollm2", "cpu")
    t0 = time.perf_counter(); acc = {}; em = fw = 0
    for p in prompts:
        r = engine.generate_ids(engine.encode(p.prompt, max_new_tokens=max_new), SamplingParams(max_new_tokens=max_new), p.task)
        em += r.stats.emitted; fw += r.stats.target_forwards
        a = acc.setdefault(p.task, [0, 0]); a[0] += r.stats.emitted; a[1] += r.stats.target_forwards
    out[f"{depth}:{topk}"] = {"all": em / fw, **{t: a[0] / a[1] for t, a in acc.items()}}
    print(depth, topk, f"{time.perf_counter()-t0:.0f}s", {k: round(v, 2) for k, v in out[f'{depth}:{topk}'].items()}, flush=True)
    json.dump(out, open("/tmp/shape_probe.json", "w"), indent=1)
