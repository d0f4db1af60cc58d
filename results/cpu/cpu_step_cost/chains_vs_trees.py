"""Chains against trees for each tree method on this CPU (float32, eager torch runner): speedup over plain,
acceptance length and greedy outputs that differ from plain, the first eval prompt of each task, 48 new
tokens, the engines taking turns on each prompt. Configs are method:k:tree_size ('d': the method's default tree,
0: a chain).

    OMP_NUM_THREADS=2 python results/cpu/cpu_step_cost/chains_vs_trees.py eagle:2:0,eagle:4:d,...
"""
import sys, time, torch
from specdeploy.models.loader import load_model
from specdeploy.config import SpecConfig, SamplingParams
from specdeploy.runtime.engine import SpecEngine
from specdeploy.bench.tasks import builtin_prompts
torch.set_num_threads(2)
m = load_model("smollm2", device="cpu", dtype=torch.float32)
firsts = {}
for p in builtin_prompts("eval"):
    firsts.setdefault(p.task, p)
prompts = list(firsts.values())
params = SamplingParams(max_new_tokens=48)
cfgs = [("none", 1, None)] + [tuple(c.split(":")) for c in sys.argv[1].split(",")]
engines = {c: SpecEngine(m, SpecConfig(method=c[0], k=int(c[1]), tree_size=None if c[2] in (None, "d") else int(c[2]))) for c in cfgs}
tot = {c: 0.0 for c in cfgs}; acc = {c: [] for c in cfgs}; mism = {c: 0 for c in cfgs}
for p in prompts:
    ref = None
    for c, e in engines.items():
        t = time.perf_counter(); g = e.generate(p.prompt, params); tot[c] += time.perf_counter() - t
        acc[c].append(g.stats.acceptance_length); ref = ref or g.token_ids; mism[c] += g.token_ids != ref
base = tot[cfgs[0]]
for c in cfgs:
    print(":".join(map(str, c)), f"speedup {base / tot[c]:.2f}x acc {sum(acc[c]) / len(acc[c]):.2f} mism {mism[c]}", flush=True)
