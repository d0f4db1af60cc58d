"""Tree depth chosen per step from the acceptance of an earlier step, scored offline from a depth-8 probe.py run.

    python results/cpu/eagle_calibration/adaptive_depth.py PROBE_K8.json BASE PER_LEVEL [OUT.md]

EAGLE-2 expands its frontier depth by depth, so the candidates of a depth-d tree are the depth-8 run's
candidates of depth <= d: each recorded step is scored at every depth d (the best 63 of those), along the
depth-8 run's steps (a shallower tree would split the text into other steps: an approximation shared by
every rule). A step at depth d costs BASE + PER_LEVEL * d plain steps (read off the GPU bench); a rule's
speedup is its tokens over its cost. Adaptive rules see the step two before (the loop queues the next
draft before the host reads the current verdict)."""
import json, sys
from collections import defaultdict

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from analyze import accepted, nodes_of  # noqa: E402

records = json.load(open(sys.argv[1]))
base, per_level = float(sys.argv[2]), float(sys.argv[3])
cost = lambda d: base + per_level * d  # noqa: E731


def at_depth(nodes, d):
    keep = [i for i, n in enumerate(nodes) if n[0] <= d]  # parents come first, so indices map in order
    index = {old: new for new, old in enumerate(keep)}
    sub = [(n[0], n[1], n[2], index.get(n[3], -1), n[4]) for n in (nodes[i] for i in keep)]
    return accepted(sub, [n[2] for n in sub], 63)


tasks = defaultdict(list)  # task -> per prompt: per step [tokens at depth 1..8]
for r in records:
    tasks[r["task"]].append([[at_depth(nodes_of(r, t), d) for d in range(1, 9)] for t in r["trees"]])


def fixed(d):
    return lambda history: d


def adaptive(lo, hi, margin):
    """Depth = what the step two before accepted (drafted tokens) + margin, within [lo, hi]."""
    return lambda history: lo if len(history) < 2 else max(lo, min(hi, history[-2] - 1 + margin))


rules = {f"fixed {d}": fixed(d) for d in (4, 5, 6, 7, 8)}
rules.update({f"adaptive [{lo}, {hi}], +{m}": adaptive(lo, hi, m) for lo, hi, m in
              [(4, 8, 1), (4, 8, 2), (5, 8, 1), (5, 8, 2), (3, 8, 2), (4, 8, 3)]})
lines = ["| rule | all | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
for name, rule in rules.items():
    per = {}
    tok_all = cost_all = 0.0
    for task, prompts in tasks.items():
        tok = c = 0.0
        for steps in prompts:
            history = []
            for row in steps:
                d = rule(history)
                history.append(row[d - 1])
                tok += row[d - 1]
                c += cost(d)
        per[task] = tok / c
        tok_all += tok; cost_all += c
    lines.append(f"| {name} | {tok_all / cost_all:.3f}x | " + " | ".join(f"{v:.2f}x" for v in per.values()) + " |")
text = "\n".join(lines)
print(text)
if len(sys.argv) > 4:
    open(sys.argv[4], "w").write(text + "\n")
