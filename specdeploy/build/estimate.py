"""GPU memory estimate for a Llama-family target (and optional draft), computed offline.

For each model: weights + KV cache + activations, in bytes.

- weights: embedding, per layer q/k/v/o (GQA: k and v have num_key_value_heads * head_dim
  rows), gate/up/down, two RMSNorms, the final norm, and lm_head unless tied. Linear weights
  use `dtype`; with an 8- or 4-bit dtype the embedding, lm_head and norms stay 16-bit (as
  TensorRT-LLM's default quantization excludes lm_head and vocab_embedding). Scales and
  biases are ignored (< 0.1 %).
- kv_cache: 2 (K and V) * layers * kv_heads * head_dim * context * batch * bytes(kv_dtype).
- activations: the working set of one decoder layer during a prefill of batch * context
  tokens (residual + normed hidden, the q/k/v output, the gate and up outputs) in 16 bits
  (32 for float32), plus float32 logits for the last token of each sequence:
  tokens * (2*hidden + (heads + 2*kv_heads)*head_dim + 2*intermediate) * act_bytes
  + batch * vocab * 4. An estimate of the peak, not a measurement: engines add workspace.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

from specdeploy.errors import SpecDeployError

BYTES = {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}
KV_DTYPES = ("float32", "float16", "bfloat16", "fp8", "int8")

# Published configs (Hugging Face config.json of each model), for offline planning.
BUILTIN_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-3-8b": {  # meta-llama/Meta-Llama-3-8B
        "model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
        "tie_word_embeddings": False, "max_position_embeddings": 8192, "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5, "hidden_act": "silu",
    },
    "llama-3-70b": {  # meta-llama/Meta-Llama-3-70B
        "model_type": "llama", "hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
        "num_key_value_heads": 8, "intermediate_size": 28672, "vocab_size": 128256,
        "tie_word_embeddings": False, "max_position_embeddings": 8192, "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5, "hidden_act": "silu",
    },
    "smollm2-135m": {  # HuggingFaceTB/SmolLM2-135M
        "model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152,
        "tie_word_embeddings": True, "max_position_embeddings": 8192, "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5, "hidden_act": "silu",
    },
}
ALIASES = {"smollm2": "smollm2-135m", "llama3-8b": "llama-3-8b", "llama3-70b": "llama-3-70b"}


@dataclass(frozen=True)
class Arch:
    """The numbers of a Llama-family config that memory depends on."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool

    @property
    def linear_params(self) -> int:
        attn = self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim + self.heads * self.head_dim * self.hidden
        return self.layers * (attn + 3 * self.hidden * self.intermediate)

    @property
    def other_params(self) -> int:
        """Embedding, lm_head (unless tied) and RMSNorm weights."""
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return embeddings + (2 * self.layers + 1) * self.hidden


@dataclass(frozen=True)
class ModelMemory:
    """Bytes one model needs on the GPU."""

    name: str
    weights_bytes: int
    kv_cache_bytes: int
    activation_bytes: int

    @property
    def total(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.activation_bytes


@dataclass(frozen=True)
class MemoryEstimate:
    """Target and optional draft memory for one deployment shape."""

    target: ModelMemory
    draft: ModelMemory | None
    dtype: str
    kv_dtype: str
    batch: int
    context: int

    def _models(self) -> list[ModelMemory]:
        return [self.target] + ([self.draft] if self.draft else [])

    @property
    def weights_bytes(self) -> int:
        return sum(m.weights_bytes for m in self._models())

    @property
    def kv_cache_bytes(self) -> int:
        return sum(m.kv_cache_bytes for m in self._models())

    @property
    def activation_bytes(self) -> int:
        return sum(m.activation_bytes for m in self._models())

    @property
    def total(self) -> int:
        return sum(m.total for m in self._models())

    def rows(self) -> list[tuple[str, int, int, int, int]]:
        """(name, weights, kv_cache, activations, total) per model, then a 'total' row."""
        rows = [(m.name, m.weights_bytes, m.kv_cache_bytes, m.activation_bytes, m.total) for m in self._models()]
        if self.draft:
            rows.append(("total", self.weights_bytes, self.kv_cache_bytes, self.activation_bytes, self.total))
        return rows

    def table(self) -> Any:
        """A rich Table of rows() in GB (1e9 bytes)."""
        from rich.table import Table

        title = f"GPU memory, {self.dtype} weights, {self.kv_dtype} KV, batch {self.batch} x context {self.context}"
        table = Table(title=title)
        for col in ("model", "weights", "KV cache", "activations", "total"):
            table.add_column(col, justify="left" if col == "model" else "right")
        for name, *values in self.rows():
            table.add_row(name, *(f"{v / 1e9:.2f} GB" for v in values))
        return table

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("target", "draft")}
        for key, m in (("target", self.target), ("draft", self.draft)):
            out[key] = None if m is None else {**asdict(m), "total": m.total}
        out["total"] = self.total
        return out


