"""GPU memory estimate for a Llama-family target (and optional draft), computed offline.

For each model: weights + KV cache + activations, in bytes; then the process's overheads.

- weights: embedding, per layer q/k/v/o (GQA: k and v have num_key_value_heads * head_dim
  rows), gate/up/down, two RMSNorms, the final norm, and lm_head unless tied. Linear weights
  use `dtype`; with an 8- or 4-bit dtype the embedding, lm_head and norms stay 16-bit (as
  TensorRT-LLM's default quantization excludes lm_head and vocab_embedding). Scales and
  biases are ignored (< 0.1 %). A draft that is the target's own first layers (layerskip)
  adds no weights (`draft_shares_weights`).
- kv_cache: 2 (K and V) * layers * kv_heads * head_dim * context * batch * bytes(kv_dtype).
- activations: the working set of one decoder layer during the largest forward, `tokens` at
  once (residual + normed hidden, the q/k/v output, the gate and up outputs) in 16 bits
  (32 for float32), plus float32 logits: for the target, the k + 1 rows a verify step scores
  per sequence; for a draft, one row per sequence:
  tokens * (2*hidden + (heads + 2*kv_heads)*head_dim + 2*intermediate) * act_bytes
  + logits_rows * vocab * 4. `tokens` is the engine's `max_num_tokens` (a prefill chunk or
  batch * (k + 1), as TensorRT-LLM's max_num_tokens or vLLM's max_num_batched_tokens); unset,
  batch * context: every sequence prefilled whole in one forward, the worst case.
- overhead: one cuBLAS workspace per CUDA stream that runs GEMMs (torch allocates it through
  its caching allocator, per (handle, stream): 32 MiB on Hopper and Blackwell, 8 MiB + 128 KiB
  before; aten/src/ATen/cuda/CublasHandlePool.cpp), `streams` of them (default 2: the default
  stream and one graph-capture stream per engine, as cuda_runner.py uses).

Not included: the CUDA context and loaded kernel images (a few hundred MB per process, outside
torch's allocator: nvidia-smi shows them, torch.cuda.memory_allocated does not) and the
allocator's cached-but-free blocks. results/estimate_vs_measured.md compares this estimate
with the peaks measured on an H100 (`python -m specdeploy.bench.memory_check`).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

from specdeploy.errors import SpecDeployError

WORKSPACE_BYTES = 4096 * 8 * 1024  # cuBLAS workspace per stream, torch's default on Hopper (CUBLAS_WORKSPACE_CONFIG :4096:8)
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
class EngineShape:
    """How the serving engine runs: what the activation and overhead terms depend on."""

    k: int = 0  # draft tokens verified per step: the target scores batch * (k + 1) rows
    max_num_tokens: int | None = None  # most tokens in one target forward; None: batch * context
    draft_max_num_tokens: int | None = None  # the same for the draft; None: as the target
    streams: int = 2  # CUDA streams running GEMMs, one cuBLAS workspace each
    workspace_bytes: int = WORKSPACE_BYTES

    @property
    def overhead_bytes(self) -> int:
        return self.streams * self.workspace_bytes


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
    engine: EngineShape = EngineShape()

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
    def overhead_bytes(self) -> int:
        """cuBLAS workspaces (see the module docstring)."""
        return self.engine.overhead_bytes

    @property
    def total(self) -> int:
        return sum(m.total for m in self._models()) + self.overhead_bytes

    def rows(self) -> list[tuple[str, int, int, int, int]]:
        """(name, weights, kv_cache, activations, total) per model, the overhead, then a 'total' row."""
        rows = [(m.name, m.weights_bytes, m.kv_cache_bytes, m.activation_bytes, m.total) for m in self._models()]
        if self.overhead_bytes:
            rows.append((f"cuBLAS workspaces ({self.engine.streams})", 0, 0, 0, self.overhead_bytes))
        if len(rows) > 1:
            rows.append(("total", self.weights_bytes, self.kv_cache_bytes, self.activation_bytes, self.total))
        return rows

    def table(self) -> Any:
        """A rich Table of rows() in GB (1e9 bytes)."""
        from rich.table import Table

        title = (f"GPU memory, {self.dtype} weights, {self.kv_dtype} KV, batch {self.batch} x context {self.context}"
                 f"{f', k {self.engine.k}' if self.engine.k else ''} (CUDA context not included)")
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
        out["overhead_bytes"] = self.overhead_bytes
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


def model_memory(name: str, arch: Arch, *, dtype: str, kv_dtype: str, batch: int, context: int, tokens: int,
                 logits_rows: int, shares_weights: bool = False) -> ModelMemory:
    """Weights, KV cache and activation bytes of one model (formulas in the module docstring);
    tokens: the most tokens of one forward; logits_rows: float32 logit rows it returns."""
    other_bytes = BYTES[dtype] if dtype in ("float32", "float16", "bfloat16") else 2.0
    act_bytes = 4 if dtype == "float32" else 2
    weights = 0 if shares_weights else arch.linear_params * BYTES[dtype] + arch.other_params * other_bytes
    kv = 2 * arch.layers * arch.kv_heads * arch.head_dim * context * batch * BYTES[kv_dtype]
    per_token = 2 * arch.hidden + (arch.heads + 2 * arch.kv_heads) * arch.head_dim + 2 * arch.intermediate
    activations = tokens * per_token * act_bytes + logits_rows * arch.vocab * 4
    return ModelMemory(name, int(weights), int(kv), int(activations))


def estimate_memory(
    config: Mapping[str, Any] | Any,
    *,
    dtype: str = "bfloat16",
    batch: int = 1,
    context: int = 4096,
    draft_config: Mapping[str, Any] | Any | None = None,
    kv_dtype: str | None = None,
    engine: EngineShape = EngineShape(),
    draft_shares_weights: bool = False,
) -> MemoryEstimate:
    """Estimate GPU memory for serving `config` (and `draft_config`) at batch x context tokens,
    `engine.k` draft tokens verified per step; a layerskip draft shares the target's weights."""
    if dtype not in BYTES:
        raise SpecDeployError(f"dtype must be one of {sorted(BYTES)}, got {dtype!r}")
    kv_dtype = kv_dtype or (dtype if dtype in ("float32", "float16", "bfloat16") else "bfloat16")
    if kv_dtype not in KV_DTYPES:
        raise SpecDeployError(f"kv_dtype must be one of {KV_DTYPES}, got {kv_dtype!r}")
    if batch < 1 or context < 1:
        raise SpecDeployError("batch and context must be >= 1")
    if engine.k < 0 or engine.streams < 0 or any(n is not None and n < 1 for n in (engine.max_num_tokens, engine.draft_max_num_tokens)):
        raise SpecDeployError("k and streams must be >= 0, max_num_tokens >= 1")
    shape = {"dtype": dtype, "kv_dtype": kv_dtype, "batch": batch, "context": context}
    tokens = engine.max_num_tokens or batch * context
    target = model_memory("target", arch_of(config), **shape, tokens=tokens, logits_rows=batch * (engine.k + 1))
    draft = None
    if draft_config is not None:
        draft = model_memory("draft", arch_of(draft_config), **shape, tokens=engine.draft_max_num_tokens or tokens,
                             logits_rows=batch, shares_weights=draft_shares_weights)
    return MemoryEstimate(target=target, draft=draft, **shape, engine=engine)


