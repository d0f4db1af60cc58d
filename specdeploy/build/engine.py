"""Engine directories: quantized weights + config + tokenizer + manifest, and their loaders.

`specdeploy build` makes one of two kinds (both found through manifest.json alone):
- "torch-quant": model.safetensors (QuantLinear buffers + float params), config.json,
  tokenizer, generation config; loaded by `load_quantized` into an ordinary HF model
  that runs through TorchRunner. Quantization: specdeploy.build.quantize.
- "onnx": an ONNX Runtime graph, from an `export --format onnx` directory, either copied
  ("none") or with dynamic INT8 MatMuls (`onnxruntime.quantization.quantize_dynamic`).
  Medusa / EAGLE head graphs are copied as exported (small; their parity stays recorded).
A build of target and draft is a bundle: out/target, out/draft, out/manifest.json.

Calibration runs on offline text: the training prompts of specdeploy.training (else the
module docstrings of Python's standard library), never on evaluation prompts.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from specdeploy.build.manifest import (Manifest, artifact_file, check_source, component_dir, now, read_manifest,
                                       tokenizer_hash, versions, write_manifest)
from specdeploy.build.quantize import ALGOS, calibrate, kernel_path, quantize, quantized_model, rebuild_rotary
from specdeploy.errors import SpecDeployError
from specdeploy.models.loader import LoadedModel

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
ONNX_QUANTS = ("none", "int8")


@dataclass(frozen=True)
class BuildConfig:
    smooth_alpha: float = 0.5  # SmoothQuant migration strength (0 = all on activations, 1 = all on weights)
    int8_activations: str = "per-token"  # int8 activation scales: "per-token" (dynamic) or "static" (calibrated)
    calib_samples: int = 32  # calibration texts
    calib_tokens: int = 256  # tokens kept per calibration text
    device: str = "cpu"  # where calibration runs
    progress: bool = True
    seed: int = 0


# ----------------------------------------------------------------------------- offline text

def stdlib_docstrings(limit: int, skip: int = 0, min_chars: int = 300) -> list[str]:
    """Module docstrings of Python's standard library (sorted by path), parsed, never imported."""
    import ast
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    out: list[str] = []
    seen = 0
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/__init__.py")):
        try:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        if doc and len(doc) >= min_chars:
            seen += 1
            if seen > skip:
                out.append(doc)
            if len(out) >= limit:
                break
    return out


def calibration_texts(n: int, seed: int = 0) -> list[str]:
    """n offline calibration texts: training prompts across task types, else stdlib docstrings."""
    try:
        from specdeploy.training.prompt_sources import TASKS, training_prompts

        prompts = training_prompts(max(1, math.ceil(n / len(TASKS))), seed=seed)
        # interleave the task groups so that a small n still spans the task types
        by_task: dict[str, list[str]] = {}
        for p in prompts:
            by_task.setdefault(p.task, []).append(p.prompt)
        texts = [t for group in zip(*by_task.values()) for t in group]
        if len(texts) >= n:
            return texts[:n]
    except ImportError:
        pass
    return stdlib_docstrings(n)


def heldout_texts(n: int) -> list[str]:
    """Held-out text for perplexity: stdlib module docstrings (calibration never reads these)."""
    return stdlib_docstrings(n, skip=0)


def _token_batches(tokenizer, texts: list[str], max_tokens: int) -> list[torch.Tensor]:
    out = []
    for t in texts:
        ids = tokenizer(t)["input_ids"][:max_tokens]
        if len(ids) >= 2:
            out.append(torch.tensor(ids, dtype=torch.long))
    return out


# ----------------------------------------------------------------------------- torch engines

def build_torch_engine(loaded: LoadedModel, out_dir: str | Path, algo: str, config: BuildConfig = BuildConfig(),
                       name: str = "target") -> Manifest:
    """Calibrate, quantize and write one model's engine directory."""
    from safetensors.torch import save_file

    if algo not in ALGOS:
        raise SpecDeployError(f"unknown quantization {algo!r}; use one of {', '.join(ALGOS)}")
    out = Path(out_dir)
    start = time.perf_counter()
    model = loaded.model.to(config.device).float().eval()
    stats, calib = None, {}
    if algo in ("fp8", "int8"):
        batches = _token_batches(loaded.tokenizer, calibration_texts(config.calib_samples, config.seed), config.calib_tokens)
        stats = calibrate(model, batches, progress=config.progress)
        calib = {"texts": len(batches), "tokens": sum(int(b.numel()) for b in batches),
                 "source": "specdeploy.training.prompt_sources.training_prompts (offline)"}
    qw = quantize(model, algo, stats, config.smooth_alpha, config.int8_activations)
    state = dict(qw.state_dict)
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # stored once, as the input embedding
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / WEIGHTS), metadata={"format": "pt", "specdeploy_quant": algo})
    model.config.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    stored = sum(v.numel() * v.element_size() for v in state.values())
    manifest = Manifest(
        kind="torch-quant", name=name, source=loaded.source, source_hash=loaded.source_hash,
        tokenizer_hash=tokenizer_hash(loaded.tokenizer), files={"weights": WEIGHTS, "config": "config.json"},
        quant={**qw.summary, "calibration": calib, "kernel_path": {
            "build_device": f"{config.device}: {kernel_path(algo, config.device)}",
            "cpu": kernel_path(algo, "cpu"),
            "cuda": {"fp8": "torch._scaled_mm on sm89+ (else fp8-dequant-fallback)", "int8": "torch._int_mm",
                     "int8_wo": "int8-weight-only-dequant", "none": "dense"}[algo]}},
        info={"dtype": "float32", "stored_bytes": stored, "num_layers": int(model.config.num_hidden_layers),
              "build_seconds": round(time.perf_counter() - start, 1)},
        versions=versions("safetensors"), created=now())
    write_manifest(out, manifest)
    return manifest


