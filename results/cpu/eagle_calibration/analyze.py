"""Score rules for keeping an EAGLE tree's nodes, offline, from probe.py's candidates (see its docstring).

    python results/cpu/eagle_calibration/analyze.py PROBE.json [OUT.md]

For each drafted tree, a rule ranks the candidate nodes and keeps the best N (with their ancestors); the step
then accepts the deepest kept node on the path the target emitted, plus its own token. Printed: the draft's
calibration per depth (the mean conditional probability of a node against how often the target emitted it,
its parent's path given), and the mean accepted length per step under each rule, overall and per task. Rules
fitted to data are fitted on one half of the prompts and scored on the other, then the halves swap."""
import json, math, sys
from collections import defaultdict

def nodes_of(rec, tree):
    """Per candidate: (depth, conditional log-prob, cumulative log-prob, parent, matched)."""
    toks, at = rec["tokens"], tree["at"]
    out = []
    for i, (t, s, p) in enumerate(zip(tree["tok"], tree["score"], tree["parent"])):
        if p < 0:
            depth, cond, ok_parent = 1, s, True
        else:
            pd, _, ps, _, pm = out[p]
            depth, cond, ok_parent = pd + 1, s - ps, pm
        pos = at + depth - 1
        matched = ok_parent and pos < len(toks) and toks[pos] == t
        out.append((depth, cond, s, p, matched))
    return out


def accepted(nodes, keys, size):
    """Tokens a step emits when the `size` best nodes by key are kept (ancestors of a kept node kept first)."""
    order = sorted(range(len(nodes)), key=lambda i: -keys[i])
    kept = set()
    for i in order:
        chain, j = [], i
        while j >= 0 and j not in kept:
            chain.append(j)
            j = nodes[j][3]
        if len(kept) + len(chain) > size:
            continue
        kept.update(chain)
        if len(kept) == size:
            break
    return 1 + max((nodes[i][0] for i in kept if nodes[i][4]), default=0)


def calibration(subset):
    """Per depth and bin of conditional probability: [sum prob, matched, count], over nodes whose parent matched."""
    table = defaultdict(lambda: [0.0, 0, 0])
    for _, _, nodes in subset:
        for d, cond, _, p, m in nodes:
            if p < 0 or nodes[p][4]:
                b = table[(d, min(int(math.exp(cond) * 10), 9))]
                b[0] += math.exp(cond); b[1] += m; b[2] += 1
    return table


def calibrated_keys(table):
    def cal(d, cond):
        s, m, n = table.get((d, min(int(math.exp(cond) * 10), 9)), (0, 0, 0))
        return (m + 1) / (n + 2)  # matched share in the bin, smoothed
    def keys(nodes):
        out = []
        for d, cond, _, p, _ in nodes:
            out.append(math.log(cal(d, cond)) + (out[p] if p >= 0 else 0.0))
        return out
    return keys


def main() -> None:
    records = json.load(open(sys.argv[1]))
    steps = [(r["task"], i, nodes_of(r, t)) for i, r in enumerate(records) for t in r["trees"]]
    rules = {f"cumulative log-prob, {n} nodes": (lambda nodes: [x[2] for x in nodes], n) for n in (31, 47, 63, 95, 127)}
    halves = [[s for s in steps if s[1] % 2 == h] for h in (0, 1)]
    fitted = {h: calibrated_keys(calibration(halves[1 - h])) for h in (0, 1)}

    lines = ["| depth | nodes (parent on path) | mean draft prob | target emitted |", "|---|---|---|---|"]
    table = calibration(steps)
    for d in sorted({d for d, _ in table}):
        s = sum(v[0] for (dd, _), v in table.items() if dd == d)
        m = sum(v[1] for (dd, _), v in table.items() if dd == d)
        n = sum(v[2] for (dd, _), v in table.items() if dd == d)
        lines.append(f"| {d} | {n} | {s / n:.3f} | {m / n:.3f} |")
    lines += ["", "| rule | all | " + " | ".join(dict.fromkeys(t for t, _, _ in steps)) + " |",
              "|---|---|" + "---|" * len(dict.fromkeys(t for t, _, _ in steps))]
    results = {}
    for name, (key, n) in list(rules.items()) + [("calibrated per depth (other half's bins), 63 nodes", (None, 63))]:
        per = defaultdict(list)
        for task, i, nodes in steps:
            keys = key(nodes) if key else fitted[i % 2](nodes)
            per[task].append(accepted(nodes, keys, n))
        allv = [v for vs in per.values() for v in vs]
        results[name] = {"all": sum(allv) / len(allv), **{t: sum(v) / len(v) for t, v in per.items()}}
        lines.append(f"| {name} | {results[name]['all']:.3f} | " + " | ".join(f"{results[name][t]:.2f}" for t in per) + " |")
    text = "\n".join(lines)
    print(text)
    if len(sys.argv) > 2:
        open(sys.argv[2], "w").write(text + "\n")


if __name__ == "__main__":
    main()
