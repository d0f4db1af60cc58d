"""Kernel launches of GraphEagleProposer's draft step on the fused path, counted under Triton's interpreter (CPU).

    python results/cpu/eagle_level_launches/count_launches.py

Every Triton launch (`<name>_kernel[grid](...)`) and every aten operator that computes (views and the
interpreter's own tensor traffic left out) of one draft replay, at depths 1, 2 and 4, on a small random
model and head: what a CUDA graph of that step would hold. Prints one JSON object per depth.
"""
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from launch_counter import install  # noqa: E402  (sets the interpreter up before the imports below)

import torch  # noqa: E402

from specdeploy.config import SamplingParams  # noqa: E402
from specdeploy.models import eagle  # noqa: E402
from specdeploy.runtime.eagle_graphs import GraphEagleProposer  # noqa: E402
from specdeploy.runtime.types import Context  # noqa: E402
from test_fused_kernels import small_llama  # noqa: E402

launches, ops = collections.Counter(), collections.Counter()
Ops = install(lambda kind, name: (launches if kind == "triton" else ops).update([name]))


model = small_llama(layers=2, seed=3)
head = eagle.EagleHead(eagle.EagleConfig.from_target(model.config)).eval()
p = GraphEagleProposer.from_head(head, model.get_input_embeddings(), model.get_output_embeddings(), tree_size=10,
                                 topk=3, max_depth=4, max_length=64, query_buckets=(1, 4, 16), use_graphs=False)
ids = torch.randint(1, 96, (26,), generator=torch.Generator().manual_seed(0)).tolist()
with torch.no_grad():
    hidden = model.model(torch.tensor([ids])).last_hidden_state[0]
p.propose(Context(token_ids=ids[:20], prompt_len=20, params=SamplingParams(), target_hidden=hidden[:19]), 0)
for depth in (1, 2, 4):
    launches.clear()
    ops.clear()
    kv = p.kv_buckets[0] if depth == 1 else next(kv for kv in p.kv_buckets if kv > p.scratch)
    with Ops:
        p._fn("draft", depth, kv)()
    print(json.dumps({"depth": depth, "launches": sum(launches.values()) + sum(ops.values()),
                      "triton": dict(launches), "aten": dict(ops)}))
