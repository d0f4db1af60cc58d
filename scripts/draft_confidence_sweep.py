"""Sweep the draft confidence threshold on training-style prompts (never the eval set), CPU fp32.

For each method and threshold: α, acceptance length and draft tokens per step per task, and the
number of outputs that differ from plain greedy (must be 0). One JSON line per (method, τ, task).

    python scripts/draft_confidence_sweep.py creative_writing,qa 5 96 0,0.1,0.25,0.4 draft
    python scripts/draft_confidence_sweep.py creative_writing,qa 5 96 0,0.005,0.01,0.02 medusa
(args: tasks, prompts per task, max_new_tokens, thresholds, methods, [temperature])
"""
import json
import sys
import time

import torch

from specdeploy.config import SamplingParams, SpecConfig
from specdeploy.models.loader import load_model
from specdeploy.runtime.engine import SpecEngine
from specdeploy.training.prompt_sources import training_prompts


def main() -> None:
    torch.set_num_threads(2)
    tasks = sys.argv[1].split(",")
    n, max_new = int(sys.argv[2]), int(sys.argv[3])
    taus = [float(t) for t in sys.argv[4].split(",")]
    methods = sys.argv[5].split(",")
    temp = float(sys.argv[6]) if len(sys.argv) > 6 else 0.0
    target = load_model("smollm2", device="cpu", dtype=torch.float32)
    prompts = [p for p in training_prompts(40, seed=987) if p.task in tasks]  # seed 987: not the training data's
    by_task = {t: [p for p in prompts if p.task == t][:n] for t in tasks}
    plain = SpecEngine(target, SpecConfig(method="none"))
    ref = {}
    for t, group in by_task.items():
        for i, p in enumerate(group):
            ids = plain.encode(p.prompt, max_new_tokens=max_new)
            params = SamplingParams(max_new_tokens=max_new, temperature=temp, seed=i)
            ref[(t, i)] = (ids, plain.generate_ids(ids, params, t).token_ids)
    for m in methods:
        for tau in taus:
            engine = SpecEngine(target, SpecConfig(method=m, k=4, draft_confidence=tau))
            for t, group in by_task.items():
                acc = prop = steps = emitted = mism = 0
                t0 = time.time()
                for i, p in enumerate(group):
                    ids, want = ref[(t, i)]
                    r = engine.generate_ids(ids, SamplingParams(max_new_tokens=max_new, temperature=temp, seed=i), t)
                    s = r.stats
                    acc, prop, steps, emitted = acc + s.accepted, prop + s.proposed, steps + s.target_forwards, emitted + s.emitted
                    mism += r.token_ids != want
                print(json.dumps(dict(method=m, tau=tau, task=t, alpha=round(acc / max(prop, 1), 3),
                                      acc_len=round(emitted / steps, 2), proposed_per_step=round(prop / steps, 2),
                                      mismatches=mism, s=round(time.time() - t0, 1))), flush=True)


if __name__ == "__main__":
    main()
