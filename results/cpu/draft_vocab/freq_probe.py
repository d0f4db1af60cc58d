"""EAGLE acceptance when the draft may only propose the N ids the target emits most often (FR-Spec's
frequency-ranked draft vocabulary; the target verifies as ever, so output is unchanged): CPU, float32,
the eval prompts (LIMIT per task), greedy, MAX_NEW new tokens, eagle k=K with 63 nodes.

    python results/cpu/draft_vocab/freq_probe.py LIMIT MAX_NEW K N1,N2,... COUNTS.safetensors OUT.json

COUNTS: {"counts": [vocab] int64}, how often each id occurs in the answers of the distillation data
(`freq_counts.py`); N = 0 stands for the whole vocabulary, N < 0 for the -N most frequent ids and the
prompt's own ids."""
import json
import sys
import time

import torch
from safetensors.torch import load_file

from specdeploy.bench.tasks import TASKS, builtin_prompts
from specdeploy.config import SamplingParams, SpecConfig
from specdeploy.runtime.engine import SpecEngine

limit, max_new, k = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
Ns = [int(x) for x in sys.argv[4].split(",")]
order = load_file(sys.argv[5])["counts"].argsort(descending=True, stable=True)
torch.set_num_threads(2)
engine = SpecEngine.load(SpecConfig(method="eagle", k=k, tree_size=63), "smollm2", "cpu")
step = engine.proposer.step
real = engine.target.model.get_output_embeddings()  # the whole LM head (the shipped head's own draft vocabulary aside)
prompts = [q for t in TASKS for q in [p for p in builtin_prompts("eval") if p.task == t][:limit]]
out = {}
for N in Ns:
    base = torch.zeros(real.weight.shape[0], dtype=torch.bool)
    base[order[: abs(N)] if N else order] = True
    keep = base.clone()

    def masked(x):
        return real(x).masked_fill(~keep, float("-inf"))
    step.lm_head = masked
    t0 = time.perf_counter()
    acc, tokens, texts = {}, {}, []
    for p in prompts:
        ids = engine.encode(p.prompt, max_new_tokens=max_new)
        keep.copy_(base)
        if N < 0:
            keep[ids] = True
        r = engine.generate_ids(ids, SamplingParams(max_new_tokens=max_new), p.task)
        a = acc.setdefault(p.task, [0, 0])
        a[0] += r.stats.emitted
        a[1] += r.stats.target_forwards
        texts.append(r.token_ids)
    out[N or "all"] = {"all": sum(a[0] for a in acc.values()) / sum(a[1] for a in acc.values()),
                       **{t: a[0] / a[1] for t, a in acc.items()}, "outputs": texts}
    print(N or "all", f"{time.perf_counter() - t0:.0f}s", {t: round(v, 3) for t, v in out[N or "all"].items()
                                                          if t != "outputs"}, flush=True)
same = all(v["outputs"] == out["all"]["outputs"] for v in out.values()) if "all" in out else None
json.dump({"limit": limit, "max_new_tokens": max_new, "k": k, "outputs_equal_across_N": same,
           "acceptance_length": {str(n): {t: v for t, v in r.items() if t != "outputs"} for n, r in out.items()}},
          open(sys.argv[6], "w"), indent=1)
