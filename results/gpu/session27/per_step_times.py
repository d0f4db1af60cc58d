"""Per-step wall time of the policy rows against the EAGLE rows of the same k, from a bench.json (batch 1):
ms a step = 1000 x acceptance length / tokens/s (prefill included, so an estimate). Same engine, same k: any gap
is noise between rows of one run.

    python results/gpu/session27/per_step_times.py results/bench/bench.json
"""
import json
import sys

rows = [r for r in json.load(open(sys.argv[1]))["rows"] if r["batch"] == 1 and r["system"] == "specdeploy"]
print("| T | task | policy k | policy ms/step | eagle ms/step, same k | ratio |")
print("|---|---|---|---|---|---|")
for r in rows:
    if r["method"] != "policy" or r["task"] == "all" or len(r["policy_decisions"]) != 1:
        continue
    k = int(next(iter(r["policy_decisions"])))
    e = next((x for x in rows if x["method"] == "eagle" and x["k"] == k and x["task"] == r["task"]
              and x["temperature"] == r["temperature"]), None)
    if e is None:
        continue
    pm, em = (1000 * x["acceptance_length"] / x["tokens_per_s"] for x in (r, e))
    print(f"| {r['temperature']} | {r['task']} | {k} | {pm:.2f} | {em:.2f} | {pm / em:.2f} |")
