"""Modelled speedup of the lookup-first `multi` rule against its parts, per task (not a timing).

For every position of each eval prompt's greedy continuation (float32, CPU), it drafts with the
n-gram lookup and with the shipped EAGLE head (k-deep tree) and counts how many tokens the target's
greedy output accepts from each (greedy acceptance is a property of the context, not of the
device). Walking each continuation step by step under a rule (n-gram always, EAGLE always, the
old merged tree, lookup-first) and charging every step the per-step costs a GPU bench measured
(`--costs`: bench.json's policy.costs, the parts the advisor timed until it timed whole steps:
drafting + verify at the step's query length + the method's per-step overhead; benches up to
results/bench_history/088f6b3 have them) gives a modelled speedup over plain decoding. The model's EAGLE
column can be checked against the same bench's measured EAGLE row.

    python scripts/lookup_first_model.py --costs results/bench_history/088f6b3/bench.json --out results/cpu/lookup_first_model
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from specdeploy.bench.advisor import StepCosts
from specdeploy.bench.tasks import builtin_prompts
from specdeploy.config import SamplingParams, SpecConfig
from specdeploy.models.loader import load_model
from specdeploy.runtime.engine import SpecEngine
from specdeploy.runtime.head_proposers import build_head_proposer
from specdeploy.runtime.proposers import NGramProposer
from specdeploy.runtime.tree import children_of
from specdeploy.runtime.types import Context, Draft


def accepted(draft: Draft, rest: list[int]) -> int:
    """Greedy acceptance: the longest root path of the draft (chain or tree) that the continuation follows."""
    tokens = draft.tokens.tolist()
    if draft.parents is None:
        n = 0
        while n < len(tokens) and n < len(rest) and tokens[n] == rest[n]:
            n += 1
        return n
    kids, node, n = children_of(draft.parents.tolist()), -1, 0
    while n < len(rest):
        node = next((c for c in kids[node] if tokens[c] == rest[n]), None)
        if node is None:
            break
        n += 1
    return n


def positions(k: int, max_new: int) -> list[dict]:
    """Per prompt: task, and per position (lookup matched?, lookup accepted, EAGLE accepted)."""
    target = load_model("smollm2", dtype=torch.float32)
    engine = SpecEngine(target, SpecConfig(method="none"))
    lookup, eagle = NGramProposer(), build_head_proposer(SpecConfig(method="eagle", k=k), target)
    params = SamplingParams(max_new_tokens=max_new)
    out = []
    for p in tqdm(builtin_prompts("eval"), desc="positions"):
        ids = engine.encode(p.prompt, max_new_tokens=max_new)
        gen = engine.generate_ids(ids, params).token_ids
        with torch.no_grad():
            hidden = target.model(torch.tensor([ids + gen]), output_hidden_states=True).hidden_states[-1][0]
        eagle.reset()
        rows = []
        for t in range(len(gen) - 1):  # pending token gen[t]; drafts continue at gen[t + 1]
            ctx = Context(token_ids=ids + gen[: t + 1], prompt_len=len(ids), params=params,
                          target_hidden=hidden[: len(ids) + t])
            chain, rest = lookup.propose(ctx, k), gen[t + 1:]
            rows.append((chain.k > 0, accepted(chain, rest), accepted(eagle.propose(ctx, k), rest)))
        out.append({"task": p.task, "rows": rows})
    return out


def step_ms(costs: dict, method: str, k: int) -> float:
    c = costs[method]
    target = StepCosts({int(q): ms for q, ms in c["target_ms"].items()})
    if method == "none":
        return target.target(1) + c.get("overhead_ms", 0.0)
    draft = c.get("draft_ms_at", {}).get(str(k), c["draft_ms"])
    query = c.get("verify_query_at", {}).get(str(k), k + 1)
    return draft + target.target(query) + c.get("overhead_ms", 0.0)


def modelled(data: list[dict], costs: dict, k: int) -> dict[str, dict[str, float]]:
    """{rule: {task: mean modelled speedup over the task's prompts}}."""
    ngram, eagle, merged = step_ms(costs, "ngram", k), step_ms(costs, "eagle", k), step_ms(costs, "multi", k)
    rules = {  # (accepted tokens, step ms) of a position under each rule
        f"ngram k={k}": lambda m, a_ng, a_e: (a_ng, ngram),
        f"eagle k={k}": lambda m, a_ng, a_e: (a_e, eagle),
        f"merged tree k={k} (the old multi)": lambda m, a_ng, a_e: (max(a_ng, a_e), merged),
        f"lookup-first k={k} (multi)": lambda m, a_ng, a_e: (a_ng, ngram) if m else (a_e, eagle),
    }
    plain = step_ms(costs, "none", k)
    out: dict[str, dict[str, list[float]]] = {r: defaultdict(list) for r in rules}
    for p in data:
        for name, rule in rules.items():
            t, ms = 0, 0.0
            while t < len(p["rows"]):
                acc, cost = rule(*p["rows"][t])
                t, ms = t + acc + 1, ms + cost
            out[name][p["task"]].append(len(p["rows"]) * plain / ms)
    return {r: {task: statistics.fmean(v) for task, v in by.items()} for r, by in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--costs", default="results/bench/bench.json", help="a bench.json with measured step costs")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--out", default="results/cpu/lookup_first_model")
    a = ap.parse_args()
    bench = json.loads(Path(a.costs).read_text())
    data = positions(a.k, a.max_new_tokens)
    speedups = modelled(data, bench["policy"]["costs"], a.k)
    matched = [m for p in data for m, _, _ in p["rows"]]
    tasks = sorted({p["task"] for p in data})
    lines = [f"# Modelled speedup over plain decoding (not a timing): `python {' '.join(sys.argv)}`",
             "", f"Acceptance measured on CPU (float32, {len(data)} eval prompts, {len(matched)} positions; the lookup "
             f"matched at {sum(matched) / len(matched):.0%} of them); step costs: policy.costs of {a.costs} ({bench['device']}, "
             f"{bench['date']}).", "",
             "| rule | " + " | ".join(tasks) + " | mean | min |", "|---" * (len(tasks) + 3) + "|"]
    for rule, by in speedups.items():
        v = [by[t] for t in tasks]
        lines.append(f"| {rule} | " + " | ".join(f"{x:.2f}x" for x in v) + f" | {statistics.fmean(v):.2f}x | {min(v):.2f}x |")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"costs_from": a.costs, "k": a.k, "speedups": speedups,
                                                    "positions": data}) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
