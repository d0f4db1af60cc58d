"""Session 25 diagnostic (device only): why EAGLE's batched auto switch ran below plain at batch 32, T=0.7
(session 24: 0.944x of plain). Per step it records the switch's input (the GPU time between the step's
events) and the host wall interval between consecutive collected steps, for spec and plain steps, and runs
the auto switch twice: as shipped (GPU times) and fed the wall intervals instead (a monkeypatch here, no
product change). Writes $OUT/batch_switch_diag.json and prints a table.

    python3 results/gpu/session25/batch_switch_diag.py --target GGUF --out DIR
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from specdeploy.bench.backend import Backend, encode_all
from specdeploy.bench.tasks import builtin_prompts
from specdeploy.runtime.batch import BatchRequest
from specdeploy.runtime.switch import SpecSwitch
from specdeploy.config import SamplingParams


class StepLog:
    """Wraps a switch: records each step's (spec, GPU seconds, wall interval since the previous step); with
    `wall`, the switch is fed the wall interval in place of the GPU time."""

    def __init__(self, switch: SpecSwitch, wall: bool) -> None:
        self.switch, self.wall, self.steps, self._last = switch, wall, [], None
        self._record = switch.record
        switch.record = self.record

    def record(self, spec, tokens_per_slot, seconds, slots=1):
        now = time.perf_counter()
        interval = None if self._last is None else now - self._last
        self._last = now
        self.steps.append((bool(spec), seconds, interval, tokens_per_slot, slots))
        use = interval if self.wall and interval is not None else seconds
        self._record(spec, tokens_per_slot, use, slots)

    def new_pass(self) -> None:
        self._last = None


def summary(steps):
    out = {}
    for spec in (True, False):
        s = [x for x in steps if x[0] == spec]
        gpu = [x[1] for x in s]
        wall = [x[2] for x in s if x[2] is not None]
        tok = [x[3] for x in s if x[3] is not None]
        out["spec" if spec else "plain"] = {
            "steps": len(s),
            "gpu_ms_median": 1e3 * statistics.median(gpu) if gpu else None,
            "wall_ms_median": 1e3 * statistics.median(wall) if wall else None,
            "tokens_per_slot_mean": statistics.fmean(tok) if tok else None,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--temperatures", default="0.7,0")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--limit", type=int, default=0, help="first N eval prompts (0: all 80)")
    a = ap.parse_args()
    backend = Backend.load(a.target, a.device, "bfloat16" if a.device == "cuda" else "float32")
    prompts = builtin_prompts("eval")[: a.limit or None]
    enc = encode_all(backend, prompts, 128)
    reqs = [BatchRequest(ids, 128, p.task) for p, ids in zip(prompts, enc)]
    cuda = a.device == "cuda"
    result = {"device": torch.cuda.get_device_name() if cuda else a.device, "batch": a.batch, "k": a.k, "prompts": len(reqs), "rows": []}
    for t in [float(x) for x in a.temperatures.split(",")]:
        sampling = SamplingParams(temperature=t, max_new_tokens=128, seed=0 if t > 0 else None)
        plain = backend.batch_engine("none", 1, a.batch, "on", sampling=sampling)
        eagle = backend.batch_engine("eagle", a.k, a.batch, "on", sampling=sampling)
        for e in (plain, eagle):
            e.run([BatchRequest(enc[0], 4)])  # warm-up
        variants = {"none": (plain, StepLog(plain.switch, False)),
                    "eagle on": (eagle, StepLog(SpecSwitch("on"), False)),
                    "eagle auto (GPU times, shipped)": (eagle, StepLog(SpecSwitch("auto"), False)),
                    "eagle auto (wall intervals)": (eagle, StepLog(SpecSwitch("auto"), True))}
        walls = {name: [] for name in variants}
        tokens = {}
        for _ in range(a.passes):
            for name, (eng, log) in variants.items():
                eng.switch = log.switch
                log.new_pass()
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                res = eng.run(reqs)
                if cuda:
                    torch.cuda.synchronize()
                walls[name].append(time.perf_counter() - t0)
                tokens[name] = sum(len(r.token_ids) for r in res)
        base = statistics.median(walls["none"])
        for name, (eng, log) in variants.items():
            w = statistics.median(walls[name])
            row = {"temperature": t, "config": name, "tokens": tokens[name], "wall_s_median": w,
                   "walls": walls[name], "tokens_per_s": tokens[name] / w,
                   "speedup_vs_plain": (tokens[name] / w) / (tokens["none"] / base),
                   "steps": summary(log.steps)}
            result["rows"].append(row)
            sp, pl = row["steps"]["spec"], row["steps"]["plain"]
            print(f"T={t:g} {name:34s} {row['tokens_per_s']:8.0f} tok/s {row['speedup_vs_plain']:.3f}x | spec {sp['steps']:5d} "
                  f"gpu {sp['gpu_ms_median'] or 0:.3f} wall {sp['wall_ms_median'] or 0:.3f} tok/slot {sp['tokens_per_slot_mean'] or 0:.2f}"
                  f" | plain {pl['steps']:5d} gpu {pl['gpu_ms_median'] or 0:.3f} wall {pl['wall_ms_median'] or 0:.3f}", flush=True)
        eagle.close()
        plain.close()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "batch_switch_diag.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