def load_quantized(directory: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """The model of a torch-quant engine directory (QuantLinear layers), on device, with
    its float parts in dtype. Returns (model, manifest)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    manifest = read_manifest(directory)
    if manifest.kind != "torch-quant":
        raise SpecDeployError(f"{directory}: a {manifest.kind!r} artifact, not a torch engine")
    state = load_file(str(artifact_file(directory, manifest, "weights")))
    config = AutoConfig.from_pretrained(artifact_file(directory, manifest, "config").parent)
    with torch.device("meta"):  # no random init: every stored tensor is assigned below
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    modules = sorted(k[: -len(".qweight")] for k in state if k.endswith(".qweight"))
    algo = manifest.quant.get("algo", "none")
    quantized_model(model, state, algo, modules, manifest.quant.get("activation_scaling", "per-token"))
    try:
        model.generation_config = GenerationConfig.from_pretrained(directory)
    except OSError:
        pass
    model = model.to(device=device, dtype=dtype)
    rebuild_rotary(model, device)  # float32 tables, as from_pretrained keeps them
    return model.eval(), manifest


def build_torch_engines(target: str, out_dir: str | Path, *, draft: str | None = None, target_quant: str = "none",
                        draft_quant: str = "none", config: BuildConfig = BuildConfig()) -> Path:
    """Build the target (and draft: a model path or layerskip[:N]) into out_dir as a bundle."""
    from specdeploy.export.onnx import resolve_draft
    from specdeploy.models.loader import load_model

    for q in (target_quant, draft_quant):
        if q not in ALGOS:
            raise SpecDeployError(f"unknown quantization {q!r}; use one of {', '.join(ALGOS)}")
    out = Path(out_dir)
    loaded = load_model(target, dtype=torch.float32)
    parts = {"target": build_torch_engine(loaded, out / "target", target_quant, config, "target")}
    if draft:
        d = resolve_draft(draft, loaded)
        parts["draft"] = build_torch_engine(d, out / "draft", draft_quant, config, "draft")
    write_manifest(out, Manifest(
        kind="bundle", name="torch-engine", source=loaded.source, source_hash=loaded.source_hash,
        tokenizer_hash=parts["target"].tokenizer_hash, components={r: r for r in parts},
        quant={r: m.quant.get("algo") for r, m in parts.items()}, versions=versions("safetensors"), created=now()))
    return out


# ----------------------------------------------------------------------------- ONNX Runtime engines

def build_onnx_engine(src_dir: str | Path, out_dir: str | Path, algo: str, name: str) -> Manifest:
    """Copy ("none") or INT8-quantize (dynamic, per-channel weights) one exported ONNX model."""
    import shutil

    from transformers import AutoTokenizer

    if algo not in ONNX_QUANTS:
        raise SpecDeployError(f"--quant {algo} is not available for ONNX Runtime engines; use "
                              f"{' or '.join(ONNX_QUANTS)} (fp8 / SmoothQuant int8 run in the torch engine: --target)")
    src = read_manifest(src_dir)
    if src.kind != "onnx":
        raise SpecDeployError(f"{src_dir}: a {src.kind!r} artifact, not an ONNX export")
    graph = artifact_file(src_dir, src, "graph")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target_graph = out / graph.name
    start = time.perf_counter()
    quant: dict = {"algo": "none", "kernel_path": "onnxruntime fp32 MatMul"}
    if algo == "none":
        for role, fname in src.files.items():
            shutil.copyfile(Path(src_dir) / fname, out / fname)
        files = dict(src.files)
    else:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(graph), str(target_graph), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"],
                         use_external_data_format=int(src.info.get("param_bytes", 0)) > 2 * 1024**3)
        files = {"graph": target_graph.name}
        if (out / (target_graph.name + ".data")).is_file():
            files["external_data"] = target_graph.name + ".data"
        quant = {"algo": "ort_dynamic_int8", "weights": "int8 per-channel (QInt8)",
                 "activations": "uint8 per-tensor, dynamic (computed at run time)",
                 "kernel_path": "onnxruntime DynamicQuantizeMatMul / MatMulInteger"}
    if (Path(src_dir) / "tokenizer_config.json").is_file():  # head graphs carry no tokenizer
        AutoTokenizer.from_pretrained(src_dir).save_pretrained(out)
    try:
        from transformers import GenerationConfig

        GenerationConfig.from_pretrained(src_dir).save_pretrained(out)
    except OSError:
        pass
    info = dict(src.info)
    info["build_seconds"] = round(time.perf_counter() - start, 1)
    if algo != "none":  # the export's torch parity no longer describes this graph
        info.pop("parity", None)
        info["parity_vs_fp32_graph"] = _onnx_agreement(graph, target_graph, AutoTokenizer.from_pretrained(src_dir))
    manifest = Manifest(kind="onnx", name=name, source=src.source, source_hash=src.source_hash,
                        tokenizer_hash=src.tokenizer_hash, files=files, quant=quant, info=info,
                        versions=versions("onnx", "onnxruntime"), created=now())
    write_manifest(out, manifest)
    return manifest


def _onnx_agreement(ref_graph: Path, graph: Path, tokenizer) -> dict:
    """Logit difference and argmax agreement of a quantized graph vs its float graph on one prompt."""
    from specdeploy.export.onnx import PARITY_PROMPT, max_abs_diff
    from specdeploy.runtime.onnx_runner import OnnxGraph, OnnxRunner

    ids = torch.tensor(tokenizer(PARITY_PROMPT)["input_ids"], dtype=torch.long)
    a = OnnxRunner(OnnxGraph(ref_graph)).forward(ids).logits
    b = OnnxRunner(OnnxGraph(graph)).forward(ids).logits
    return {"prompt_tokens": int(ids.numel()), "max_abs_logits": max_abs_diff(a, b),
            "argmax_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean())}


def build_from_onnx(src_dir: str | Path, out_dir: str | Path, *, target_quant: str = "none",
                    draft_quant: str = "none") -> Path:
    """ONNX Runtime engines from an `export --format onnx` directory (a bundle or one model)."""
    out = Path(out_dir)
    src = read_manifest(src_dir)
    roles = src.components if src.kind == "bundle" else {src.name: "."}
    built = {}
    for role in roles:
        d = component_dir(src_dir, role)
        quant = draft_quant if role == "draft" else target_quant
        if read_manifest(d).info.get("graph") in ("medusa", "eagle"):
            quant = "none"  # head graphs are copied as exported
        built[role] = build_onnx_engine(d, out / role, quant, role)
    first = built.get("target") or next(iter(built.values()))
    write_manifest(out, Manifest(
        kind="bundle", name="onnx-engine", source=first.source, source_hash=first.source_hash,
        tokenizer_hash=first.tokenizer_hash, components={r: r for r in built},
        quant={r: m.quant.get("algo") for r, m in built.items()}, info={"format": "onnx"},
        versions=versions("onnx", "onnxruntime"), created=now()))
    return out


# ----------------------------------------------------------------------------- loading for generation

def _kind(directory: str | Path) -> str:
    m = read_manifest(directory)
    if m.kind != "bundle":
        return m.kind
    tdir = component_dir(directory, "target")
    if tdir is None:
        raise SpecDeployError(f"{directory}: the bundle has no target")
    return read_manifest(tdir).kind


def load_engine(directory: str | Path, spec, target: str = "smollm2", device: str = "cpu",
                dtype: torch.dtype | None = None):
    """A SpecEngine over built artifacts, refusing ones built from another model or tokenizer.

    `target` names the model the engine must come from (its tokenizer and stop tokens are
    used). ONNX engines run in ONNX Runtime; torch-quant engines through TorchRunner.
    """
    from specdeploy.models.loader import load_model
    from specdeploy.runtime.engine import SpecEngine
    from specdeploy.runtime.onnx_runner import load_onnx_engine

    kind = _kind(directory)
    dtype = dtype or torch.float32
    loaded = load_model(target, device=device, dtype=dtype)
    if kind == "onnx":
        return load_onnx_engine(directory, spec, loaded)
    if kind != "torch-quant":
        raise SpecDeployError(f"{directory}: cannot generate with a {kind!r} artifact")
    tok = tokenizer_hash(loaded.tokenizer)
    tdir = component_dir(directory, "target")
    check_source(read_manifest(tdir), tdir, source_hash=loaded.source_hash, tok_hash=tok, what=f"target {target}")
    qmodel, tm = load_quantized(tdir, device, dtype)
    qtarget = LoadedModel(qmodel, loaded.tokenizer, f"{target} ({tm.quant.get('algo')})", loaded.source_hash)
    draft = None
    ddir = component_dir(directory, "draft") if spec.method == "draft" else None
    if ddir is not None:
        dm = read_manifest(ddir)
        check_source(dm, ddir, source_hash=None, tok_hash=tok, what=f"target {target}")
        dmodel, _ = load_quantized(ddir, device, dtype)
        draft = LoadedModel(dmodel, loaded.tokenizer, dm.source, dm.source_hash)
    elif spec.method == "draft" and spec.draft:
        draft = load_model(spec.draft, device=device, dtype=dtype)
    return SpecEngine(qtarget, spec, draft)
