"""CLI for the deployment half: `export`, `build`, and `generate --engine DIR`.

    specdeploy export --format onnx [--target smollm2] [--draft PATH|layerskip[:N]]
                      [--method medusa|eagle|medusa,eagle [--head PATH]] --out DIR
    specdeploy export --format trtllm ...          (specdeploy.export.trtllm_checkpoint)
    specdeploy build  --from DIR | --target smollm2 --quant none|int8|int8_wo|fp8
                      [--target-quant Q] [--draft-quant Q] [--draft PATH] [--smooth-alpha 0.5] --out DIR
    specdeploy generate --engine DIR ...           (the generate command, on built artifacts)

Engine directories are recognised by their manifest (specdeploy.build.manifest) alone.
"""
from __future__ import annotations

import argparse
from typing import Any

from specdeploy.errors import SpecDeployError


def add_cli(subparsers: Any) -> None:
    e = subparsers.add_parser("export", help="export the target (and draft) as ONNX graphs or a TensorRT-LLM checkpoint")
    e.add_argument("--format", choices=["onnx", "trtllm"], default="onnx")
    e.add_argument("--target", default="smollm2", help="'smollm2', a .gguf file or a Hugging Face directory")
    e.add_argument("--draft", help="draft model to export too (ONNX): a model path, or layerskip[:N]")
    e.add_argument("--method", help="onnx: head graphs to export too: medusa, eagle or medusa,eagle")
    e.add_argument("--head", help="onnx: the trained head artifact for --method (default: the shipped one)")
    e.add_argument("--out", required=True, help="output directory")
    e.add_argument("--opset", type=int, default=18, help="ONNX opset")
    e.add_argument("--quant", help="trtllm: none | fp8 | int8 (SmoothQuant) | int8_wo")
    e.add_argument("--dtype", help="trtllm: checkpoint dtype (default bfloat16)")
    try:
        from specdeploy.export.trtllm_checkpoint import add_export_arguments

        add_export_arguments(e)
    except ImportError:
        pass
    e.set_defaults(func=cmd_export)

    b = subparsers.add_parser("build", help="build engines (quantized weights + manifest) from a model or an ONNX export")
    src = b.add_mutually_exclusive_group()
    src.add_argument("--from", dest="src", help="an `export --format onnx` directory (builds ONNX Runtime engines)")
    src.add_argument("--target", help="model to quantize for the torch runtime: 'smollm2', .gguf or HF directory")
    b.add_argument("--draft", help="draft to build too (torch): a model path, or layerskip[:N]")
    b.add_argument("--quant", default="none", help="none | int8 | int8_wo | fp8 (for target and draft)")
    b.add_argument("--target-quant", help="quantization of the target (overrides --quant)")
    b.add_argument("--draft-quant", help="quantization of the draft (overrides --quant)")
    b.add_argument("--smooth-alpha", type=float, default=0.5, help="SmoothQuant migration strength in [0, 1]")
    b.add_argument("--int8-activations", choices=["per-token", "static"], default="per-token",
                   help="int8 activation scales: per-token (dynamic) or static (calibrated per-tensor)")
    b.add_argument("--calib-samples", type=int, default=32, help="calibration texts")
    b.add_argument("--calib-tokens", type=int, default=256, help="max tokens per calibration text")
    b.add_argument("--device", default="cpu", help="where calibration runs: cpu or cuda")
    b.add_argument("--out", required=True, help="output directory")
    b.add_argument("--backend", choices=["torch", "trtllm"], default="torch",
                   help="trtllm: run trtllm-build on an `export --format trtllm` checkpoint (--from)")
    b.add_argument("--speculative-decoding-mode", choices=["draft_tokens_external", "medusa", "eagle"],
                   help="trtllm: the engine's speculative decoding mode")
    b.add_argument("--max-draft-len", type=int, help="trtllm: draft tokens per step")
    b.add_argument("--max-batch-size", type=int, default=8, help="trtllm: largest batch")
    b.set_defaults(func=cmd_build)

    g = subparsers.choices.get("generate")
    if g is not None:
        g.add_argument("--engine", help="an export/build output directory to run instead of the torch target")
        g.set_defaults(func=_with_engine(g.get_default("func")))


