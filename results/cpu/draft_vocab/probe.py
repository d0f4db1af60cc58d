"""EAGLE acceptance when the draft may only propose token ids < N (its LM head truncated; the target
verifies as ever): CPU, float32, the eval prompts (LIMIT per task), greedy, 96 new tokens."""
import json, sys, time
import torch
from specdeploy.bench.tasks import TASKS, builtin_prompts
from specdeploy.config import SamplingParams, SpecConfig
from specdeploy.runtime.engine import SpecEngine

limit, max_new = int(sys.argv[1]), int(sys.argv[2])
Ns = [int(x) for x in sys.argv[3].split(",")]
torch.set_num_threads(2)
engine = SpecEngine.load(SpecConfig(method="eagle", k=4, tree_size=63), "smollm2", "cpu")
step = engine.proposer.step
real = step.lm_head
prompts = [q for t in TASKS for q in [p for p in builtin_prompts("eval") if p.task == t][:limit]]
out = {}
for N in Ns:
    def masked(x, N=N):
        y = real(x)
        y[..., N:] = float("-inf")
        return y
    step.lm_head = masked
    t0 = time.perf_counter(); acc = {}; em = fw = 0
    for i, p in enumerate(prompts):
        r = engine.generate_ids(engine.encode(p.prompt, max_new_tokens=max_new), SamplingParams(max_new_tokens=max_new), p.task)
        em += r.stats.emitted; fw += r.stats.target_forwards
        a = acc.setdefault(p.task, [0, 0]); a[0] += r.stats.emitted; a[1] += r.stats.target_forwards
    out[N] = {"all": em / fw, **{t: a[0] / a[1] for t, a in acc.items()}}
    print(N, f"{time.perf_counter()-t0:.0f}s", {k: round(v, 3) for k, v in out[N].items()}, flush=True)
json.dump(out, open("/tmp/vocab_probe.json", "w"), indent=1)
