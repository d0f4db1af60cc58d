"""How often Python's collector runs, and for how long, while engines generate (CPU, float32): the companion of
`../session27/gc_probe.py`, which timed one full collection (~110 ms) but not how often one comes. Records every collection
through `gc.callbacks` during generation with the bench's engines loaded and the collector on, as in a serving
process.

    python results/gpu/session28/gc_frequency.py
"""
import gc
import time
from collections import Counter

import torch

from specdeploy.config import SamplingParams, SpecConfig
from specdeploy.runtime.engine import SpecEngine

torch.set_num_threads(2)
PROMPTS = ["Write a SQL query that counts orders per customer.",
           "Write a Python function that reverses a linked list.",
           "Summarize: The city council met on Tuesday to discuss the new budget for parks and roads.",
           "Translate to French: The weather is nice today and we are going to the beach."]
engines = {m: SpecEngine.load(SpecConfig(method=m, k=4), "smollm2", "cpu") for m in ("eagle", "draft", "medusa")}
for e in engines.values():
    e.generate(PROMPTS[0], SamplingParams(max_new_tokens=8), "sql")

started: dict[int, float] = {}
count: Counter = Counter()  # collections by generation
ms: Counter = Counter()  # their milliseconds by generation


def on_gc(phase: str, info: dict) -> None:
    g = info["generation"]
    if phase == "start":
        started[g] = time.perf_counter()
    else:
        count[g] += 1
        ms[g] += 1000 * (time.perf_counter() - started.pop(g))


print(f"tracked objects {len(gc.get_objects())}; thresholds {gc.get_threshold()}; enabled {gc.isenabled()}")
gc.callbacks.append(on_gc)
for method, engine in engines.items():
    count.clear(), ms.clear()
    t = time.perf_counter()
    tokens = 0
    for p in PROMPTS:
        out = engine.generate(p, SamplingParams(max_new_tokens=64), "probe")
        tokens += len(out.token_ids)
    wall = 1000 * (time.perf_counter() - t)
    print(f"{method}: {tokens} tokens in {wall:.0f} ms; collections by generation {dict(sorted(count.items()))}; "
          f"ms by generation { {g: round(ms[g], 1) for g in sorted(ms)} }")
gc.callbacks.remove(on_gc)
