"""Why speculation barely pays on this CPU, and what would change it (a study, not product code).

    OMP_NUM_THREADS=2 python results/cpu/cpu_step_cost/probe.py OUT.json [ONNX_BUNDLE]

1. A target step's cost against its query length q (the pending token + q - 1 draft tokens), after a
   200-token cache, median of 8: the eager torch runner in float32 and in bfloat16, and the ONNX Runtime
   runner (float32, CPU provider) of an `export --format onnx` bundle when one is given.
2. The LM head alone (49,152 x 576), float32 and bfloat16, for 1 to 16 rows: what each EAGLE draft
   level (8 rows) or draft-model token (1 row) pays.
3. End to end, the first eval prompt of each task, 64 new tokens, greedy: plain and eagle (k=4, 48 nodes)
   with the target in float32 and in bfloat16 (speedup against plain of the same dtype, greedy outputs
   that differ from it), and eagle in float32 with the head drafting in bfloat16 (its drafts change,
   the target's verdicts do not: output stays the float32 target's).
"""
from __future__ import annotations

import copy
import json
import sys
import time

import torch
import torch.nn.functional as F

from specdeploy.bench.compare import compare_methods
from specdeploy.bench.tasks import builtin_prompts
from specdeploy.config import SamplingParams, SpecConfig
from specdeploy.models import eagle
from specdeploy.models.loader import load_model
from specdeploy.runtime.engine import SpecEngine
from specdeploy.runtime.head_proposers import EagleProposer, TorchEagleStep
from specdeploy.runtime.runner import TorchRunner

QS = (1, 2, 3, 5, 8, 17, 33, 49, 64)


def median_ms(fn, reps: int = 8) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * sorted(times)[reps // 2]


def step_costs(runner) -> dict[int, float]:
    """ms of one forward of q tokens after a 200-token cache, per q."""
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randint(100, 20000, (200,), generator=gen)
    out = {}
    for q in QS:
        x = torch.randint(100, 20000, (q,), generator=gen)
        runner.reset()
        runner.forward(prefix)

        def one():
            runner.forward(x)
            runner.rollback(200)
        out[q] = median_ms(one)
    return out


class CastEagleStep:
    """`TorchEagleStep` with the head, embedding and LM head copied to `dtype`; features and logits float32."""

    def __init__(self, head, embed, lm_head, dtype: torch.dtype) -> None:
        self.head, self.dtype = copy.deepcopy(head).to(dtype), dtype
        self.embed_w, self.lm_w = embed.weight.detach().to(dtype), lm_head.weight.detach().to(dtype)

    def __call__(self, features, tokens, positions, allowed, cache, last_only=False):
        out, cache = self.head(features[None].to(self.dtype), F.embedding(tokens, self.embed_w)[None], positions,
                               allowed, cache)
        out = out[0]
        return out.float(), F.linear(out[-1:] if last_only else out, self.lm_w).float(), cache


def end_to_end(loaded, proposers: dict, prompts, max_new: int) -> dict:
    """Per engine name: speedup over plain (the first engine), acceptance length and greedy outputs
    different from plain; the engines take turns on each prompt (`bench.compare.compare_methods`)."""
    engines = [(name, SpecEngine(loaded, SpecConfig(method="none" if p is None else "eagle", k=4), proposer=p))
               for name, p in proposers.items()]
    runs = compare_methods(engines, prompts, SamplingParams(max_new_tokens=max_new))
    plain = runs[0]
    out = {}
    for run in runs:
        s = run.stats.total()
        out[run.name] = {"speedup": s.tokens_per_s / plain.stats.total().tokens_per_s,
                         "acceptance_length": s.acceptance_length, "seconds": s.wall_s,
                         "greedy_mismatches": sum(a.token_ids != b.token_ids for a, b in zip(run.results, plain.results))}
    return out


def main() -> int:
    out_path = sys.argv[1]
    bundle = sys.argv[2] if len(sys.argv) > 2 else None
    torch.set_num_threads(2)
    result: dict = {"threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    f32 = load_model("smollm2", device="cpu", dtype=torch.float32)
    bf16 = load_model("smollm2", device="cpu", dtype=torch.bfloat16)
    costs = {"torch float32": step_costs(TorchRunner(f32.model)), "torch bfloat16": step_costs(TorchRunner(bf16.model))}
    if bundle:
        from specdeploy.runtime.onnx_runner import OnnxGraph, OnnxRunner

        costs["onnxruntime float32"] = step_costs(OnnxRunner(OnnxGraph(f"{bundle}/target/model.onnx", threads=2)))
    result["step_ms"] = costs
    print(json.dumps(costs), flush=True)
    w = f32.model.get_output_embeddings().weight.detach()
    result["lm_head_ms"] = {dt: {m: median_ms(lambda: F.linear(torch.randn(m, w.shape[1], dtype=d), wd), 20)
                                 for m in (1, 4, 8, 16)}
                            for dt, d in (("float32", torch.float32), ("bfloat16", torch.bfloat16))
                            for wd in (w.to(d),)}
    print(json.dumps(result["lm_head_ms"]), flush=True)
    firsts: dict = {}
    for p in builtin_prompts("eval"):
        firsts.setdefault(p.task, p)
    prompts = list(firsts.values())
    e2e = {}
    for name, loaded in (("float32", f32), ("bfloat16", bf16)):
        head, _ = eagle.load(None, loaded)
        embed, lm = loaded.model.get_input_embeddings(), loaded.model.get_output_embeddings()
        proposers = {"plain": None, "eagle": EagleProposer(TorchEagleStep(head, embed, lm), tree_size=48)}
        if name == "float32":
            proposers["eagle, head in bfloat16"] = EagleProposer(CastEagleStep(head, embed, lm, torch.bfloat16), tree_size=48)
        e2e[name] = end_to_end(loaded, proposers, prompts, 64)
        print(name, json.dumps(e2e[name]), flush=True)
    result["end_to_end"] = e2e
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