def arch_of(config: Mapping[str, Any] | Any) -> Arch:
    """Read an HF config (dict or transformers PretrainedConfig) or a TRT-LLM checkpoint config."""
    cfg = config if isinstance(config, Mapping) else config.to_dict()
    try:
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        head_dim = cfg.get("head_dim") or cfg.get("head_size") or hidden // heads
        return Arch(hidden=hidden, layers=int(cfg["num_hidden_layers"]), heads=heads,
                    kv_heads=int(cfg.get("num_key_value_heads") or heads), head_dim=int(head_dim),
                    intermediate=int(cfg["intermediate_size"]), vocab=int(cfg["vocab_size"]),
                    tied=bool(cfg.get("tie_word_embeddings", False)))
    except KeyError as e:
        raise SpecDeployError(f"config lacks {e.args[0]!r}: not a Llama-family config") from e


def model_memory(name: str, arch: Arch, *, dtype: str, kv_dtype: str, batch: int, context: int) -> ModelMemory:
    """Weights, KV cache and activation bytes of one model (formulas in the module docstring)."""
    other_bytes = BYTES[dtype] if dtype in ("float32", "float16", "bfloat16") else 2.0
    act_bytes = 4 if dtype == "float32" else 2
    weights = arch.linear_params * BYTES[dtype] + arch.other_params * other_bytes
    kv = 2 * arch.layers * arch.kv_heads * arch.head_dim * context * batch * BYTES[kv_dtype]
    per_token = 2 * arch.hidden + (arch.heads + 2 * arch.kv_heads) * arch.head_dim + 2 * arch.intermediate
    activations = batch * context * per_token * act_bytes + batch * arch.vocab * 4
    return ModelMemory(name, int(weights), int(kv), int(activations))


def estimate_memory(
    config: Mapping[str, Any] | Any,
    *,
    dtype: str = "bfloat16",
    batch: int = 1,
    context: int = 4096,
    draft_config: Mapping[str, Any] | Any | None = None,
    kv_dtype: str | None = None,
) -> MemoryEstimate:
    """Estimate GPU memory for serving `config` (and `draft_config`) at batch x context tokens."""
    if dtype not in BYTES:
        raise SpecDeployError(f"dtype must be one of {sorted(BYTES)}, got {dtype!r}")
    kv_dtype = kv_dtype or (dtype if dtype in ("float32", "float16", "bfloat16") else "bfloat16")
    if kv_dtype not in KV_DTYPES:
        raise SpecDeployError(f"kv_dtype must be one of {KV_DTYPES}, got {kv_dtype!r}")
    if batch < 1 or context < 1:
        raise SpecDeployError("batch and context must be >= 1")
    shape = {"dtype": dtype, "kv_dtype": kv_dtype, "batch": batch, "context": context}
    target = model_memory("target", arch_of(config), **shape)
    draft = model_memory("draft", arch_of(draft_config), **shape) if draft_config is not None else None
    return MemoryEstimate(target=target, draft=draft, **shape)


def load_config(name_or_path: str | Path) -> dict[str, Any]:
    """A config dict from a built-in name, a config.json file, or a model directory."""
    key = str(name_or_path).strip().lower().replace("_", "-")
    key = ALIASES.get(key, key)
    if key in BUILTIN_CONFIGS:
        return dict(BUILTIN_CONFIGS[key])
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise SpecDeployError(f"no config: {name_or_path!r} is neither a config.json, a model directory "
                              f"nor one of {sorted(BUILTIN_CONFIGS)}")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise SpecDeployError(f"{path}: not valid JSON ({e})") from e


def add_cli(subparsers: Any) -> Any:
    """Add `estimate --config HF_CONFIG_OR_NAME [--draft ...] [--dtype] [--batch] [--context] [--json]`."""
    p = subparsers.add_parser("estimate", help="estimate GPU memory for a target (and draft) offline")
    p.add_argument("--config", required=True, help=f"config.json, model dir, or one of {sorted(BUILTIN_CONFIGS)}")
    p.add_argument("--draft", default=None, help="draft model config (same forms as --config)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(BYTES))
    p.add_argument("--kv-dtype", default=None, choices=KV_DTYPES, help="KV cache dtype (default: dtype)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=4096, help="tokens per sequence (prompt + output)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=estimate_cli)
    return p


def estimate_cli(args: Any) -> int:
    """Run the estimate subcommand: print a rich table or JSON. Returns exit status 0."""
    est = estimate_memory(load_config(args.config), dtype=args.dtype, batch=args.batch, context=args.context,
                          draft_config=load_config(args.draft) if args.draft else None,
                          kv_dtype=getattr(args, "kv_dtype", None))
    if args.json:
        print(json.dumps(est.to_dict(), indent=2))
    else:
        from rich.console import Console

        Console().print(est.table())
    return 0
