"""Where a speculative step's wall time goes on the host (GPU): propose, verify forward, verify, the rest.

    python scripts/step_profile.py --target /tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out DIR \
        --configs none:0,ngram:4,eagle:1,eagle:4,multi:2,specinfer:4

For each method:k (method:k:N: token trees of N nodes, e.g. eagle:6:127), a compiled `SpecEngine` (bfloat16, greedy) generates the eval prompts (a few per
task). The loop's calls are wrapped with host timers, no added syncs: `propose` includes waiting
for the draft's device work where the proposer copies its draft to the host, `forward` the
verify forward's launch and host preparation, `verify` the wait for the verify step and the
acceptance walk, `keep` the cache rollback, `other` the rest of the loop. A second pass runs
under cProfile (top functions by own time). Writes DIR/step_profile.json and DIR/step_profile.md.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

from specdeploy.bench.tasks import builtin_prompts
from specdeploy.config import SamplingParams, SpecConfig
from specdeploy.models.loader import load_model
from specdeploy.runtime import loop as loop_module
from specdeploy.runtime.cuda_runner import compiled_for
from specdeploy.runtime.engine import SpecEngine


class PhaseTimer:
    """Host seconds per named phase, by wrapping callables."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, name: str, fn):
        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds[name] += time.perf_counter() - t
                self.calls[name] += 1
        return timed


@contextmanager
def patched(obj, attr: str, value):
    old = getattr(obj, attr)
    setattr(obj, attr, value)
    try:
        yield
    finally:
        setattr(obj, attr, old)


def eval_prompts(tasks: list[str], per_task: int) -> list:
    """The first `per_task` eval prompts of each task."""
    counts: dict[str, int] = defaultdict(int)
    prompts = []
    for pr in builtin_prompts("eval"):
        if pr.task in tasks and counts[pr.task] < per_task:
            counts[pr.task] += 1
            prompts.append(pr)
    return prompts


def parse_config(config: str) -> tuple[str, int, int | None]:
    """'method:k' or 'method:k:tree_size' -> (method, k, tree_size or None: the runner's default)."""
    method, k, *tree = config.split(":")
    return method, int(k), int(tree[0]) if tree else None


def config_label(method: str, k: int, tree_size: int | None) -> str:
    return f"{method}:{k}" + (f":{tree_size}" if tree_size is not None else "")


def warm_engine(loaded, method: str, k: int, prompts, max_new: int, tree_size: int | None = None,
                draft: str | None = None):
    """(compiled greedy SpecEngine for method:k, its SamplingParams, the prompts encoded), warmed up on two;
    draft: the head or draft artifact (None: the shipped one)."""
    spec = SpecConfig(method=method, k=max(k, 1), tree_size=tree_size, draft=draft if method != "none" else None)
    runner, proposer = compiled_for(spec, loaded)
    engine = SpecEngine(loaded, spec, runner=runner, proposer=proposer)
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new)
    enc = [engine.encode(p.prompt) for p in prompts]
    for ids in enc[:2]:
        engine.generate_ids(ids, params)
    return engine, params, enc


