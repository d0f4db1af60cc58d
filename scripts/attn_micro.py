"""Decode attention kernels compared (GPU): 30 calls captured in one CUDA graph, µs per call."""
import json, os, sys
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

def bench(fn, reps=50):
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            for _ in range(30): fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s):
        for _ in range(30): fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b) * 1000 / 30)
    return sorted(ts)[len(ts) // 2]

res = {}
for m, kv in ((1, 512), (1, 2048), (5, 512), (49, 512)):
    g, hkv, hd = 3, 3, 64
    q = torch.randn(1, hkv, g * m, hd, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, hkv, kv, hd, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    mask = torch.zeros(1, 1, g * m, kv, device="cuda", dtype=torch.bfloat16); mask[..., 300:] = float("-inf")
    scale = hd ** -0.5
    def eff():
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    def math():
        with sdpa_kernel([SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    def manual():
        s_ = torch.baddbmm(mask[0].expand(hkv, g * m, kv), q[0], k[0].transpose(1, 2), alpha=scale)
        return torch.bmm(torch.softmax(s_, -1, dtype=torch.float32).to(v.dtype), v[0])
    def manual32():
        s_ = torch.baddbmm(mask[0].float().expand(hkv, g * m, kv), q[0].float(), k[0].float().transpose(1, 2), alpha=scale)
        return torch.bmm(torch.softmax(s_, -1).to(v.dtype), v[0])
    ref = eff()[0].float()
    row = {}
    for name, fn in (("efficient", eff), ("math", math), ("manual_bf16", manual), ("manual_fp32", manual32)):
        try:
            err = (fn().reshape(ref.shape).float() - ref).abs().max().item()
            row[name] = {"us": round(bench(fn), 2), "max_err": round(err, 5)}
        except Exception as e:
            row[name] = {"error": str(e)[:100]}
    res[f"m{m}_kv{kv}"] = row
    print(m, kv, row, flush=True)
out = os.environ.get("OUT", "/tmp")
os.makedirs(f"{out}/kernels", exist_ok=True)
json.dump(res, open(f"{out}/kernels/attn_micro.json", "w"), indent=1)
