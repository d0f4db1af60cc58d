"""FP8 and INT8 quantization of a Llama-family model's linear layers, in two phases.

1. Offline: `calibrate(model, token_batches)` records activation ranges at the input of
   every decoder linear layer; `quantize(model, algo, stats)` returns a `QuantizedWeights`
   (a state_dict holding the quantized tensors and their scales, plus a scales summary).
2. Runtime: `quantized_model(config, state_dict, algo)` rebuilds the Hugging Face model
   with each of those layers replaced by a `QuantLinear` and loads the state_dict into it.
   The result is an ordinary model: it runs through `TorchRunner`.

Algorithms (`ALGOS`). Embeddings, norms and lm_head stay in floating point.
- "fp8"     FP8 E4M3 weights and activations, calibrated per-tensor scales:
            q = fp8(x / s), s = amax / 448. Kernel: torch._scaled_mm on CUDA sm89+,
            else the fallback (dequantize to the compute dtype, then a plain matmul).
- "int8"    W8A8 SmoothQuant: smoothing s_j = amax(X_j)^a / amax(W_j)^(1-a) migrates
            activation outliers into the weights (X / s) @ (W * s)^T == X @ W^T; the
            weights get per-output-channel scales. Activation scales (`act_scaling`):
            "static" = one calibrated per-tensor scale (SmoothQuant O3, TensorRT-LLM's
            W8A8_SQ_PER_CHANNEL), or "per-token" = amax of each token row at run time
            (O1, ..._PER_TOKEN); on SmolLM2 static scales follow the down_proj outliers
            (amax ~134 after smoothing) and lose greedy agreement, so "per-token" is the
            default and the calibrated static scale is still recorded. Kernel:
            torch._int_mm on CUDA, else the dequantized fallback. The smoothing vector is
            applied inside QuantLinear (not folded into the preceding RMSNorm), so q/k/v
            and gate/up each keep their own.
- "int8_wo" weight-only INT8 (W8A16): per-output-channel weight scales, activations in
            floating point; the CPU recipe.
`kernel_path(algo, device)` says which kernel runs; manifests record it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from specdeploy.errors import SpecDeployError

log = logging.getLogger(__name__)

ALGOS = ("none", "fp8", "int8", "int8_wo")
ACT_SCALING = ("per-token", "static")  # int8 activation scales
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite E4M3 value
INT8_MAX = 127.0  # symmetric range [-127, 127]
EPS = 1e-8


# ----------------------------------------------------------------------------- tensor math

def quantize_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """round(x / scale) clamped to [-127, 127], as int8; scale broadcasts against x."""
    return torch.clamp(torch.round(x / scale), -INT8_MAX, INT8_MAX).to(torch.int8)


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale clamped to the E4M3 range, as float8_e4m3fn (round to nearest even)."""
    return torch.clamp(x.float() / scale, -FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def per_channel_scale(weight: torch.Tensor, qmax: float) -> torch.Tensor:
    """[out] scales so that each weight row's amax maps to qmax."""
    return (weight.abs().amax(dim=1).float() / qmax).clamp(min=EPS)


def per_tensor_scale(amax: float | torch.Tensor, qmax: float) -> torch.Tensor:
    return torch.as_tensor(float(amax) / qmax, dtype=torch.float32).clamp(min=EPS)


def smoothing_factors(act_amax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel s_j = amax|X_j|^alpha / amax|W_:,j|^(1 - alpha).

    act_amax: [in] calibrated activation amax per channel; weight: [out, in]."""
    if not 0.0 <= alpha <= 1.0:
        raise SpecDeployError(f"SmoothQuant migration strength must be in [0, 1], got {alpha}")
    w_amax = weight.abs().amax(dim=0).float().clamp(min=1e-5)
    s = act_amax.float().clamp(min=1e-5).pow(alpha) / w_amax.pow(1.0 - alpha)
    return s.clamp(min=1e-5)


# ----------------------------------------------------------------------------- kernels

def kernel_path(algo: str, device: torch.device | str) -> str:
    """Which matmul QuantLinear runs for `algo` on `device`."""
    device = torch.device(device)
    cuda = device.type == "cuda" and torch.cuda.is_available()
    if algo == "fp8":
        if cuda and hasattr(torch, "_scaled_mm") and torch.cuda.get_device_capability(device) >= (8, 9):
            return "torch._scaled_mm"
        return "fp8-dequant-fallback"
    if algo == "int8":
        return "torch._int_mm" if cuda and hasattr(torch, "_int_mm") else "int8-dequant-fallback"
    if algo == "int8_wo":
        return "int8-weight-only-dequant"
    return "dense"


def model_kernels(model: nn.Module, device: torch.device | str | None = None) -> dict[str, str]:
    """{algorithm: kernel} of the QuantLinear layers of a model (on `device`, default its own)."""
    out = {}
    for m in model.modules():
        if isinstance(m, QuantLinear):
            out[m.algo] = m.kernel or kernel_path(m.algo, device or m.qweight.device)
    return out or {"none": "dense"}


def _pad_rows(x: torch.Tensor, multiple: int, minimum: int) -> tuple[torch.Tensor, int]:
    m = x.shape[0]
    rows = max(minimum, -(-m // multiple) * multiple)
    return (x if rows == m else torch.nn.functional.pad(x, (0, 0, 0, rows - m))), m


def scaled_mm_fp8(xq: torch.Tensor, wq: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """xq [m, in] fp8 @ wq[out, in]^T fp8 with per-tensor scales, on CUDA (sm89+).

    torch._scaled_mm(a, b, scale_a, scale_b, bias=None, scale_result=None, out_dtype=...):
    a row-major, b column-major (wq.t() is), scales float32; dims multiple of 16."""
    xq, m = _pad_rows(xq, 16, 16)
    out = torch._scaled_mm(xq, wq.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=out_dtype)
    out = out[0] if isinstance(out, tuple) else out  # torch < 2.5 returned (out, amax)
    return out[:m]


def int_mm_int8(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """xq [m, in] int8 @ wq[out, in]^T int8 -> int32, on CUDA.

    torch._int_mm(a, b): a [m, k] with m > 16, k and n multiples of 8; b = wq.t() (a
    column-major view, which cuBLAS takes without a copy)."""
    xq, m = _pad_rows(xq, 8, 24)
    return torch._int_mm(xq, wq.t())[:m]


class QuantLinear(nn.Module):
    """A drop-in nn.Linear over quantized weights (see the module docstring for `algo`).

    Buffers: qweight [out, in] (int8 or float8_e4m3fn); weight_scale [out] (int8*) or []
    (fp8); input_scale [] (fp8, int8: static activation scale); smooth [in] (int8: the
    SmoothQuant divisor of the activations); bias [out] or absent.
    """

    def __init__(self, in_features: int, out_features: int, algo: str, bias: bool = False,
                 act_scaling: str = "per-token") -> None:
        super().__init__()
        if algo not in ("fp8", "int8", "int8_wo"):
            raise SpecDeployError(f"QuantLinear: unknown algorithm {algo!r}")
        if act_scaling not in ACT_SCALING:
            raise SpecDeployError(f"activation scaling must be one of {ACT_SCALING}, got {act_scaling!r}")
        self.in_features, self.out_features, self.algo = in_features, out_features, algo
        self.act_scaling = act_scaling if algo == "int8" else "static"
        self.kernel: str | None = None  # None: kernel_path(algo, device); tests force the CUDA kernels on CPU
        wdtype = FP8_DTYPE if algo == "fp8" else torch.int8
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=wdtype))
        self.register_buffer("weight_scale", torch.ones(() if algo == "fp8" else (out_features,)))
        if algo in ("fp8", "int8"):
            self.register_buffer("input_scale", torch.ones(()))
        if algo == "int8":
            self.register_buffer("smooth", torch.ones(in_features))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features))
        else:
            self.bias = None

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, algo={self.algo}, act={self.act_scaling}"

    def _apply(self, fn, recurse=True):
        # keep quantized weights and scales in their dtypes under model.to(dtype): only the
        # device may change (a dtype cast would silently dequantize or corrupt them)
        keep = {n: b for n, b in self._buffers.items() if b is not None and n != "bias"}
        super()._apply(fn, recurse)
        for n, before in keep.items():
            after = self._buffers[n]
            if after.dtype != before.dtype:  # undo the cast from the original, exactly
                self._buffers[n] = before.to(after.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        out_dtype = x.dtype
        kernel = self.kernel or kernel_path(self.algo, x.device)
        if self.algo == "int8_wo":
            w = self.qweight.to(out_dtype) * self.weight_scale.to(out_dtype)[:, None]
            y = x2 @ w.t()
        elif self.algo == "fp8":
            xq = quantize_fp8(x2, self.input_scale)
            if kernel == "torch._scaled_mm" and self.in_features % 16 == 0 and self.out_features % 16 == 0:
                y = scaled_mm_fp8(xq, self.qweight, self.input_scale, self.weight_scale, out_dtype)
            else:  # fallback: dequantize both operands, multiply in the compute dtype
                w = self.qweight.to(out_dtype) * self.weight_scale.to(out_dtype)
                y = (xq.to(out_dtype) * self.input_scale.to(out_dtype)) @ w.t()
        else:  # int8 W8A8 SmoothQuant
            xs = x2.float() / self.smooth  # [m, in] smoothed activations
            if self.act_scaling == "per-token":
                x_scale = (xs.abs().amax(dim=1, keepdim=True) / INT8_MAX).clamp(min=EPS)  # [m, 1]
            else:
                x_scale = self.input_scale  # [] calibrated
            xq = quantize_int8(xs, x_scale)
            if kernel == "torch._int_mm" and self.in_features % 8 == 0 and self.out_features % 8 == 0:
                acc = int_mm_int8(xq, self.qweight).float()  # [m, out] int32 -> exact in fp32 up to 2^24
            else:
                acc = xq.float() @ self.qweight.float().t()
            y = (acc * x_scale * self.weight_scale[None, :]).to(out_dtype)
        if self.bias is not None:
            y = y + self.bias.to(out_dtype)
        return y.reshape(*shape[:-1], self.out_features)


# ----------------------------------------------------------------------------- phase 1: offline

@dataclass
class ActStats:
    """Activation ranges seen at one linear layer's input during calibration."""

    channel_amax: torch.Tensor  # [in] float32
    tokens: int = 0

    @property
    def amax(self) -> float:
        return float(self.channel_amax.max())


def quantizable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The decoder's nn.Linear layers (attention and MLP projections), by qualified name."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and ".layers." in f".{name}" and not name.endswith("lm_head")}


@torch.no_grad()
def calibrate(model: nn.Module, token_batches: list[torch.Tensor], progress: bool = True) -> dict[str, ActStats]:
    """Run the model over calibration token ids ([seq] or [1, seq] each), recording the
    per-channel amax of each quantizable linear layer's input."""
    from tqdm import tqdm

    linears = quantizable_linears(model)
    if not linears:
        raise SpecDeployError("no decoder linear layers found to calibrate (is this a Llama-family model?)")
    stats: dict[str, ActStats] = {}

    def hook(name: str):
        def record(_module, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).abs().float()
            amax = x.amax(dim=0)
            if name in stats:
                torch.maximum(stats[name].channel_amax, amax, out=stats[name].channel_amax)
            else:
                stats[name] = ActStats(amax.clone())
            stats[name].tokens += x.shape[0]
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    device = next(model.parameters()).device
    try:
        for ids in tqdm(token_batches, desc="calibrating", unit="text", disable=not progress):
            model(input_ids=ids.reshape(1, -1).to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: ActStats(s.channel_amax.cpu(), s.tokens) for n, s in stats.items()}


@dataclass
class QuantizedWeights:
    """Phase 1's output: what the engine directory stores."""

    algo: str
    state_dict: dict[str, torch.Tensor]  # full model state: QuantLinear buffers + float params
    modules: list[str]  # names of the layers replaced by QuantLinear
    summary: dict = field(default_factory=dict)  # scales summary for the manifest


def quantize_linear(linear: nn.Linear, algo: str, act: ActStats | None, smooth_alpha: float = 0.5) -> dict[str, torch.Tensor]:
    """The QuantLinear buffers for one nn.Linear."""
    w = linear.weight.detach().float()  # [out, in]
    out: dict[str, torch.Tensor] = {}
    if algo == "int8_wo":
        scale = per_channel_scale(w, INT8_MAX)
        out.update(qweight=quantize_int8(w, scale[:, None]), weight_scale=scale)
    elif algo == "int8":
        if act is None:
            raise SpecDeployError("int8 (SmoothQuant) needs calibration statistics")
        act_amax = act.channel_amax.to(w.device)
        s = smoothing_factors(act_amax, w, smooth_alpha)  # [in]
        ws = w * s[None, :]
        scale = per_channel_scale(ws, INT8_MAX)
        x_amax = float((act_amax / s).max())  # amax of the smoothed activations
        out.update(qweight=quantize_int8(ws, scale[:, None]), weight_scale=scale,
                   input_scale=per_tensor_scale(x_amax, INT8_MAX), smooth=s)
    elif algo == "fp8":
        if act is None:
            raise SpecDeployError("fp8 needs calibration statistics")
        scale = per_tensor_scale(w.abs().max(), FP8_MAX)
        out.update(qweight=quantize_fp8(w, scale), weight_scale=scale, input_scale=per_tensor_scale(act.amax, FP8_MAX))
    else:
        raise SpecDeployError(f"unknown quantization {algo!r}; use one of {', '.join(ALGOS)}")
    if linear.bias is not None:
        out["bias"] = linear.bias.detach().float()
    return out


def quantize(model: nn.Module, algo: str, stats: dict[str, ActStats] | None = None,
             smooth_alpha: float = 0.5, act_scaling: str = "per-token") -> QuantizedWeights:
    """Phase 1: quantize the decoder linears of `model` (left untouched)."""
    if algo not in ALGOS:
        raise SpecDeployError(f"unknown quantization {algo!r}; use one of {', '.join(ALGOS)}")
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if algo == "none":
        return QuantizedWeights(algo, state, [], {"algo": "none"})
    linears = quantizable_linears(model)
    input_scales, weight_scales, smooth = [], [], []
    for name, linear in linears.items():
        q = quantize_linear(linear, algo, (stats or {}).get(name), smooth_alpha)
        for key in ("weight", "bias"):
            state.pop(f"{name}.{key}", None)
        state.update({f"{name}.{k}": v for k, v in q.items()})
        if "input_scale" in q:
            input_scales.append(float(q["input_scale"]))
        weight_scales.append(q["weight_scale"].float().flatten())
        if "smooth" in q:
            smooth.append(q["smooth"])
    summary = {"algo": algo, "layers": len(linears), "weight_scale": _describe(torch.cat(weight_scales)),
               "granularity": {"weights": "per-tensor" if algo == "fp8" else "per-output-channel",
                               "activations": {"fp8": "per-tensor static",
                                               "int8": "per-tensor static" if act_scaling == "static" else "per-token dynamic"
                                               }.get(algo, "none")}}
    if input_scales:
        summary["input_scale"] = _describe(torch.tensor(input_scales))
    if algo == "int8":
        summary["activation_scaling"] = act_scaling
    if smooth:
        summary["smooth_alpha"] = smooth_alpha
        summary["smooth"] = _describe(torch.cat(smooth))
    if stats:
        summary["calibration_tokens"] = max(s.tokens for s in stats.values())
    return QuantizedWeights(algo, state, list(linears), summary)


def _describe(t: torch.Tensor) -> dict[str, float]:
    t = t.float()
    return {"min": float(t.min()), "max": float(t.max()), "mean": float(t.mean()), "count": int(t.numel())}


# ----------------------------------------------------------------------------- phase 2: runtime

def replace_linears(model: nn.Module, names: list[str], algo: str, act_scaling: str = "per-token") -> nn.Module:
    """Swap the named nn.Linear modules for empty QuantLinear shells (in place)."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        if not isinstance(old, nn.Linear):
            raise SpecDeployError(f"{name} is a {type(old).__name__}, not a linear layer")
        setattr(parent, child, QuantLinear(old.in_features, old.out_features, algo, bias=old.bias is not None,
                                              act_scaling=act_scaling))
    return model


def quantized_model(model: nn.Module, weights: QuantizedWeights | dict[str, torch.Tensor], algo: str,
                    modules: list[str], act_scaling: str = "per-token") -> nn.Module:
    """Phase 2: turn `model` (built from the same config, possibly on the meta device) into
    the quantized model in place and load the stored state into it (assigning the stored
    tensors, no copy). Tied embeddings are re-tied; rotary tables are rebuilt if on meta."""
    state = weights.state_dict if isinstance(weights, QuantizedWeights) else weights
    if algo != "none":
        replace_linears(model, modules, algo, act_scaling)
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (tied and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise SpecDeployError(f"engine weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if tied:
        model.lm_head.weight = model.get_input_embeddings().weight
    _rebuild_meta_buffers(model)
    return model.eval()


def rebuild_rotary(model: nn.Module, device: torch.device | str | None = None) -> None:
    """Recompute rotary tables (inv_freq, float32 as transformers makes them) on `device`:
    after model.to(bfloat16) they would otherwise be rounded to bf16."""
    for name, module in list(model.named_modules()):
        if hasattr(module, "inv_freq") and name:
            dev = device or module.inv_freq.device
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            with torch.device(dev):
                setattr(parent, child, type(module)(config=model.config))


def _rebuild_meta_buffers(model: nn.Module) -> None:
    """Non-persistent buffers (rotary inv_freq) are not stored: recompute them on CPU."""
    for name, module in list(model.named_modules()):
        if not any(b is not None and b.is_meta for b in module._buffers.values()):
            continue
        if not hasattr(module, "inv_freq"):
            raise SpecDeployError(f"{name}: buffers left uninitialised after loading the engine")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, type(module)(config=model.config))