def cmd_export(args: argparse.Namespace) -> int:
    if args.format == "trtllm":
        from specdeploy.export.trtllm_checkpoint import trtllm_export_cli

        return int(trtllm_export_cli(args) or 0)
    from specdeploy.export.onnx import OnnxExportConfig, export_onnx, resolve_draft
    from specdeploy.export.onnx_heads import ONNX_HEAD_METHODS
    from specdeploy.models.loader import load_model

    methods = [m.strip() for m in (args.method or "").split(",") if m.strip()]
    bad = [m for m in methods if m not in ONNX_HEAD_METHODS]
    if bad:
        raise SpecDeployError(f"--method {','.join(bad)}: ONNX exports the heads of {' and '.join(ONNX_HEAD_METHODS)} "
                              f"(a draft model: --draft)")
    if args.head and len(methods) != 1:
        raise SpecDeployError("--head PATH needs exactly one --method (medusa or eagle)")
    target = load_model(args.target)
    draft = resolve_draft(args.draft, target) if args.draft else None
    out = export_onnx(target, args.out, draft, OnnxExportConfig(opset=args.opset), heads={m: args.head for m in methods})
    from specdeploy.build.manifest import read_manifest

    parity = read_manifest(out).info.get("parity", {})
    print(f"ONNX export written to {out} (max |logit diff| vs torch: "
          + ", ".join(f"{r} {v:.2g}" for r, v in parity.items()) + ")")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    if args.backend == "trtllm":
        return _build_trtllm(args)
    from specdeploy.build.engine import BuildConfig, build_from_onnx, build_torch_engines

    tq = args.target_quant or args.quant
    dq = args.draft_quant or args.quant
    config = BuildConfig(smooth_alpha=args.smooth_alpha, int8_activations=args.int8_activations, calib_samples=args.calib_samples,
                         calib_tokens=args.calib_tokens, device=args.device)
    if args.src:
        out = build_from_onnx(args.src, args.out, target_quant=tq, draft_quant=dq)
    else:
        out = build_torch_engines(args.target or "smollm2", args.out, draft=args.draft, target_quant=tq,
                                  draft_quant=dq, config=config)
    print(f"engine written to {out}")
    return 0


def _build_trtllm(args: argparse.Namespace) -> int:
    """trtllm-build where TensorRT-LLM is installed; elsewhere exit 2 with the command to run."""
    from specdeploy.build.trtllm_build import TrtllmUnavailable, plan_trtllm_build, run_trtllm_build

    if not args.src:
        raise SpecDeployError("--backend trtllm needs --from CHECKPOINT_DIR (made by `specdeploy export --format trtllm`)")
    plan = plan_trtllm_build(args.src, args.out, speculative_decoding_mode=args.speculative_decoding_mode,
                             max_draft_len=args.max_draft_len, max_batch_size=args.max_batch_size)
    try:
        out = run_trtllm_build(plan)
    except TrtllmUnavailable as e:
        raise SpecDeployError(" ".join(str(e).split())) from None  # one line, exit 2, nothing written
    print(f"TensorRT-LLM engine written to {out}")
    return 0


def _with_engine(generate):
    """Wrap the generate command: with --engine, run the built artifacts; else as before."""

    def cmd(args: argparse.Namespace) -> int:
        if not getattr(args, "engine", None):
            return generate(args)
        return _generate_engine(args)

    return cmd


def _generate_engine(args: argparse.Namespace) -> int:
    from specdeploy.bench.tasks import Prompt, load_prompts
    from specdeploy.build.engine import load_engine
    from specdeploy.cli import _generate_each, _sampling, _spec

    params, spec = _sampling(args), _spec(args)
    if args.batch != 1:  # the batched engine runs the torch target, not these artifacts
        raise SpecDeployError("--engine artifacts decode one request at a time: leave out --batch")
    prompts = load_prompts(args.prompts) if args.prompts else [Prompt(args.task, args.prompt)]
    if not args.prompts and not args.prompt.strip():
        raise SpecDeployError("empty prompt")
    engine = load_engine(args.engine, spec, args.target, device=args.device)
    if args.task != "default":
        prompts = [Prompt(args.task, p.prompt) for p in prompts]
    return _generate_each(args, spec, params, prompts, engine=engine, label=f"{spec.method} @ {args.engine}")
