"""Launches of a compiled speculative step that run outside any CUDA graph, counted on the CPU.

    python results/cpu/step_launches/count_step_launches.py

`speculative_generate` over `CudaGraphRunner` + `GraphEagleProposer` on the fused path (Triton's
interpreter, graphs off, a small random model and head), greedy. Every aten operator that computes
and every Triton launch is counted, split into what a captured graph holds (the verify forward, the
tree ancestry, EAGLE's sync and draft steps: each one replay on a GPU) and what runs eagerly
between them, with the loop function that issued each eager one. On a GPU each eager launch is a
kernel of its own (a few microseconds of GPU time and 7-26 µs of host time, results/gpu/session18)
outside the graphs. Prints one JSON object per config.
"""
import collections
import json
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "results/cpu/eagle_level_launches"))
from launch_counter import install  # noqa: E402  (sets the interpreter up before the imports below)

import torch  # noqa: E402

from specdeploy.config import SamplingParams  # noqa: E402
from specdeploy.models import eagle  # noqa: E402
from specdeploy.runtime import cuda_runner  # noqa: E402
from specdeploy.runtime.eagle_graphs import GraphEagleProposer  # noqa: E402
from specdeploy.runtime.loop import StopCondition, speculative_generate  # noqa: E402
from specdeploy.runtime.proposers import NoProposer  # noqa: E402
from test_fused_kernels import small_llama  # noqa: E402

graph_depth = 0
in_graph, eager = collections.Counter(), collections.Counter()


def site() -> str:
    """The innermost specdeploy frame that is not a kernel wrapper: who issued the launch."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "specdeploy" in frame.filename and "kernels.py" not in frame.filename:
            return f"{Path(frame.filename).stem}.{frame.name}"
    return "?"


def count(kind: str, name: str) -> None:
    if graph_depth:
        in_graph[name] += 1
    else:
        eager[f"{site()}: {name}"] += 1


Ops = install(count)
_call = cuda_runner.CapturedFn.__call__


def counted_call(self):
    global graph_depth
    graph_depth += 1
    try:
        return _call(self)
    finally:
        graph_depth -= 1


cuda_runner.CapturedFn.__call__ = counted_call

model = small_llama(layers=2, seed=3)
ids = torch.randint(1, 96, (24,), generator=torch.Generator().manual_seed(0)).tolist()
params = SamplingParams(max_new_tokens=24)
for name, k in (("none", 0), ("eagle", 4)):
    runner = cuda_runner.CudaGraphRunner(cuda_runner.LeanLlama.from_hf(model, kernels="fused"), max_length=128,
                                         use_graphs=False, output_hidden=k > 0)
    if k:
        torch.manual_seed(1)
        head = eagle.EagleHead(eagle.EagleConfig.from_target(model.config)).eval()
        proposer = GraphEagleProposer.from_head(head, model.get_input_embeddings(), model.get_output_embeddings(),
                                                tree_size=10, topk=3, max_depth=4, max_length=128,
                                                query_buckets=(1, 4, 16), use_graphs=False)
    else:
        proposer = NoProposer()
    stop = StopCondition(eos_ids=frozenset(), max_new_tokens=24)
    speculative_generate(runner, proposer, ids, params, stop, k=k)  # warm-up: kernels compiled
    in_graph.clear()
    eager.clear()
    with Ops:
        out = speculative_generate(runner, proposer, ids, params, stop, k=k)
    steps = out.stats.target_forwards
    print(json.dumps({"config": f"{name}:{k}", "steps": steps, "emitted": len(out.token_ids),
                      "graph_launches_per_step": round(sum(in_graph.values()) / steps, 1),
                      "eager_launches_per_step": round(sum(eager.values()) / steps, 2),
                      "eager_per_step": {s: round(n / steps, 2) for s, n in eager.most_common()}}, indent=1))
