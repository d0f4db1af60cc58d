"""Where a compiled plain step's time goes, and whether torch.compile'd layers shorten it (GPU).

    python scripts/step_kernels.py --target /tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out DIR

Writes DIR/step_kernels.json and DIR/step_kernels.md:
1. the CUDA kernels of one replayed plain step (query 1, KV bucket 512), from torch.profiler: count
   and time per kernel name;
2. the replayed step's time (median of CUDA-event timings) for query lengths 1, 5 and 49, with the
   lean layers as they are ("eager" kernels inside the graph) and with the elementwise work of each
   layer fused by torch.compile (Inductor, no CUDA graphs of its own: ours capture it), and whether
   both give the same greedy tokens over 64 steps.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F


def compiled_layers(lean):
    """Replace `lean._layers` with one whose per-layer elementwise work runs as Inductor kernels.

    Two compiled pieces per layer around the (eager) cache write and attention, weights passed as
    arguments so that all layers share one compiled graph."""
    from specdeploy.runtime.cuda_runner import attention

    d = lean.dims
    g, hkv, hq, hd = d.group, d.num_kv_heads, d.num_heads, d.head_dim
    half = hd // 2

    def attn_in(h, norm_w, wqkv, cos, sin, R: int, m: int):
        x = F.rms_norm(h, (d.hidden,), norm_w, d.eps)
        qkv = (x @ wqkv.t()).view(R, m, hq + 2 * hkv, hd)
        qkv = qkv * cos + qkv.roll(half, dims=-1) * sin  # q comes out scaled (see LeanLlama.run_layers)
        q = qkv[:, :, :hq].reshape(R, m, hkv, g, hd).permute(0, 2, 3, 1, 4).reshape(R, hkv, g * m, hd)
        return q, qkv[:, :, hq:].contiguous()

    def attn_out_mlp(h, o, wo, norm_w, w_gate_up, w_down, R: int, m: int):
        o = o.view(R, hkv, g, m, hd).permute(0, 3, 1, 2, 4).reshape(R * m, hq * hd)
        h = h + o @ wo.t()
        x = F.rms_norm(h, (d.hidden,), norm_w, d.eps)
        gate, up = (x @ w_gate_up.t()).chunk(2, dim=-1)
        return h + (F.silu(gate) * up) @ w_down.t()

    a = torch.compile(attn_in, dynamic=True)
    b = torch.compile(attn_out_mlp, dynamic=True)

    def _layers(cache, h, cos, sin, mask, row_idx, pos, rows, kv_len, R, m):
        for layer, w in enumerate(lean.layers):
            q, kv_new = a(h, w.attn_norm, w.wqkv, cos, sin, R, m)
            cache.write(layer, row_idx, pos, kv_new)
            k, v = cache.read(layer, kv_len, rows)
            o = attention(q, k, v, mask)
            h = b(h, o, w.wo, w.mlp_norm, w.w_gate_up, w.w_down, R, m)
        return h

    return _layers


def step_ms(runner, m: int, reps: int = 200) -> float:
    """Median ms of one replayed forward of m tokens at a fixed cache length (rolled back each time)."""
    base = runner.length
    toks = torch.full((m,), 100, dtype=torch.long, device=runner.device)
    times = []
    for i in range(reps + 10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        runner.forward(toks)
        e.record()
        torch.cuda.synchronize()
        runner.rollback(base)
        if i >= 10:
            times.append(s.elapsed_time(e))
    times.sort()
    return times[len(times) // 2]


def kernel_table(runner) -> tuple[list[dict], float]:
    """Kernels of one replayed one-token step: [{name, count, total_us}], and their summed µs."""
    from torch.profiler import ProfilerActivity, profile

    base = runner.length
    tok = torch.tensor([100], device=runner.device)
    runner.forward(tok)
    runner.rollback(base)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        runner.forward(tok)
        torch.cuda.synchronize()
    runner.rollback(base)
    agg: dict[str, list[float]] = defaultdict(list)
    for ev in prof.events():
        if ev.device_type.name == "CUDA" and "Memcpy" not in ev.name and "Memset" not in ev.name:
            agg[ev.name].append(ev.device_time)
    rows = [{"name": n[:90], "count": len(t), "total_us": round(sum(t), 1), "mean_us": round(sum(t) / len(t), 2)}
            for n, t in agg.items()]
    rows.sort(key=lambda r: -r["total_us"])
    return rows, sum(r["total_us"] for r in rows)


def greedy(runner, prompt: torch.Tensor, n: int) -> list[int]:
    runner.reset()
    logits = runner.forward(prompt).logits
    out = []
    for _ in range(n):
        t = int(logits[-1].argmax())
        out.append(t)
        logits = runner.forward(torch.tensor([t], device=runner.device)).logits
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="smollm2")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    from specdeploy.models.loader import load_model
    from specdeploy.runtime.cuda_runner import CudaGraphRunner, LeanLlama

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    target = load_model(args.target, device="cuda", dtype=torch.bfloat16)
    prompt = target.tokenizer("Write a Python function that returns the n-th Fibonacci number.",
                              return_tensors="pt")["input_ids"][0].cuda()
    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "command": " ".join(sys.argv),
                    "variants": {}}
    for variant in ("lean", "lean+inductor"):
        lean = LeanLlama.from_hf(target.model)
        t0 = time.perf_counter()
        if variant == "lean+inductor":
            lean._layers = compiled_layers(lean)
        runner = CudaGraphRunner(lean, max_length=512, query_buckets=(1, 8, 64))
        load_s = time.perf_counter() - t0
        tokens = greedy(runner, prompt, 64)
        runner.reset()
        runner.forward(prompt)
        runner.forward(torch.full((300 - prompt.numel(),), 100, device="cuda"))  # a cache of 300: KV bucket 512
        kernels, total_us = kernel_table(runner)
        row = {"load_and_capture_s": round(load_s, 1), "graphs": runner.num_graphs,
               "step_ms": {m: round(step_ms(runner, m), 3) for m in (1, 5, 49)},
               "kernels_per_step": sum(k["count"] for k in kernels), "kernel_time_us": round(total_us, 1),
               "kernels": kernels[:25], "greedy64": tokens}
        result["variants"][variant] = row
        print(variant, {k: v for k, v in row.items() if k not in ("kernels", "greedy64")}, flush=True)
        runner.close()
        del runner, lean
        torch.cuda.empty_cache()
    v = result["variants"]
    result["same_greedy"] = v["lean"]["greedy64"] == v["lean+inductor"]["greedy64"]
    (out / "step_kernels.json").write_text(json.dumps(result, indent=1))
    md = [f"# One plain step, replayed ({result['device']}, torch {result['torch']})", "", f"`{result['command']}`", "",
          "| variant | load+capture s | kernels/step | kernel µs | step ms q=1 | q=5 | q=49 |", "|---|---|---|---|---|---|---|"]
    for name, r in v.items():
        s = r["step_ms"]
        md.append(f"| {name} | {r['load_and_capture_s']} | {r['kernels_per_step']} | {r['kernel_time_us']} | "
                  f"{s[1]} | {s[5]} | {s[49]} |")
    md += ["", f"Same greedy tokens over 64 steps: {result['same_greedy']}", ""]
    for name, r in v.items():
        md += [f"## Kernels of one step: {name}", "", "| kernel | count | total µs | mean µs |", "|---|---|---|---|"]
        md += [f"| `{k['name']}` | {k['count']} | {k['total_us']} | {k['mean_us']} |" for k in r["kernels"]]
        md.append("")
    (out / "step_kernels.md").write_text("\n".join(md))
    print("\n".join(md[:12]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
