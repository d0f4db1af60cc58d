"""What quantization costs and buys: perplexity, greedy agreement, α, memory, step latency.

For each quantization (none, int8, fp8 by default) the target and the draft are built as
engines (specdeploy.build.engine: calibrate -> quantize -> engine directory -> loader), and:

- perplexity     on held-out text (stdlib module docstrings; calibration never reads them)
- agreement      with the unquantized target (fp32 on CPU, bf16 on CUDA) over N eval prompts:
                 `greedy_identical` = fraction of generated positions whose token equals the
                 reference's, `exact` = fraction of prompts generated identically,
                 `top1_forced` = argmax agreement along the reference text (no drift)
- α (draft only) the unquantized target verifying a quantized draft (the shipped DraftLM by default):
                 accepted / proposed, and the acceptance length; the output must equal the
                 target's own greedy output (speculation is lossless), `lossless` checks it
- memory         bytes of the quantized model's parameters and buffers; peak CUDA memory
- step latency   one decode step (1 token, KV cache of the prompt) of the quantized target

Speculation over a quantized target is lossless relative to THAT quantized target, not to
the unquantized one: the agreement columns are the price of quantizing the target.

    python scripts/quant_report.py --out results/quant_cpu --prompts 3 --max-new-tokens 16   # CPU, small
    python scripts/quant_report.py --device cuda --out results/quant_h100                   # GPU
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from specdeploy.bench.tasks import builtin_prompts
from specdeploy.build.engine import BuildConfig, build_torch_engine, heldout_texts, load_quantized
from specdeploy.build.quantize import model_kernels
from specdeploy.config import SamplingParams, SpecConfig
from specdeploy.export.onnx import param_bytes, resolve_draft
from specdeploy.models.loader import LoadedModel, load_model
from specdeploy.runtime.engine import SpecEngine
from specdeploy.runtime.runner import TorchRunner


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], max_tokens: int, device: str) -> float:
    nll, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"][:max_tokens]], device=device)
        if ids.shape[1] < 2:
            continue
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nll += float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return math.exp(nll / max(count, 1))


@torch.no_grad()
def top1_forced(model, ref_ids: list[list[int]], prompt_ids: list[list[int]], device: str) -> float:
    """Argmax agreement with the reference's generated tokens, fed the reference's own prefix."""
    same = total = 0
    for p, gen in zip(prompt_ids, ref_ids):
        if not gen:
            continue
        ids = torch.tensor([p + gen], device=device)
        pred = model(input_ids=ids, use_cache=False).logits[0, len(p) - 1 : -1].argmax(-1).tolist()
        same += sum(a == b for a, b in zip(pred, gen))
        total += len(gen)
    return same / max(total, 1)


@torch.no_grad()
def step_latency_ms(model, prompt: list[int], device: str, steps: int) -> float:
    runner = TorchRunner(model)
    runner.forward(torch.tensor(prompt))
    token = torch.tensor([prompt[-1]])
    for _ in range(3):  # warm-up
        runner.forward(token)
        runner.rollback(len(prompt))
    times = []
    for _ in range(steps):
        sync(device)
        t = time.perf_counter()
        runner.forward(token)
        sync(device)
        times.append(time.perf_counter() - t)
        runner.rollback(len(prompt))
    return 1000 * statistics.median(times)


def generate_all(engine: SpecEngine, prompt_ids: list[list[int]], params: SamplingParams):
    return [engine.generate_ids(p, params) for p in prompt_ids]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="smollm2")
    ap.add_argument("--draft", default="draft_lm",
                    help="draft for the α column: layerskip[:N], draft_lm[:PATH], self (the target itself) or a model path")
    ap.add_argument("--quants", default="none,int8,fp8", help="comma-separated: none,int8,fp8,int8_wo")
    ap.add_argument("--int8-activations", default="per-token", choices=["per-token", "static"])
    ap.add_argument("--smooth-alpha", type=float, default=0.5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", help="compute dtype (default float32 on cpu, bfloat16 on cuda)")
    ap.add_argument("--prompts", type=int, default=20, help="eval prompts for agreement and α")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--ppl-texts", type=int, default=16)
    ap.add_argument("--ppl-tokens", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-tokens", type=int, default=256)
    ap.add_argument("--latency-steps", type=int, default=30)
    ap.add_argument("--engines", help="where to write the engines (default: a temporary folder)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    device = args.device
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        args.dtype or ("float32" if device == "cpu" else "bfloat16")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    engines_dir = Path(args.engines or tempfile.mkdtemp(prefix="quant-engines-"))
    quants = [q.strip() for q in args.quants.split(",") if q.strip()]

    ref = load_model(args.target, device=device, dtype=dtype)  # the unquantized target
    tok = ref.tokenizer
    plain_ref = SpecEngine(ref, SpecConfig(method="none"))
    eval_prompts = builtin_prompts("eval")
    step = max(1, len(eval_prompts) // args.prompts)
    chosen = eval_prompts[::step][: args.prompts]
    prompt_ids = [plain_ref.encode(p.prompt, max_new_tokens=args.max_new_tokens) for p in chosen]
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    ref_gen = [r.token_ids for r in generate_all(plain_ref, prompt_ids, params)]
    texts = heldout_texts(args.ppl_texts)
    build_cfg = BuildConfig(smooth_alpha=args.smooth_alpha, int8_activations=args.int8_activations,
                            calib_samples=args.calib_samples, calib_tokens=args.calib_tokens, device=device)

    rows = []
    for q in quants:
        print(f"[{q}] building engines", file=sys.stderr, flush=True)
        fp32 = load_model(args.target, device=device, dtype=torch.float32)  # build input (calibrates in fp32)
        tman = build_torch_engine(fp32, engines_dir / q / "target", q, build_cfg, "target")
        draft_src = fp32 if args.draft == "self" else resolve_draft(args.draft, fp32)
        dman = build_torch_engine(draft_src, engines_dir / q / "draft", q, build_cfg, "draft")
        del fp32, draft_src
        qmodel, _ = load_quantized(engines_dir / q / "target", device, dtype)
        qdraft, _ = load_quantized(engines_dir / q / "draft", device, dtype)
        qtarget = LoadedModel(qmodel, tok, f"{args.target} ({q})", ref.source_hash)

        print(f"[{q}] perplexity, agreement, latency", file=sys.stderr, flush=True)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        ppl = perplexity(qmodel, tok, texts, args.ppl_tokens, device)
        gens = [r.token_ids for r in generate_all(SpecEngine(qtarget, SpecConfig(method="none")), prompt_ids, params)]
        same = sum(sum(a == b for a, b in zip(g, r)) for g, r in zip(gens, ref_gen))
        total = sum(max(len(g), len(r)) for g, r in zip(gens, ref_gen))
        latency = step_latency_ms(qmodel, prompt_ids[0], device, args.latency_steps)
        peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None

        print(f"[{q}] α with only the draft quantized", file=sys.stderr, flush=True)
        draft = LoadedModel(qdraft, tok, dman.source, dman.source_hash)
        spec = SpecEngine(ref, SpecConfig(method="draft", k=args.k), draft, runner=plain_ref.runner)
        spec_runs = generate_all(spec, prompt_ids, params)
        proposed = sum(r.stats.proposed for r in spec_runs)
        accepted = sum(r.stats.accepted for r in spec_runs)
        forwards = sum(r.stats.target_forwards for r in spec_runs)
        emitted = sum(len(r.token_ids) for r in spec_runs)
        rows.append({
            "quant": q,
            "activation_scaling": tman.quant.get("activation_scaling"),
            "kernel": model_kernels(qmodel),
            "perplexity": round(ppl, 4),
            "greedy_identical": round(same / max(total, 1), 4),
            "exact": round(sum(g == r for g, r in zip(gens, ref_gen)) / len(gens), 4),
            "top1_forced": round(top1_forced(qmodel, ref_gen, prompt_ids, device), 4),
            "draft_alpha": round(accepted / max(proposed, 1), 4),
            "draft_acceptance_length": round(emitted / max(forwards, 1), 3),
            "lossless": all(r.token_ids == g for r, g in zip(spec_runs, ref_gen)),
            "param_bytes": param_bytes(qmodel),
            "draft_param_bytes": param_bytes(qdraft),
            "stored_bytes": tman.info["stored_bytes"],
            "peak_cuda_bytes": peak,
            "step_latency_ms": round(latency, 3),
            "build_seconds": tman.info["build_seconds"],
        })
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        del qmodel, qdraft, spec, draft, qtarget
        if device.startswith("cuda"):
            torch.cuda.empty_cache()

    meta = {
        "target": args.target, "source_hash": ref.source_hash, "draft": args.draft, "device": device,
        "device_name": torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or "cpu",
        "dtype": str(dtype).replace("torch.", ""), "prompts": len(prompt_ids), "max_new_tokens": args.max_new_tokens,
        "k": args.k, "ppl_texts": len(texts), "ppl_tokens": args.ppl_tokens, "calib_samples": args.calib_samples,
        "calib_tokens": args.calib_tokens, "smooth_alpha": args.smooth_alpha,
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "note": "speculation over a quantized target is lossless relative to that quantized target",
    }
    (out / "quant_report.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (out / "quant_report.md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))
    return 0


def markdown(meta: dict, rows: list[dict]) -> str:
    head = (f"# Quantization report: {meta['target']} on {meta['device']} ({meta['device_name']}), "
            f"{meta['dtype']}, {meta['date']}\n\n"
            f"{meta['prompts']} eval prompts x {meta['max_new_tokens']} new tokens, draft {meta['draft']} (k={meta['k']}), "
            f"perplexity on {meta['ppl_texts']} held-out texts (<= {meta['ppl_tokens']} tokens), calibration "
            f"{meta['calib_samples']} texts x {meta['calib_tokens']} tokens, torch {meta['torch']}.\n\n"
            "Agreement is with the unquantized target; α is the unquantized target verifying the quantized draft "
            "(lossless = its output equals the target's greedy output). Speculation over a quantized target is "
            "lossless relative to that quantized target. In bf16 the batched verification of k+1 tokens and the "
            "one-token steps of plain decoding round differently, so `lossless` (and the `none` row's agreement) "
            "can dip below exact there; exactness is tested in float32.\n\n")
    cols = ["quant", "kernel", "perplexity", "greedy_identical", "exact", "top1_forced", "draft_alpha",
            "draft_acceptance_length", "lossless", "param MB", "peak CUDA MB", "step_latency_ms"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        vals = [r["quant"] + (f" ({r['activation_scaling']})" if r.get("activation_scaling") else ""),
                ", ".join(r["kernel"].values()), r["perplexity"], r["greedy_identical"], r["exact"], r["top1_forced"],
                r["draft_alpha"], r["draft_acceptance_length"], r["lossless"], f"{r['param_bytes'] / 1e6:.1f}",
                "-" if r["peak_cuda_bytes"] is None else f"{r['peak_cuda_bytes'] / 1e6:.1f}", r["step_latency_ms"]]
        lines.append("| " + " | ".join(str(v) for v in vals) + " |")
    return head + "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
