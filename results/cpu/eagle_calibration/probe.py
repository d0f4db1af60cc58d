"""Every candidate node of every EAGLE tree (before the best `tree_size` are kept), with its draft score
(cumulative log-probability), depth, and whether its path is what the target then emitted: CPU, float32,
greedy, the shipped head, depth K, 63 nodes kept, the first LIMIT eval prompts of each task.

    python results/cpu/eagle_calibration/probe.py LIMIT MAX_NEW K OUT.json

Greedy output does not depend on the tree, so any other rule for choosing the kept nodes among the same
candidates can be scored offline from OUT.json (analyze.py)."""
import json, sys, time
import torch
import specdeploy.runtime.head_proposers as hp
from specdeploy.bench.tasks import TASKS, builtin_prompts
from specdeploy.config import SamplingParams, SpecConfig
from specdeploy.runtime.engine import SpecEngine

limit, max_new, depth, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(2)
engine = SpecEngine.load(SpecConfig(method="eagle", k=depth, tree_size=63), "smollm2", "cpu")
proposer = engine.proposer
trees = []  # per draft: (context length, tok, score, parent) of every candidate
real_best, real_propose = hp.best_nodes, proposer.propose


def recording_best(tok, score, parent, size):
    trees[-1].update(tok=tok.tolist(), score=score.tolist(), parent=parent.tolist())
    return real_best(tok, score, parent, size)


def recording_propose(ctx, k):
    trees.append({"at": len(ctx.token_ids)})
    return real_propose(ctx, k)


hp.best_nodes, proposer.propose = recording_best, recording_propose
prompts = [q for t in TASKS for q in [p for p in builtin_prompts("eval") if p.task == t][:limit]]
records, t0 = [], time.perf_counter()
for p in prompts:
    trees.clear()
    ids = engine.encode(p.prompt, max_new_tokens=max_new)
    r = engine.generate_ids(ids, SamplingParams(max_new_tokens=max_new), p.task)
    records.append({"task": p.task, "tokens": list(ids) + r.token_ids, "trees": [t for t in trees if "tok" in t],
                    "acceptance_length": r.stats.emitted / r.stats.target_forwards})
    print(p.task, f"{time.perf_counter() - t0:.0f}s", round(records[-1]["acceptance_length"], 2), flush=True)
json.dump(records, open(out, "w"))
