"""Decode attention kernels compared on the GPU: µs per call, 30 calls captured in one CUDA graph.

    python scripts/attn_micro.py [--rows 1,8,32] [--out DIR]      # writes DIR/attn_micro.json

Shapes are SmolLM2's (3 KV heads, 3 query heads per KV head, head_dim 64), bf16, a mask that hides
the keys past 300 (as a KV bucket's stale tail). Variants:
- sdpa_efficient: SDPA's memory-efficient kernel (the lean forward before session 4);
- three_kernels: `cuda_runner.attention` on session 4's cache layout, [rows, positions, 2 * kv_heads,
  head_dim] (for more than one row `torch.matmul` copies keys and values);
- per_head_layout: the same three kernels on the layout `StaticKVCache` adopted from this
  comparison, [rows, kv_heads, 2, positions, head_dim], where rows x heads is one batch stride.
Runs: results/gpu/run6_attn_micro.json (session 4, one row, before the variants were named so),
results/gpu/run8_attn_micro.json (session 5, 1 / 8 / 32 rows).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from specdeploy.runtime.cuda_runner import attention


def graph_us(fn, reps: int = 50) -> float:
    """Median µs per call of fn, 30 calls replayed as one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3 * 30):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s):
        for _ in range(30):
            fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1000 / 30)
    return sorted(times)[len(times) // 2]


def variants(rows: int, m: int, keys: int) -> dict:
    hkv, g, hd = 3, 3, 64
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(rows, hkv, g * m, hd, device=dev, dtype=dt) * hd**-0.5
    cache = torch.randn(rows, keys, 2 * hkv, hd, device=dev, dtype=dt)  # session 4's layout
    k, v = cache[:, :, :hkv].transpose(1, 2), cache[:, :, hkv:].transpose(1, 2)
    per_head = torch.stack([k, v], dim=2).contiguous()  # [rows, hkv, 2, keys, hd]
    k2, v2 = per_head[:, :, 0], per_head[:, :, 1]
    mask = torch.zeros(rows, 1, g * m, keys, device=dev, dtype=dt)
    mask[..., 300:] = float("-inf")

    def sdpa():
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)

    return {"sdpa_efficient": sdpa, "three_kernels": lambda: attention(q, k, v, mask),
            "per_head_layout": lambda: attention(q, k2, v2, mask)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,8,32")
    p.add_argument("--out", default="/tmp/attn_micro")
    args = p.parse_args(argv)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": {}}
    for rows in (int(r) for r in args.rows.split(",")):
        for m, keys in ((1, 512), (1, 2048), (5, 512), (49, 512)):
            fns = variants(rows, m, keys)
            ref = fns["sdpa_efficient"]().float()
            row = {}
            for name, fn in fns.items():
                err = (fn().float() - ref).abs().max().item()
                row[name] = {"us": round(graph_us(fn), 2), "max_abs_diff_vs_sdpa": round(err, 5)}
            res["rows"][f"rows{rows}_q{m}_keys{keys}"] = row
            print(rows, m, keys, row, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attn_micro.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
