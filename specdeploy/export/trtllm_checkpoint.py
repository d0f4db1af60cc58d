"""Export a Hugging Face Llama model as a TensorRT-LLM checkpoint: config.json + rank{N}.safetensors.

The output is the *checkpoint* that `trtllm-build` consumes; it is not an engine. Nothing here
imports or runs TensorRT-LLM. The format follows these upstream files (NVIDIA/TensorRT-LLM):

- docs/source/architecture/checkpoint.md: directory layout, config fields, tensor names,
  FP8 scale names (`weights_scaling_factor`, `activation_scaling_factor`),
  `attention.kv_cache_scaling_factor`; linear weights are always [out_features, in_features].
- tensorrt_llm/models/llama/convert.py (`load_weights_from_hf_model`,
  `get_prefix_and_param_name_map`): mlp.fc = gate_proj, mlp.gate = up_proj, mlp.proj = down_proj,
  attention.dense = o_proj, post_layernorm = post_attention_layernorm; q, k, v are split per
  rank *then* fused; k/v heads are duplicated when num_kv_heads < tp (`dup_kv_weight`);
  lm_head is zero-padded to `pad_vocab_size(vocab, tp)` then split on dim 0; dense and proj
  split on dim 1; vocab_embedding kept whole (use_parallel_embedding=False); int8 KV scale =
  max(q, k, v output amax) / 127; FP8 KV scale 1.0 when uncalibrated.
- tensorrt_llm/models/convert_utils.py: `split` (torch.chunk), `dup_kv_weight`, `smooth_gemm`.
- tensorrt_llm/models/llama/config.py (`LLaMAConfig`) and tensorrt_llm/models/modeling_utils.py
  (`PretrainedConfig`, `QuantConfig`, `preprocess_weights`): config keys; W8A16 floats are
  quantized by trtllm-build itself (`weight_only_quantize_dict`, see W8A16 below).
- tensorrt_llm/quantization/layers.py: `FP8Linear`/`FP8RowLinear` (weight fp8 [out, in],
  per-tensor float32 scales of shape (1,)) and `Int8SmoothQuantLinear`/`Int8SmoothQuantRowLinear`
  (weight int8 [out, in], weights_scaling_factor float32 (out,), activation_scaling_factor
  float32 (1,), prequant_scaling_factor model-dtype (in,), applied as x * prequant).
- tensorrt_llm/quantization/quantize.py (`quantize_layers`): default exclude_modules keep
  lm_head and vocab_embedding unquantized. tensorrt_llm/quantization/mode.py: QuantAlgo names.
- tensorrt_llm/mapping.py: rank = pp_rank * tp + tp_rank; `pp_layers` = torch.tensor_split.
- tensorrt_llm/models/medusa/{config,model,weight}.py: MedusaForCausalLM, num_medusa_heads,
  num_medusa_layers, max_draft_len; `medusa_heads.{h}.medusa_layers.{l}.linear.{weight,bias}`
  and `medusa_heads.{h}.lm_head.weight`, all split on dim 0.
- tensorrt_llm/models/eagle/{config,model,weight}.py: EagleForCausalLM with eagle_net_config,
  num_eagle_layers, max_non_leaves_per_layer, max_draft_len; tensors under
  `eagle_nets.{i}.drafter.` (fc [hidden, 2*hidden] + bias, layers without layer 0's
  input_layernorm, no ln_f) and `eagle_nets.{i}.lm_head.weight` (the target's lm_head).
  Neither this nor the Medusa format has a draft vocabulary (models/draft_vocab.py): a head's is
  left out, and its heads draft from the whole lm_head (verification is the target's either way).

W8A16: upstream checkpoints hold int8 weights already in the CUTLASS mixed-GEMM layout that
`torch.ops.trtllm.symmetric_quantize_last_axis_of_batched_matrix` produces for the converting
GPU's architecture; that layout cannot be made without TensorRT-LLM. So a W8A16 export writes
the weights in `dtype` with quant_algo "W8A16", and trtllm-build quantizes them to int8 +
per_channel_scale on the build machine (modeling_utils.preprocess_weights quantizes every
non-int8 qkv/dense/fc/gate/proj weight when quant_algo is W8A16).

FP8 and W8A8_SQ_PER_CHANNEL need activation ranges. Pass `act_amax` (HF Linear module name ->
max |input|, a float or an [in_features] tensor), or `calib_token_ids` ([batch, seq] token ids
run through the model once), else a SpecDeployError is raised.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from specdeploy import __version__
from specdeploy.errors import SpecDeployError

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
QUANT_ALGOS = ("FP8", "W8A8_SQ_PER_CHANNEL", "W8A16")
KV_CACHE_QUANT_ALGOS = ("FP8", "INT8")
FP8_MAX = 448.0  # largest float8_e4m3fn value
INT8_MAX = 127.0
QUANT_ALIASES = {  # CLI spellings -> QuantAlgo names (tensorrt_llm/quantization/mode.py)
    "none": None, "fp8": "FP8", "int8": "W8A8_SQ_PER_CHANNEL", "int8_sq": "W8A8_SQ_PER_CHANNEL",
    "w8a8": "W8A8_SQ_PER_CHANNEL", "int8_wo": "W8A16", "w8a16": "W8A16",
}
CALIBRATION_TEXT = (  # a short, generic calibration text for the CLI (quantize with care)
    "The quick brown fox jumps over the lazy dog. In 1905 Albert Einstein published four papers "
    "that changed physics. def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + "
    "fibonacci(n - 2)\nQuestion: What is the capital of France? Answer: Paris is the capital "
    "and largest city of France, on the river Seine. 3 + 4 * 2 = 11. Speculative decoding lets "
    "a small draft model propose tokens that a large target model verifies in one pass."
)


@dataclass(frozen=True)
class EagleDraft:
    """An EAGLE-1 draft network in the EAGLE repository's tensor naming.

    state_dict keys: `fc.weight` [hidden, 2*hidden], `fc.bias` [hidden],
    `layers.{l}.self_attn.{q,k,v,o}_proj.weight`, `layers.{l}.mlp.{gate,up,down}_proj.weight`,
    `layers.{l}.post_attention_layernorm.weight`, `layers.{l}.input_layernorm.weight` (l > 0),
    optionally `embed_tokens.weight` (else the target's embedding is used, as EAGLE shares it).
    Head counts default to the target's; intermediate_size is read from the weights.
    """

    state_dict: Mapping[str, Tensor]
    num_eagle_layers: int = 4  # EagleNet passes per step (tree depth), upstream default 4
    max_non_leaves_per_layer: int = 10
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None


@dataclass(frozen=True)
class _Linear:
    """One linear layer in TRT-LLM form, before tensor-parallel splitting."""

    weight: Tensor  # [out, in]
    bias: Tensor | None = None  # [out]
    per_out: dict[str, Tensor] = field(default_factory=dict)  # name -> [out], split like rows
    per_in: dict[str, Tensor] = field(default_factory=dict)  # name -> [in], split like columns
    scalars: dict[str, Tensor] = field(default_factory=dict)  # name -> [1], replicated


@dataclass(frozen=True)
class _Spec:
    """What every rank needs to know about the export."""

    dtype: torch.dtype
    tp: int
    pp: int
    quant_algo: str | None
    kv_quant: str | None
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    smoothquant_alpha: float = 0.5


@dataclass
class _Calibration:
    """Activation ranges per HF Linear module name."""

    x: dict[str, Tensor] = field(default_factory=dict)  # name -> [in] max |input| per channel
    y: dict[str, float] = field(default_factory=dict)  # name -> max |output|


def export_trtllm_checkpoint(
    model_dir_or_hf_model: str | Path | nn.Module,
    out_dir: str | Path,
    *,
    dtype: str = "bfloat16",
    tp_size: int = 1,
    pp_size: int = 1,
    quant_algo: str | None = None,
    kv_cache_quant_algo: str | None = None,
    medusa: Mapping[str, Tensor] | None = None,
    eagle: EagleDraft | Mapping[str, Tensor] | None = None,
    max_draft_len: int = 63,
    act_amax: Mapping[str, float | Tensor] | None = None,
    calib_token_ids: Tensor | None = None,  # [batch, seq]
    smoothquant_alpha: float = 0.5,
    source_hash: str | None = None,
    source_name: str | None = None,
) -> Path:
    """Write a TensorRT-LLM checkpoint for a HF Llama model and return its directory.

    medusa: Medusa heads in the Medusa repository's naming: `{h}.{l}.linear.weight`
    [hidden, hidden], `{h}.{l}.linear.bias` [hidden], and the head's lm_head as
    `{h}.{num_layers}.weight` or `{h}.lm_head.weight` [vocab, hidden].
    eagle: an EagleDraft, or its state_dict alone (then num_eagle_layers=4).
    act_amax: max |input| of the first Linear of each input-sharing group, keyed by HF module
    name: `model.layers.{i}.self_attn.q_proj` (for q/k/v), `...self_attn.o_proj`,
    `...mlp.gate_proj` (for gate/up) and `...mlp.down_proj`.
    """
    if eagle is not None and not isinstance(eagle, EagleDraft):
        eagle = EagleDraft(state_dict=eagle)
    # 1. validate the request
    if dtype not in DTYPES:
        raise SpecDeployError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if quant_algo not in (None, *QUANT_ALGOS):
        raise SpecDeployError(f"quant_algo must be None or one of {QUANT_ALGOS}, got {quant_algo!r}")
    if kv_cache_quant_algo not in (None, *KV_CACHE_QUANT_ALGOS):
        raise SpecDeployError(f"kv_cache_quant_algo must be None or one of {KV_CACHE_QUANT_ALGOS}")
    if tp_size < 1 or pp_size < 1:
        raise SpecDeployError("tp_size and pp_size must be >= 1")
    if medusa is not None and eagle is not None:
        raise SpecDeployError("give medusa or eagle, not both")
    if (medusa is not None or eagle is not None) and (pp_size > 1 or quant_algo or kv_cache_quant_algo):
        raise SpecDeployError("Medusa/EAGLE checkpoints are exported unquantized with pp_size=1 only "
                              "(the upstream examples/medusa and examples/eagle support matrices: FP16/BF16, TP)")
    model, source, digest = _load(model_dir_or_hf_model)
    hf = model.config
    spec = _spec(hf, DTYPES[dtype], tp_size, pp_size, quant_algo, kv_cache_quant_algo, smoothquant_alpha)
    if spec.num_heads % tp_size or hf.intermediate_size % tp_size:
        raise SpecDeployError(f"tp_size={tp_size} must divide num_attention_heads={spec.num_heads} "
                              f"and intermediate_size={hf.intermediate_size}")
    if spec.num_kv_heads % tp_size and tp_size % spec.num_kv_heads:
        raise SpecDeployError(f"tp_size={tp_size} and num_key_value_heads={spec.num_kv_heads}: one must divide the other")
    if pp_size > hf.num_hidden_layers:
        raise SpecDeployError(f"pp_size={pp_size} exceeds num_hidden_layers={hf.num_hidden_layers}")

    # 2. calibrate when the quantization needs activation ranges
    calib = _calibration(model, spec, act_amax, calib_token_ids)

    # 3. config.json, then one safetensors file per rank
    config = _config(hf, spec)
    if medusa is not None:
        config.update(_medusa_config(medusa, max_draft_len))
    if eagle is not None:
        config.update(_eagle_config(hf, spec, eagle, max_draft_len))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("rank*.safetensors"):  # from an earlier export with more ranks
        stale.unlink()
    (out / "config.json").write_text(json.dumps(config, indent=4))
    world = tp_size * pp_size
    for rank in range(world):
        tensors = _rank_tensors(model, spec, calib, rank)
        if medusa is not None:
            tensors.update(_medusa_tensors(medusa, config, spec, rank))
        if eagle is not None:
            tensors.update(_eagle_tensors(model, eagle, config, spec, rank))
        save_file(tensors, str(out / f"rank{rank}.safetensors"), metadata={"format": "pt"})
    _write_manifest(out, config, source_name or source, source_hash or digest)
    return out


# ----------------------------------------------------------------------------- loading and config

def _load(src: str | Path | nn.Module) -> tuple[nn.Module, str, str | None]:
    """The HF model, a description of where it came from, and its source hash if known."""
    if isinstance(src, nn.Module):
        model, source, digest = src, f"in-memory {type(src).__name__}", None
    else:
        from specdeploy.models.loader import load_model, resolve_source, source_hash

        path = resolve_source(src)
        if path.is_dir():  # a plain HF directory: no tokenizer needed
            from transformers import AutoModelForCausalLM

            try:
                model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
            except (OSError, ValueError, KeyError) as e:
                raise SpecDeployError(f"cannot load a model from {path}: {e}") from e
            source, digest = str(src), source_hash(path)
        else:  # 'smollm2' or a GGUF file: the project loader converts and caches it
            loaded = load_model(src)
            model, source, digest = loaded.model, loaded.source, loaded.source_hash
    if getattr(model.config, "model_type", None) != "llama":
        raise SpecDeployError(f"{source}: expected a Llama-family model (model_type 'llama'), "
                              f"got {getattr(model.config, 'model_type', None)!r}")
    if getattr(model.config, "mlp_bias", False):
        raise SpecDeployError("mlp_bias=True is not supported by the TensorRT-LLM Llama converter")
    return model.eval(), source, digest


def _spec(hf: Any, dtype: torch.dtype, tp: int, pp: int, quant: str | None, kv: str | None, alpha: float) -> _Spec:
    heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    return _Spec(dtype=dtype, tp=tp, pp=pp, quant_algo=quant, kv_quant=kv, num_heads=heads,
                 num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads, head_dim=head_dim,
                 vocab_size=hf.vocab_size, smoothquant_alpha=alpha)


def _rope(hf: Any) -> tuple[float, dict | None]:
    """(rotary_base, rotary_scaling) from transformers 4 (rope_theta/rope_scaling) or 5 (rope_parameters)."""
    params = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    base = float(params.pop("rope_theta", getattr(hf, "rope_theta", None) or 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    # TRT-LLM's RotaryScalingType.from_string does not know "default": no scaling is None
    return base, (params if kind != "default" else None)


def _config(hf: Any, spec: _Spec) -> dict[str, Any]:
    """config.json for LlamaForCausalLM (PretrainedConfig + LLaMAConfig keys)."""
    base, scaling = _rope(hf)
    dtype_name = next(k for k, v in DTYPES.items() if v == spec.dtype)
    return {
        "architecture": "LlamaForCausalLM",
        "dtype": dtype_name,
        "logits_dtype": "float32",
        "vocab_size": hf.vocab_size,
        "max_position_embeddings": hf.max_position_embeddings,
        "hidden_size": hf.hidden_size,
        "num_hidden_layers": hf.num_hidden_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_size": spec.head_dim,
        "hidden_act": hf.hidden_act,
        "intermediate_size": hf.intermediate_size,
        "norm_epsilon": hf.rms_norm_eps,
        "position_embedding_type": "rope_gpt_neox",
        "rotary_base": base,
        "rotary_scaling": scaling,
        "attn_bias": bool(getattr(hf, "attention_bias", False)),
        "mlp_bias": False,
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "tie_word_embeddings": bool(getattr(hf, "tie_word_embeddings", False)),
        "mapping": {"world_size": spec.tp * spec.pp, "tp_size": spec.tp, "pp_size": spec.pp},
        "quantization": {  # QuantConfig fields; exclude_modules None = TRT-LLM's defaults
            "quant_algo": spec.quant_algo,
            "kv_cache_quant_algo": spec.kv_quant,
            "group_size": 128,
            "smoothquant_val": spec.smoothquant_alpha,
            "clamp_val": None,
            "has_zero_point": False,
            "pre_quant_scale": False,
            "exclude_modules": None,
        },
    }


def _write_manifest(out: Path, config: dict, source: str, digest: str | None) -> None:
    """specdeploy's own record; trtllm-build reads only config.json and rank*.safetensors."""
    files = {p.name: _sha256(p) for p in sorted(out.glob("rank*.safetensors"))}
    manifest = {
        "kind": "trtllm-checkpoint (input to trtllm-build; not an engine)",
        "specdeploy_version": __version__,
        "source": source,
        "source_sha256": digest,
        "architecture": config["architecture"],
        "dtype": config["dtype"],
        "quantization": config["quantization"],
        "mapping": config["mapping"],
        "files_sha256": files,
        "upstream_format": "NVIDIA/TensorRT-LLM docs/source/architecture/checkpoint.md",
    }
    (out / "specdeploy_manifest.json").write_text(json.dumps(manifest, indent=2))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- calibration

def _calibration(model: nn.Module, spec: _Spec, act_amax: Mapping[str, float | Tensor] | None,
                 token_ids: Tensor | None) -> _Calibration | None:
    needs_x = spec.quant_algo in ("FP8", "W8A8_SQ_PER_CHANNEL")
    needs_y = spec.kv_quant == "INT8"
    if not (needs_x or needs_y or (spec.kv_quant == "FP8" and token_ids is not None)):
        return None
    if token_ids is not None:
        return _run_calibration(model, token_ids)
    if needs_y:
        raise SpecDeployError("kv_cache_quant_algo='INT8' needs calib_token_ids ([batch, seq] token ids) "
                              "to measure the q/k/v output ranges")
    if act_amax is None:
        raise SpecDeployError(f"quant_algo={spec.quant_algo!r} needs activation ranges: pass act_amax "
                              "(HF Linear name -> max |input|) or calib_token_ids ([batch, seq] token ids)")
    calib = _Calibration()
    for name, value in act_amax.items():
        calib.x[name] = torch.as_tensor(value, dtype=torch.float32).reshape(-1)
    return calib


@torch.no_grad()
def _run_calibration(model: nn.Module, token_ids: Tensor) -> _Calibration:
    """One forward pass over token_ids ([batch, seq]) recording |input| per channel and |output| max."""
    if token_ids.dim() != 2 or token_ids.numel() == 0:
        raise SpecDeployError("calib_token_ids must be a non-empty [batch, seq] tensor of token ids")
    calib = _Calibration()

    def hook(name: str, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1]).abs().amax(dim=0)  # [in]
        calib.x[name] = torch.maximum(calib.x[name], x) if name in calib.x else x
        calib.y[name] = max(calib.y.get(name, 0.0), float(output.detach().abs().max()))

    handles = [m.register_forward_hook(lambda mod, i, o, n=n: hook(n, mod, i, o))
               for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    try:
        model(input_ids=token_ids.long())
    finally:
        for h in handles:
            h.remove()
    return calib


# ----------------------------------------------------------------------------- quantizers

def _float(w: Tensor, b: Tensor | None, spec: _Spec) -> _Linear:
    return _Linear(w.to(spec.dtype), None if b is None else b.to(spec.dtype))


def _fp8_group(ws: list[Tensor], bs: list[Tensor | None], x_amax: Tensor, spec: _Spec) -> list[_Linear]:
    """FP8 per-tensor: one weights_scaling_factor shared by the group (fused qkv), amax/448."""
    w_scale = max(float(w.detach().float().abs().max()) for w in ws) / FP8_MAX
    w_scale = max(w_scale, 1e-12)
    act = torch.tensor([max(float(x_amax.max()), 1e-12) / FP8_MAX], dtype=torch.float32)  # [1]
    out = []
    for w, b in zip(ws, bs):
        q = (w.detach().float() / w_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)  # [out, in]
        out.append(_Linear(q, None if b is None else b.to(spec.dtype), scalars={
            "weights_scaling_factor": torch.tensor([w_scale], dtype=torch.float32),
            "activation_scaling_factor": act}))
    return out


def _sq_group(ws: list[Tensor], bs: list[Tensor | None], x_amax: Tensor, spec: _Spec) -> list[_Linear]:
    """SmoothQuant W8A8 per-channel weights, per-tensor static activations (Int8SmoothQuantLinear).

    s = x_amax^a / w_amax^(1-a) per input channel (convert_utils.smooth_gemm); W' = W * s,
    prequant_scaling_factor = 1/s; weights_scaling_factor = max|W'| per row / 127;
    activation_scaling_factor = max(x_amax / s) / 127.
    """
    a = spec.smoothquant_alpha
    w_amax = torch.stack([w.detach().float().abs().amax(dim=0) for w in ws]).amax(dim=0).clamp(min=1e-5)  # [in]
    s = (x_amax.float().clamp(min=1e-5).pow(a) / w_amax.pow(1 - a)).clamp(min=1e-5)  # [in]
    prequant = (1.0 / s).to(spec.dtype)  # [in], stored in the model dtype
    s = 1.0 / prequant.float()  # smooth the weights with exactly what the engine multiplies by
    act = torch.tensor([float((x_amax.float() / s).max()) / INT8_MAX], dtype=torch.float32).clamp(min=1e-12)
    out = []
    for w, b in zip(ws, bs):
        smoothed = w.detach().float() * s[None, :]  # [out, in]
        w_scale = (smoothed.abs().amax(dim=1) / INT8_MAX).clamp(min=1e-12)  # [out]
        q = torch.round(smoothed / w_scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
        out.append(_Linear(q, None if b is None else b.to(spec.dtype),
                           per_out={"weights_scaling_factor": w_scale},
                           per_in={"prequant_scaling_factor": prequant},
                           scalars={"activation_scaling_factor": act}))
    return out


def _group(ws: list[Tensor], bs: list[Tensor | None], x_name: str, spec: _Spec,
           calib: _Calibration | None) -> list[_Linear]:
    """Linears that share one input (q/k/v; gate/up), quantized as spec.quant_algo says."""
    if spec.quant_algo in (None, "W8A16"):
        return [_float(w, b, spec) for w, b in zip(ws, bs)]
    if calib is None or x_name not in calib.x:
        raise SpecDeployError(f"no activation range for {x_name} (act_amax or calib_token_ids must cover it)")
    x_amax = calib.x[x_name].float()
    if x_amax.numel() == 1:
        x_amax = x_amax.expand(ws[0].shape[1]).clone()
    if x_amax.numel() != ws[0].shape[1]:
        raise SpecDeployError(f"act_amax[{x_name!r}] has {x_amax.numel()} values, expected 1 or {ws[0].shape[1]}")
    return (_fp8_group if spec.quant_algo == "FP8" else _sq_group)(ws, bs, x_amax, spec)


# ----------------------------------------------------------------------------- tensor parallel

def _chunk(t: Tensor, tp: int, rank: int, dim: int = 0) -> Tensor:
    """convert_utils.split: torch.chunk along dim."""
    return t if tp == 1 else torch.chunk(t, tp, dim=dim)[rank]


def _column(lin: _Linear, tp: int, rank: int) -> _Linear:
    return _Linear(_chunk(lin.weight, tp, rank, 0), None if lin.bias is None else _chunk(lin.bias, tp, rank),
                   {k: _chunk(v, tp, rank) for k, v in lin.per_out.items()}, dict(lin.per_in), dict(lin.scalars))


def _row(lin: _Linear, tp: int, rank: int) -> _Linear:
    """Row-parallel: input dim split; bias and per-output scales stay whole on every rank."""
    return _Linear(_chunk(lin.weight, tp, rank, 1), lin.bias, dict(lin.per_out),
                   {k: _chunk(v, tp, rank) for k, v in lin.per_in.items()}, dict(lin.scalars))


def _dup_heads(lin: _Linear, num_heads: int, tp: int) -> _Linear:
    """convert_utils.dup_kv_weight: repeat each kv head tp/num_heads times (h0, h0, h1, h1, ...)."""
    reps = tp // num_heads

    def dup(t: Tensor) -> Tensor:
        return t.reshape(num_heads, -1, *t.shape[1:]).repeat_interleave(reps, dim=0).reshape(-1, *t.shape[1:])

    return _Linear(dup(lin.weight), None if lin.bias is None else dup(lin.bias),
                   {k: dup(v) for k, v in lin.per_out.items()}, dict(lin.per_in), dict(lin.scalars))


def _fused_qkv(q: _Linear, k: _Linear, v: _Linear, spec: _Spec, rank: int) -> _Linear:
    """Split q, k and v for this rank, then concatenate: [(heads + 2*kv_heads)/tp * head_dim, hidden]."""
    if spec.num_kv_heads < spec.tp:
        k, v = _dup_heads(k, spec.num_kv_heads, spec.tp), _dup_heads(v, spec.num_kv_heads, spec.tp)
    parts = [_column(x, spec.tp, rank) for x in (q, k, v)]
    cat = lambda ts: torch.cat(ts, dim=0)  # noqa: E731
    bias = None if parts[0].bias is None else cat([p.bias for p in parts])
    per_out = {key: cat([p.per_out[key] for p in parts]) for key in parts[0].per_out}
    return _Linear(cat([p.weight for p in parts]), bias, per_out, parts[0].per_in, parts[0].scalars)


def _emit(prefix: str, lin: _Linear, out: dict[str, Tensor]) -> None:
    out[prefix + "weight"] = lin.weight
    if lin.bias is not None:
        out[prefix + "bias"] = lin.bias
    for name, t in {**lin.per_out, **lin.per_in, **lin.scalars}.items():
        out[prefix + name] = t


def _pad_vocab(w: Tensor, tp: int) -> Tensor:
    """_utils.pad_vocab_size: zero rows up to a multiple of tp. w: [vocab, hidden]."""
    pad = -w.shape[0] % tp
    return torch.nn.functional.pad(w, (0, 0, 0, pad)) if pad else w


def _pp_layers(num_layers: int, pp: int, pp_rank: int) -> list[int]:
    """mapping.Mapping.pp_layers: the first num_layers % pp ranks get one extra layer."""
    return torch.tensor_split(torch.arange(num_layers), pp)[pp_rank].tolist()


# ----------------------------------------------------------------------------- decoder layers

def _decoder_layer(lookup: Any, hf_prefix: str, tllm_prefix: str, spec: _Spec, calib: _Calibration | None,
                   tp_rank: int, out: dict[str, Tensor], *, input_layernorm: bool = True) -> None:
    """One Llama decoder layer. lookup(name) returns the HF tensor or None; hf_prefix ends with '.'."""

    def get(name: str) -> Tensor:
        t = lookup(name)
        if t is None and not name.endswith(".bias"):
            raise SpecDeployError(f"missing weight {name!r}")
        return t

    attn, mlp = hf_prefix + "self_attn.", hf_prefix + "mlp."
    names = [attn + p for p in ("q_proj", "k_proj", "v_proj")]
    q, k, v = _group([get(n + ".weight") for n in names], [get(n + ".bias") for n in names], names[0], spec, calib)
    _emit(tllm_prefix + "attention.qkv.", _fused_qkv(q, k, v, spec, tp_rank), out)
    (dense,) = _group([get(attn + "o_proj.weight")], [get(attn + "o_proj.bias")], attn + "o_proj", spec, calib)
    _emit(tllm_prefix + "attention.dense.", _row(dense, spec.tp, tp_rank), out)
    fc, gate = _group([get(mlp + "gate_proj.weight"), get(mlp + "up_proj.weight")], [None, None],
                      mlp + "gate_proj", spec, calib)
    _emit(tllm_prefix + "mlp.fc.", _column(fc, spec.tp, tp_rank), out)  # fc = gate_proj (activated)
    _emit(tllm_prefix + "mlp.gate.", _column(gate, spec.tp, tp_rank), out)  # gate = up_proj
    (proj,) = _group([get(mlp + "down_proj.weight")], [None], mlp + "down_proj", spec, calib)
    _emit(tllm_prefix + "mlp.proj.", _row(proj, spec.tp, tp_rank), out)
    if input_layernorm:
        out[tllm_prefix + "input_layernorm.weight"] = get(hf_prefix + "input_layernorm.weight").to(spec.dtype)
    out[tllm_prefix + "post_layernorm.weight"] = get(hf_prefix + "post_attention_layernorm.weight").to(spec.dtype)
    if spec.kv_quant is not None:
        out[tllm_prefix + "attention.kv_cache_scaling_factor"] = _kv_scale(names, spec, calib)


def _kv_scale(qkv_names: list[str], spec: _Spec, calib: _Calibration | None) -> Tensor:
    """INT8: max(q, k, v output amax)/127 (llama/convert.py). FP8: max(k, v output amax)/448 when
    calibrated, else 1.0 as the upstream converter writes."""
    if spec.kv_quant == "INT8":
        return torch.tensor([max(calib.y[n] for n in qkv_names) / INT8_MAX], dtype=torch.float32)
    if calib is None or not all(n in calib.y for n in qkv_names[1:]):
        return torch.tensor([1.0], dtype=torch.float32)
    return torch.tensor([max(calib.y[n] for n in qkv_names[1:]) / FP8_MAX], dtype=torch.float32)


def _rank_tensors(model: nn.Module, spec: _Spec, calib: _Calibration | None, rank: int) -> dict[str, Tensor]:
    """All base-model tensors of one rank (rank = pp_rank * tp + tp_rank)."""
    tp_rank, pp_rank = rank % spec.tp, rank // spec.tp
    params = dict(model.named_parameters())
    get = params.get
    hf = model.config
    out: dict[str, Tensor] = {}
    for local, layer in enumerate(_pp_layers(hf.num_hidden_layers, spec.pp, pp_rank)):
        _decoder_layer(get, f"model.layers.{layer}.", f"transformer.layers.{local}.", spec, calib, tp_rank, out)
    if pp_rank == 0:
        out["transformer.vocab_embedding.weight"] = model.get_input_embeddings().weight.to(spec.dtype)
    if pp_rank == spec.pp - 1:
        lm_head = model.get_output_embeddings().weight  # the embedding itself when tied
        out["lm_head.weight"] = _chunk(_pad_vocab(lm_head.to(spec.dtype), spec.tp), spec.tp, tp_rank)
        out["transformer.ln_f.weight"] = get("model.norm.weight").to(spec.dtype)
    return _owned(out)


def _owned(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous copies that share no storage (safetensors refuses shared tensors)."""
    return {k: v.detach().contiguous().clone() for k, v in tensors.items()}


# ----------------------------------------------------------------------------- Medusa

def _medusa_shape(heads: Mapping[str, Tensor]) -> tuple[int, int]:
    """(num_medusa_heads, num_medusa_layers) from `{h}.{l}.linear.weight` keys."""
    try:
        layers = [tuple(map(int, k.split(".")[:2])) for k in heads if k.endswith(".linear.weight")]
    except ValueError as e:
        raise SpecDeployError(f"medusa: keys must look like '{{h}}.{{l}}.linear.weight' ({e})") from e
    if not layers:
        raise SpecDeployError("medusa: no '{h}.{l}.linear.weight' tensors found")
    num_heads = max(h for h, _ in layers) + 1
    num_layers = max(layer for _, layer in layers) + 1
    if len(set(layers)) != num_heads * num_layers:
        raise SpecDeployError(f"medusa: expected {num_heads} heads x {num_layers} layers of linear weights")
    return num_heads, num_layers


def _medusa_config(heads: Mapping[str, Tensor], max_draft_len: int) -> dict[str, Any]:
    num_heads, num_layers = _medusa_shape(heads)
    return {"architecture": "MedusaForCausalLM", "num_medusa_heads": num_heads,
            "num_medusa_layers": num_layers, "max_draft_len": max_draft_len}


def _medusa_tensors(heads: Mapping[str, Tensor], config: dict, spec: _Spec, rank: int) -> dict[str, Tensor]:
    """medusa/weight.py load_medusa_hf: linear weight, bias and lm_head all split on dim 0."""
    num_heads, num_layers = config["num_medusa_heads"], config["num_medusa_layers"]
    out: dict[str, Tensor] = {}
    for h in range(num_heads):
        for layer in range(num_layers):
            prefix = f"medusa_heads.{h}.medusa_layers.{layer}.linear."
            out[prefix + "weight"] = _chunk(heads[f"{h}.{layer}.linear.weight"].to(spec.dtype), spec.tp, rank)
            out[prefix + "bias"] = _chunk(heads[f"{h}.{layer}.linear.bias"].to(spec.dtype), spec.tp, rank)
        lm = heads.get(f"{h}.{num_layers}.weight", heads.get(f"{h}.lm_head.weight"))
        if lm is None:
            raise SpecDeployError(f"medusa: head {h} has no '{h}.{num_layers}.weight' or '{h}.lm_head.weight'")
        # upstream splits without padding; padding matches the head's vocab_size_padded parameter
        out[f"medusa_heads.{h}.lm_head.weight"] = _chunk(_pad_vocab(lm.to(spec.dtype), spec.tp), spec.tp, rank)
    return _owned(out)


# ----------------------------------------------------------------------------- EAGLE

def _eagle_layers(eagle: EagleDraft) -> int:
    ids = {int(m.group(1)) for k in eagle.state_dict if (m := re.match(r"^layers\.(\d+)\.", k))}
    needed = ("fc.weight", "fc.bias", "layers.0.mlp.up_proj.weight")
    if not ids or any(k not in eagle.state_dict for k in needed):
        raise SpecDeployError(f"eagle: state_dict needs {needed} and 'layers.{{l}}.*' tensors")
    return max(ids) + 1


def _eagle_config(hf: Any, spec: _Spec, eagle: EagleDraft, max_draft_len: int) -> dict[str, Any]:
    """eagle/config.py EagleConfig.from_hugging_face: the draft net's own LLaMA config."""
    sd = eagle.state_dict
    base, scaling = _rope(hf)
    heads = eagle.num_attention_heads or spec.num_heads
    kv_heads = eagle.num_key_value_heads or spec.num_kv_heads
    inter = sd["layers.0.mlp.up_proj.weight"].shape[0]
    if heads % spec.tp or inter % spec.tp or (kv_heads % spec.tp and spec.tp % kv_heads):
        raise SpecDeployError(f"eagle: tp_size={spec.tp} does not fit {heads} heads / {kv_heads} kv heads / "
                              f"intermediate_size {inter}")
    net = {
        "architecture": "LlamaForCausalLM", "dtype": next(k for k, v in DTYPES.items() if v == spec.dtype),
        "logits_dtype": "float32", "num_hidden_layers": _eagle_layers(eagle), "num_attention_heads": heads,
        "hidden_size": hf.hidden_size, "intermediate_size": inter,
        "num_key_value_heads": kv_heads, "vocab_size": hf.vocab_size, "position_embedding_type": "rope_gpt_neox",
        "max_position_embeddings": hf.max_position_embeddings, "hidden_act": hf.hidden_act,
        "rotary_base": base, "rotary_scaling": scaling, "norm_epsilon": hf.rms_norm_eps,
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
        "mapping": {"world_size": spec.tp, "tp_size": spec.tp, "pp_size": 1},
        "use_parallel_embedding": False, "embedding_sharding_dim": 0,
        "head_dim": spec.head_dim, "head_size": spec.head_dim,
    }
    return {"architecture": "EagleForCausalLM", "num_eagle_layers": eagle.num_eagle_layers,
            "max_non_leaves_per_layer": eagle.max_non_leaves_per_layer, "max_draft_len": max_draft_len,
            "eagle_net_config": net}


def _eagle_tensors(model: nn.Module, eagle: EagleDraft, config: dict, spec: _Spec, rank: int) -> dict[str, Tensor]:
    """eagle/weight.py load_eagle_hf: the same EagleNet weights copied for every eagle_nets.{i}."""
    net_cfg = config["eagle_net_config"]
    net_spec = _Spec(dtype=spec.dtype, tp=spec.tp, pp=1, quant_algo=None, kv_quant=None,
                     num_heads=net_cfg["num_attention_heads"], num_kv_heads=net_cfg["num_key_value_heads"],
                     head_dim=spec.head_dim, vocab_size=spec.vocab_size)
    sd = eagle.state_dict
    one: dict[str, Tensor] = {}
    for layer in range(net_cfg["num_hidden_layers"]):
        # EagleNet layer 0 has no input_layernorm (use_input_layernorm_in_first_layer=False)
        _decoder_layer(sd.get, f"layers.{layer}.", f"drafter.layers.{layer}.", net_spec, None, rank, one,
                       input_layernorm=layer > 0)
    fc = _Linear(sd["fc.weight"].to(spec.dtype), sd["fc.bias"].to(spec.dtype))  # [hidden, 2*hidden]
    _emit("drafter.fc.", _column(fc, spec.tp, rank), one)
    embed = sd.get("embed_tokens.weight", model.get_input_embeddings().weight)
    one["drafter.vocab_embedding.weight"] = embed.to(spec.dtype)
    lm_head = model.get_output_embeddings().weight
    one["lm_head.weight"] = _chunk(_pad_vocab(lm_head.to(spec.dtype), spec.tp), spec.tp, rank)
    return _owned({f"eagle_nets.{i}.{k}": v for i in range(eagle.num_eagle_layers) for k, v in one.items()})


# ----------------------------------------------------------------------------- CLI

def trtllm_export_cli(args: Any) -> int:
    """`specdeploy export --format trtllm --target PATH --out DIR [--tp-size] [--pp-size] [--quant]`.

    Reads args.target, args.out and, when present, tp_size, pp_size, quant (none|fp8|int8|
    int8_sq|int8_wo or a QuantAlgo name), kv_cache_quant (fp8|int8), dtype. FP8 and int8 (SQ)
    calibrate on CALIBRATION_TEXT tokenized with the target's tokenizer. Returns exit status 0.
    """
    from specdeploy.models.loader import load_model

    quant = _quant_name(getattr(args, "quant", None))
    kv = getattr(args, "kv_cache_quant", None)
    kv = kv.upper() if kv and kv.lower() != "none" else None
    model: str | nn.Module = args.target
    token_ids, digest = None, None
    if quant in ("FP8", "W8A8_SQ_PER_CHANNEL") or kv is not None:  # calibrate: needs the tokenizer
        loaded = load_model(args.target)
        model, digest = loaded.model, loaded.source_hash
        token_ids = loaded.tokenizer(CALIBRATION_TEXT, return_tensors="pt").input_ids  # [1, seq]
    out = export_trtllm_checkpoint(
        model, args.out, dtype=getattr(args, "dtype", None) or "bfloat16",
        tp_size=getattr(args, "tp_size", None) or 1, pp_size=getattr(args, "pp_size", None) or 1,
        quant_algo=quant, kv_cache_quant_algo=kv, calib_token_ids=token_ids, source_hash=digest,
        source_name=str(args.target))
    print(f"TensorRT-LLM checkpoint (not an engine) written to {out}; build it with trtllm-build")
    return 0


def add_export_arguments(parser: Any) -> None:
    """The trtllm-specific flags of `specdeploy export` (skip any the main CLI already defines)."""
    parser.add_argument("--tp-size", type=int, default=1, help="tensor-parallel ranks")
    parser.add_argument("--pp-size", type=int, default=1, help="pipeline-parallel ranks")
    parser.add_argument("--kv-cache-quant", choices=["none", "fp8", "int8"], default="none")


def _quant_name(value: str | None) -> str | None:
    if value is None:
        return None
    if value in QUANT_ALGOS:
        return value
    if value.lower() in QUANT_ALIASES:
        return QUANT_ALIASES[value.lower()]
    raise SpecDeployError(f"unknown --quant {value!r}: use none, fp8, int8 (SmoothQuant W8A8) or int8_wo (W8A16)")
