"""How long a full garbage collection takes in a process holding the engines a bench holds (CPU, float32): the
target, and EAGLE, DraftLM and Medusa engines over it. A lead for the bench's slow rows (`per_step_times.md`),
not a GPU measurement. (Session 25's 567aa03 already pauses the collector during each bench job.)

    python results/gpu/session27/gc_probe.py
"""
import gc
import time

import torch

from specdeploy.config import SamplingParams, SpecConfig
from specdeploy.runtime.engine import SpecEngine

torch.set_num_threads(2)
engines = [SpecEngine.load(SpecConfig(method=m, k=4), "smollm2", "cpu") for m in ("eagle", "draft", "medusa")]
for e in engines:
    e.generate("Write a SQL query that counts orders per customer.", SamplingParams(max_new_tokens=16), "sql")


def full_collection_ms(reps: int = 5) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        gc.collect()
        times.append(1000 * (time.perf_counter() - t))
    return sorted(times)[reps // 2]


print(f"tracked objects {len(gc.get_objects())}; thresholds {gc.get_threshold()}")
print(f"full collection, median of 5: {full_collection_ms():.1f} ms")
gc.freeze()
print(f"after gc.freeze() ({gc.get_freeze_count()} objects frozen): {full_collection_ms():.1f} ms")
