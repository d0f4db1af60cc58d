"""Where the GPU waits for the host in a decoding step: a profiler trace of compiled generation.

    python scripts/step_trace.py --target /tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out DIR \
        --configs none:0,eagle:4

For each method:k, a compiled `SpecEngine` (bfloat16, greedy) generates a few eval prompts under
`torch.profiler` (host and CUDA activity). The loop's calls are labelled (`record_function`, by
wrapping them: the code under test is unchanged). From the trace: per verify step, the GPU's busy
and idle time between the request's first and last kernel, and which labelled host call was running
while the GPU sat idle (idle time nobody's label covers is the loop's own code). Writes
DIR/step_trace.json and DIR/step_trace.md; `--chrome` also keeps each config's Chrome trace.
"""
from __future__ import annotations

import json
from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from specdeploy.models.loader import load_model
from specdeploy.runtime import loop as loop_module
from step_profile import config_label, config_parser, eval_prompts, parse_config, patched, warm_engine  # this folder is on sys.path when run as a script

LABEL = "sd."


def labelled(name: str, fn):
    def run(*a, **kw):
        with record_function(LABEL + name):
            return fn(*a, **kw)
    return run


def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def overlap(a: tuple[float, float], gaps: list[tuple[float, float]]) -> float:
    return sum(max(0.0, min(a[1], e) - max(a[0], s)) for s, e in gaps)


def analyse(events, steps: int) -> dict:
    """GPU busy / idle µs per step, and idle µs per step under each labelled host call."""
    gpu, host = [], []
    for e in events:
        span = (e.time_range.start, e.time_range.end)
        if e.device_type == torch.autograd.DeviceType.CUDA:
            gpu.append(span)
        elif e.name.startswith(LABEL):
            host.append((e.name[len(LABEL):], span))
    busy = union(gpu)
    window = (busy[0][0], busy[-1][1])
    gaps = [(a[1], b[0]) for a, b in zip(busy, busy[1:]) if b[0] - a[1] > 0.5]
    idle = sum(e - s for s, e in gaps)
    by_label: dict[str, float] = defaultdict(float)
    covered = union([span for _, span in host])
    for name, span in host:
        by_label[name] += overlap(span, gaps)  # nested labels count in each
    uncovered = idle - sum(overlap(c, gaps) for c in covered)
    return {"steps": steps, "window_us_per_step": (window[1] - window[0]) / steps,
            "gpu_busy_us_per_step": sum(e - s for s, e in busy) / steps, "gpu_idle_us_per_step": idle / steps,
            "idle_us_per_step_under": {k: v / steps for k, v in sorted(by_label.items(), key=lambda kv: -kv[1])},
            "idle_us_per_step_in_loop_code": uncovered / steps}


def run_config(loaded, method: str, k: int, tree_size: int | None, prompts, max_new: int, chrome: Path | None) -> dict:
    engine, params, enc = warm_engine(loaded, method, k, prompts, max_new, tree_size)
    runner, proposer = engine.runner, engine.proposer
    wraps = [(engine.proposer, "propose"), (engine.runner, "forward"), (engine.runner, "keep_path"),
             (engine.runner, "rollback"), (loop_module, "verify"), (loop_module, "_append_rows"),
             (loop_module, "ids_on"), (engine.proposer, "_sync")]
    torch.cuda.synchronize()
    steps = 0
    with ExitStack() as stack:
        for obj, name in wraps:
            if hasattr(obj, name):
                stack.enter_context(patched(obj, name, labelled(name, getattr(obj, name))))
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for ids in enc:
                steps += engine.generate_ids(ids, params).stats.target_forwards
            torch.cuda.synchronize()
    if chrome is not None:
        prof.export_chrome_trace(str(chrome / f"trace_{config_label(method, k, tree_size).replace(':', '_')}.json"))
    out = {"method": method, "k": k, "tree_size": tree_size, "label": config_label(method, k, tree_size), **analyse(prof.events(), steps)}
    runner.close()
    if hasattr(proposer, "close"):
        proposer.close()
    return out


def main() -> int:
    p = config_parser(__doc__, "none:0,eagle:4", "code,qa", 64)
    p.add_argument("--chrome", action="store_true")
    args = p.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_model(args.target, device="cuda", dtype=torch.bfloat16)
    prompts = eval_prompts(args.tasks.split(","), 1)
    rows = []
    for config in args.configs.split(","):
        rows.append(run_config(loaded, *parse_config(config), prompts, args.max_new_tokens, out if args.chrome else None))
        print(json.dumps(rows[-1]), flush=True)
    (out / "step_trace.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    lines = ["| config | µs/step (window) | GPU busy | GPU idle | idle in loop code | idle under labelled calls |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        under = ", ".join(f"{k} {v:.0f}" for k, v in r["idle_us_per_step_under"].items() if v >= 1)
        lines.append(f"| {r['label']} | {r['window_us_per_step']:.0f} | {r['gpu_busy_us_per_step']:.0f} | "
                     f"{r['gpu_idle_us_per_step']:.0f} | {r['idle_us_per_step_in_loop_code']:.0f} | {under} |")
    (out / "step_trace.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