def resolve_draft_config(draft: str, target: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """(config, shares the target's weights) of a --draft value: 'layerskip:N' (the target's first
    N layers) or anything `load_config` reads."""
    if draft.startswith("layerskip:"):
        try:
            n = int(draft.split(":", 1)[1])
        except ValueError as e:
            raise SpecDeployError(f"--draft {draft!r}: expected layerskip:N with an integer N") from e
        from specdeploy.models.layerskip import layerskip_layers

        if n < 1:  # layerskip_layers reads 0 as "the default"; here N is explicit
            raise SpecDeployError(f"--draft {draft!r}: layerskip needs at least 1 layer")
        try:
            layerskip_layers(int(target["num_hidden_layers"]), n)  # the runtime's own rule
        except SpecDeployError as e:
            raise SpecDeployError(f"--draft {draft!r}: {e}") from None
        return {**target, "num_hidden_layers": n}, True
    return load_config(draft), False


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
    """Add `estimate --config HF_CONFIG_OR_NAME [--draft ...] [--dtype] [--batch] [--context] [--k]
    [--max-num-tokens] [--streams] [--json]`."""
    p = subparsers.add_parser("estimate", help="estimate GPU memory for a target (and draft) offline")
    p.add_argument("--config", required=True, help=f"config.json, model dir, or one of {sorted(BUILTIN_CONFIGS)}")
    p.add_argument("--draft", default=None, help="draft model config (same forms as --config), or layerskip:N")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(BYTES))
    p.add_argument("--kv-dtype", default=None, choices=KV_DTYPES, help="KV cache dtype (default: dtype)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=4096, help="tokens per sequence (prompt + output)")
    p.add_argument("--k", type=int, default=EngineShape.k, help="draft tokens verified per step")
    p.add_argument("--max-num-tokens", type=int, default=None,
                   help="most tokens in one forward (prefill chunk); default batch * context")
    p.add_argument("--streams", type=int, default=EngineShape.streams, help="CUDA streams with a cuBLAS workspace")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=estimate_cli)
    return p


def estimate_cli(args: Any) -> int:
    """Run the estimate subcommand: print a rich table or JSON. Returns exit status 0."""
    config = load_config(args.config)
    draft, shared = resolve_draft_config(args.draft, config) if args.draft else (None, False)
    engine = EngineShape(k=args.k, max_num_tokens=args.max_num_tokens, streams=args.streams)
    est = estimate_memory(config, dtype=args.dtype, batch=args.batch, context=args.context, draft_config=draft,
                          kv_dtype=getattr(args, "kv_dtype", None), engine=engine, draft_shares_weights=shared)
    if args.json:
        print(json.dumps(est.to_dict(), indent=2))
    else:
        from rich.console import Console

        Console().print(est.table())
    return 0