def run_config(loaded, method: str, k: int, prompts, max_new: int, tree_size: int | None = None,
               draft: str | None = None) -> dict:
    engine, params, enc = warm_engine(loaded, method, k, prompts, max_new, tree_size, draft)
    runner, proposer = engine.runner, engine.proposer
    timer = PhaseTimer()
    steps = tokens = 0
    wall = 0.0
    with patched(engine.proposer, "propose", timer.wrap("propose", engine.proposer.propose)), \
            patched(engine.runner, "forward", timer.wrap("forward", engine.runner.forward)), \
            patched(engine.runner, "keep_path", timer.wrap("keep", engine.runner.keep_path)), \
            patched(engine.runner, "rollback", timer.wrap("keep", engine.runner.rollback)), \
            patched(loop_module, "verify", timer.wrap("verify", loop_module.verify)):
        for ids in enc:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t = time.perf_counter()
            res = engine.generate_ids(ids, params)
            wall += time.perf_counter() - t
            steps += res.stats.target_forwards
            tokens += len(res.token_ids)
    prof = cProfile.Profile()
    prof.enable()
    for ids in enc:
        engine.generate_ids(ids, params)
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
    phases = {n: 1e3 * s / steps for n, s in timer.seconds.items()}
    phases["other"] = 1e3 * wall / steps - sum(phases.values())
    # prefill forwards are in `forward` too; per-step figures divide by the target forwards
    out = {"method": method, "k": k, "tree_size": tree_size, "label": config_label(method, k, tree_size),
           "tokens": tokens, "steps": steps, "wall_s": wall, "tokens_per_s": tokens / wall,
           "ms_per_step": 1e3 * wall / steps, "acceptance_length": tokens / steps, "phase_ms_per_step": phases,
           "calls": dict(timer.calls), "cprofile_top": text.getvalue()}
    runner.close()
    if hasattr(proposer, "close"):
        proposer.close()
    del engine, runner, proposer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def kernels_of(fn) -> int:
    """CUDA kernels one call of fn launches (run eagerly under the profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def eagle_parts(loaded, depth: int = 4, draft: str | None = None) -> list[dict]:
    """GPU ms of each captured EAGLE drafting step and of the target's verify graphs (CUDA events), and the
    kernels each launches."""
    from specdeploy.bench.gpu_bench import gpu_time_ms
    from specdeploy.models import eagle
    from specdeploy.runtime.cuda_runner import CudaGraphRunner, LeanLlama
    from specdeploy.runtime.eagle_graphs import GraphEagleProposer
    from specdeploy.runtime.types import Context

    head, _ = eagle.load(draft, loaded)
    embed, lm_head = loaded.model.get_input_embeddings(), loaded.model.get_output_embeddings()
    ids = torch.randint(0, 1000, (100,))
    with torch.no_grad():
        hidden = loaded.model.model(ids[None].to("cuda")).last_hidden_state[0]
    ctx = Context(token_ids=ids.tolist(), prompt_len=100, params=SamplingParams(), target_hidden=hidden[:-1])
    rows = []
    for graphs in (True, False):
        p = GraphEagleProposer.from_head(head, embed, lm_head, tree_size=48, max_depth=depth, max_length=2048,
                                         use_graphs=graphs)
        p.propose(ctx, depth)
        parts = {"sync q=1": p._fn("sync", 1, 256), "sync q=4": p._fn("sync", 4, 256),
                 "draft depth 1": p._fn("draft", 1, p.kv_buckets[0]), f"draft depth {depth}": p._fn("draft", depth, 256),
                 f"propose depth {depth}": lambda: p.propose(ctx, depth)}
        for name, fn in parts.items():
            row = {"what": f"EAGLE {name}", "graphs": graphs}
            row["ms" if graphs else "kernels"] = gpu_time_ms(fn) if graphs else kernels_of(fn)
            rows.append(row)
        p.close()
    runner = CudaGraphRunner(LeanLlama.from_hf(loaded.model), max_length=2048, output_hidden=True)
    runner.forward(ids[:-1])
    for q in (1, 16, 64):
        rows.append({"what": f"target verify graph q={q} kv=256", "graphs": True, "ms": gpu_time_ms(runner._fn(q, 256))})
    rows.append({"what": "target tree ancestry graph q=64", "graphs": True, "ms": gpu_time_ms(runner._tree_fn(64))})
    runner.close()
    return rows


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else device


def config_parser(doc: str, configs: str, tasks: str, max_new: int) -> argparse.ArgumentParser:
    """The options the step scripts share: --target, --out, --configs (method:k,...), --tasks, --max-new-tokens."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--target", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--configs", default=configs)
    p.add_argument("--tasks", default=tasks)
    p.add_argument("--max-new-tokens", type=int, default=max_new)
    return p


def main() -> int:
    p = config_parser(__doc__, "none:0,ngram:4,eagle:1,eagle:4,multi:2,specinfer:4",
                      "code,sql,api_call,math,qa,creative_writing", 128)
    p.add_argument("--per-task", type=int, default=2)
    p.add_argument("--device", default="cuda")
    p.add_argument("--draft", help="the EAGLE (or draft) artifact of the speculative configs (default: the shipped one)")
    args = p.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_model(args.target, device=args.device,
                        dtype=torch.bfloat16 if args.device == "cuda" else torch.float32)
    prompts = eval_prompts(args.tasks.split(","), args.per_task)
    rows = []
    for cfg in args.configs.split(","):
        method, k, tree_size = parse_config(cfg)
        row = run_config(loaded, method, k, prompts, args.max_new_tokens, tree_size, args.draft)
        rows.append(row)
        ph = row["phase_ms_per_step"]
        print(f"{row['label']} {row['tokens_per_s']:.0f} tok/s, {row['ms_per_step']:.3f} ms/step, acc.len "
              f"{row['acceptance_length']:.2f}; " + ", ".join(f"{n} {v:.3f}" for n, v in ph.items()), flush=True)
        (out / "step_profile.json").write_text(json.dumps({"device": _device_name(args.device), "rows": rows}, indent=1))
    lines = ["| config | tok/s | ms/step | acc. len | " + " | ".join(["propose", "forward", "verify", "keep", "other"]) + " |",
             "|---" * 9 + "|"]
    for r in rows:
        ph = r["phase_ms_per_step"]
        lines.append(f"| {r['label']} | {r['tokens_per_s']:.0f} | {r['ms_per_step']:.3f} | {r['acceptance_length']:.2f} | "
                     + " | ".join(f"{ph.get(n, 0.0):.3f}" for n in ["propose", "forward", "verify", "keep", "other"]) + " |")
    eagle_draft = args.draft if any(parse_config(c)[0] == "eagle" for c in args.configs.split(",")) else None
    parts = eagle_parts(loaded, draft=eagle_draft) if args.device == "cuda" else []
    for r in parts:
        print(r, flush=True)
    (out / "step_profile.json").write_text(json.dumps({"device": _device_name(args.device), "rows": rows, "parts": parts}, indent=1))
    lines += ["", "| part | graphs | GPU ms | kernels |", "|---|---|---|---|"]
    lines += [f"| {r['what']} | {r['graphs']} | {r.get('ms', '')} | {r.get('kernels', '')} |" for r in parts]
    md = "\n".join(lines) + "\n\n" + "\n\n".join(f"## {r['label']}\n```\n{r['cprofile_top']}\n```" for r in rows)
    (out / "step_profile.md").write_text(md)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
