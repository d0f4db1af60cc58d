"""The fused Triton layers (runtime/kernels.py) against the torch layers of the lean forward, on the GPU.

    python scripts/kernel_bench.py [--out DIR]      # writes DIR/kernel_bench.json and prints a table

A `LeanLlama` with SmolLM2-135M's shapes and random weights (a step's speed does not depend on
the values), for each dtype (float32, then bfloat16) and each kernel set (torch, fused):
1. agreement: each path's logits against the float32 torch layers' (relative L2 error, argmax
   agreement) for a prefill;
2. row independence: one token's logits fed alone, as the first of a 5-token chain (another KV
   bucket), and as one row of 8: bitwise equal or not;
3. step time: ms per replayed forward (CUDA graph, `gpu_bench.gpu_time_ms`) for (rows, query
   tokens) = (1, 1), (1, 5), (1, 9), (1, 64), (8, 1), (32, 1), (32, 5), at a KV bucket of 512;
4. greedy decoding: tokens/s of 256 new tokens through `CudaGraphRunner` + `speculative_generate`
   (no draft) and through the batched engine at batch 1 (bfloat16 only);
5. bfloat16: the kernels of one replayed 1-token step (torch.profiler), and the fused step under
   each launch-shape variant of `VARIANTS` (kernels.TILES).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specdeploy.bench.gpu_bench import gpu_time_ms
from specdeploy.config import SamplingParams
from specdeploy.runtime import kernels
from specdeploy.runtime.batch import BatchRequest, BatchSpeculator
from specdeploy.runtime.cuda_runner import CapturedFn, CudaGraphRunner, LeanLlama
from specdeploy.runtime.loop import StopCondition, speculative_generate
from specdeploy.runtime.kernels import Tile
from specdeploy.runtime.proposers import NoProposer

SHAPES = [(1, 1), (1, 5), (1, 9), (1, 64), (8, 1), (32, 1), (32, 5)]
KV = 512


def smollm2_shaped(dtype: torch.dtype) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                      rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, initializer_range=0.05)
    torch.manual_seed(0)
    with torch.device("cuda"):
        return LlamaForCausalLM(cfg).to(dtype).eval()


def step_ms(lean: LeanLlama, rows: int, m: int) -> float:
    cache = lean.new_cache(rows, KV + 64)
    tokens = torch.randint(0, lean.dims.vocab, (rows, m), device="cuda")
    pos = (torch.arange(m, device="cuda") + 300)[None].expand(rows, m).contiguous()
    return gpu_time_ms(CapturedFn(lambda: lean.forward(cache, tokens, pos, None, KV, logits="all"), True))


def row_independence(lean: LeanLlama) -> dict[str, bool]:
    """Logits of token t at position P: alone, first of a chain of 5 (another KV bucket), row 3 of 8."""
    P, vocab = 200, lean.dims.vocab
    g = torch.Generator(device="cuda").manual_seed(1)
    prefix = torch.randint(0, vocab, (1, P), device="cuda", generator=g)
    chain = torch.randint(0, vocab, (1, 5), device="cuda", generator=g)
    positions = torch.arange(P, device="cuda")[None]

    def prefilled(rows: int):
        cache = lean.new_cache(rows, 1024)
        lean.forward(cache, prefix.expand(rows, P), positions.expand(rows, P), None, 1024, logits="none")
        return cache

    alone = lean.forward(prefilled(1), chain[:, :1], positions[:, :1] + P, None, 256)[0][0, 0]
    in_chain = lean.forward(prefilled(1), chain, torch.arange(P, P + 5, device="cuda")[None], None, 512)[0][0, 0]
    batch_tokens = torch.randint(0, vocab, (8, 1), device="cuda", generator=g)
    batch_tokens[3] = chain[0, 0]
    in_batch = lean.forward(prefilled(8), batch_tokens, positions[:, :1].expand(8, 1) + P, None, 512)[0][3, 0]
    return {"chain_of_5": bool(torch.equal(alone, in_chain)), "row_of_8": bool(torch.equal(alone, in_batch)),
            "max_abs_diff_chain": float((alone.float() - in_chain.float()).abs().max())}


def decode_tps(lean: LeanLlama) -> dict[str, float]:
    prompt = torch.randint(0, lean.dims.vocab, (40,)).tolist()
    stop = StopCondition(frozenset(), 256)
    runner = CudaGraphRunner(lean, max_length=1024)
    speculative_generate(runner, NoProposer(), prompt, SamplingParams(max_new_tokens=256), stop, k=0)  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    gen = speculative_generate(runner, NoProposer(), prompt, SamplingParams(max_new_tokens=256), stop, k=0)
    loop = len(gen.token_ids) / (time.perf_counter() - t)
    runner.close()
    engine = BatchSpeculator(lean, method="none", max_batch=1, max_length=1024)
    engine.run([BatchRequest(prompt, 256)])
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = engine.run([BatchRequest(prompt, 256)])
    fused = len(out[0].token_ids) / (time.perf_counter() - t)
    engine.close()
    return {"loop_tokens_per_s": loop, "batch_engine_tokens_per_s": fused, "same_tokens": gen.token_ids == out[0].token_ids}


VARIANTS = {  # name -> TILES overrides (kernels.Tile: block_n, block_k, warps, stages)
    "n32k64": {"qkv": Tile(32, 64), "linear": Tile(32, 64), "gate_up": Tile(32, 64)},  # the first kernels' tiles
    "n16k128": {"qkv": Tile(16, 64), "linear": Tile(16, 128), "gate_up": Tile(16, 128)},
    "n16k128w2": {"qkv": Tile(16, 64, 2), "linear": Tile(16, 128, 2), "gate_up": Tile(16, 128, 2)},
    "n16k256s2": {"qkv": Tile(16, 128, 4, 2), "linear": Tile(16, 256, 4, 2), "gate_up": Tile(16, 256, 4, 2)},
    "n32k128": {"qkv": Tile(16, 128), "linear": Tile(32, 128), "gate_up": Tile(32, 128), "lm_head": Tile(64, 128)},
}


def kernel_profile(lean: LeanLlama) -> dict[str, dict[str, float]]:
    """GPU µs per kernel name over one 1-token step run eagerly (kernel times, not launch gaps), and
    launches per step."""
    cache = lean.new_cache(1, KV + 64)
    tokens = torch.randint(0, lean.dims.vocab, (1, 1), device="cuda")
    pos = torch.full((1, 1), 300, device="cuda")
    with torch.no_grad():
        lean.forward(cache, tokens, pos, None, KV, logits="all")
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                lean.forward(cache, tokens, pos, None, KV, logits="all")
            torch.cuda.synchronize()
    out: dict[str, dict[str, float]] = {}
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            out[e.key[:60]] = {"us_per_step": e.device_time_total / 5, "calls_per_step": e.count / 5}
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["us_per_step"]))


def tile_variants(model) -> dict[str, dict[str, float]]:
    """Step ms of the fused forward under each launch-shape variant (bfloat16)."""
    saved = dict(kernels.TILES)
    res = {}
    try:
        for name, override in VARIANTS.items():
            kernels.TILES.update(saved)
            kernels.TILES.update(override)
            lean = LeanLlama.from_hf(model, kernels="fused")
            res[name] = {f"{r}x{m}": step_ms(lean, r, m) for r, m in SHAPES}
            print("variant", name, json.dumps(res[name]), flush=True)
    finally:
        kernels.TILES.update(saved)
    return res


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/kernel_bench")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "kv_bucket": KV, "runs": {}}
    ids = torch.randint(0, 49152, (1, 100), device="cuda")
    pos = torch.arange(100, device="cuda")[None]
    reference = None  # float32 torch-kernel logits: what each bfloat16 path is compared against
    for dtype in (torch.float32, torch.bfloat16):
        model = smollm2_shaped(dtype)
        leans = {k: LeanLlama.from_hf(model, kernels=k) for k in ("torch", "fused")}
        logits = {k: lean.forward(lean.new_cache(1, 256), ids, pos, None, 256)[0].float() for k, lean in leans.items()}
        if reference is None:
            reference = logits["torch"]
        name = str(dtype).removeprefix("torch.")
        run = res["runs"][name] = {
            f"{k}_vs_float32_torch": {"rel_err": float((v - reference).norm() / reference.norm()),
                                      "argmax_agreement": float((v.argmax(-1) == reference.argmax(-1)).float().mean())}
            for k, v in logits.items()}
        for k, lean in leans.items():
            run[k] = {"row_independence": row_independence(lean),
                      "step_ms": {f"{r}x{m}": step_ms(lean, r, m) for r, m in SHAPES}}
            if dtype == torch.bfloat16:
                run[k]["decode"] = decode_tps(lean)
                run[k]["kernels_1x1"] = kernel_profile(lean)
            print(name, k, json.dumps(run[k]), flush=True)
        if dtype == torch.bfloat16:
            run["fused_tile_variants"] = tile_variants(model)
        del model, leans
        torch.cuda.empty_cache()
    (out / "kernel_bench.json").write_text(json.dumps(res, indent=1))
    print(f"\n{'dtype':9} {'rows x q':9} {'torch ms':>9} {'fused ms':>9} {'speedup':>8}")
    for name, run in res["runs"].items():
        for shape in run["torch"]["step_ms"]:
            a, b = run["torch"]["step_ms"][shape], run["fused"]["step_ms"][shape]
            print(f"{name:9} {shape:9} {a:9.3f} {b:9.3f} {a / b:7.2f}x")
        for k in ("torch", "fused"):
            e = run[f"{k}_vs_float32_torch"]
            print(f"{name} {k}: vs float32 torch rel. error {e['rel_err']:.2e}, argmax agreement {e['argmax_agreement']:.3f}")
    for name, steps in res["runs"]["bfloat16"]["fused_tile_variants"].items():
        print(f"variant {name:10} " + " ".join(f"{shape} {ms:.3f}" for shape, ms in steps.items()))
    for kname, v in list(res["runs"]["bfloat16"]["fused"]["kernels_1x1"].items())[:8]:
        print(f"{v['us_per_step']:8.1f} us {v['calls_per_step']:5.0f}x {kname}")


if __name__ == "__main__":
    main()
