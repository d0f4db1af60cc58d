"""ONNX export of a causal LM with KV-cache inputs and outputs: one decode step is one ORT call.

Graph I/O (L layers, KV heads H, head size D; every `batch`, `seq`, `past` axis is dynamic):

    inputs   input_ids                    [batch, seq] int64
             attention_mask               [batch, 1, seq, past + seq] int64: 1 where a token may
                                          attend (causal chains, padding and token trees alike)
             position_ids                 [batch, seq] int64 (a tree node: cache length + depth)
             past_key_values.{i}.key      [batch, H, past, D] float32, i < L   (past may be 0)
             past_key_values.{i}.value    [batch, H, past, D]
    outputs  logits                       [batch, seq, vocab] float32
             hidden_states                [batch, seq, hidden] last hidden state (after the final
                                          norm), what Medusa / EAGLE heads read (onnx_heads.py)
             present.{i}.key / .value     [batch, H, past + seq, D]

How: `KVCacheWrapper` takes the KV tensors explicitly, fills a transformers DynamicCache
with them, runs the model's own decoder and returns the cache's tensors; the dynamo
exporter (torch.export) traces that, so there is no copied modeling code. Tied input and
output embeddings are one parameter, so the graph stores them once. Weights over
`external_data_bytes` (2 GB, protobuf's limit) go to an external data file.

The 4D mask makes a token tree one call: node i attends to the cache and to its ancestors
(`OnnxRunner.forward(tokens, tree_parents)`); `causal_mask` builds the chain mask from a 2D
padding mask.

Each exported model is a directory with model.onnx, its tokenizer, its generation config
and manifest.json (kind "onnx": source and tokenizer hashes, opset, versions, I/O names and
the measured logit parity with torch on a prompt, a few decode steps and one token tree).
"""
from __future__ import annotations

import hashlib
import inspect
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache

from specdeploy.build.manifest import MANIFEST, Manifest, now, tokenizer_hash, versions, write_manifest
from specdeploy.errors import SpecDeployError
from specdeploy.models.loader import LoadedModel
from specdeploy.runtime.onnx_runner import causal_mask

log = logging.getLogger(__name__)

GRAPH_FILE = "model.onnx"
PARITY_PROMPT = "The quick brown fox jumps over the lazy dog. Speculative decoding is"


@dataclass(frozen=True)
class OnnxExportConfig:
    opset: int = 18
    external_data_bytes: int = 2 * 1024**3  # protobuf cannot hold a model over 2 GB
    parity_prompt: str = PARITY_PROMPT
    parity_decode_steps: int = 3  # greedy decode steps after the prompt, each one ORT call (then one tree)
    parity_tolerance: float = 1e-3  # max abs logit difference accepted in float32
    optimize: bool = True  # onnxscript graph optimizer (fewer nodes; ORT optimizes at load either way)


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """Input and output names of the graph, in order."""
    kv = [f"{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    inputs = ["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{n}" for n in kv]
    outputs = ["logits", "hidden_states"] + [f"present.{n}" for n in kv]
    return inputs, outputs


def kv_shape(config) -> tuple[int, int]:
    """(KV heads, head size) of a Llama-family config."""
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
    return int(getattr(config, "num_key_value_heads", None) or heads), int(head_dim)


class KVCacheWrapper(nn.Module):
    """A causal LM as a function of explicit KV tensors (the exported graph's signature)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.num_layers = int(model.config.num_hidden_layers)
        # transformers 5.x renames `past_key_values` to `cache` (the old name warns, then goes)
        params = inspect.signature(model.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past_key_values: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        # attention_mask: [batch, 1, seq, past + seq] int64, 1 = attend; transformers uses a 4D mask as given
        # past_key_values: 2 * L tensors [batch, H, past, D], key then value per layer
        cache = DynamicCache(config=self.model.config)
        for i in range(self.num_layers):
            cache.update(past_key_values[2 * i], past_key_values[2 * i + 1], i)
        out = self.model.model(input_ids=input_ids, attention_mask=attention_mask.bool(), position_ids=position_ids,
                               use_cache=True, **{self._cache_kw: cache})
        hidden = out.last_hidden_state  # [batch, seq, hidden]
        logits = self.model.lm_head(hidden).float()  # [batch, seq, vocab]
        present = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        return (logits, hidden, *present)


def _example_inputs(model: nn.Module, batch: int = 2, seq: int = 3, past: int = 4) -> tuple:
    """Inputs whose dynamic sizes are all >= 2 (torch.export specialises sizes 0 and 1)."""
    heads, head_dim = kv_shape(model.config)
    dtype = next(model.parameters()).dtype
    ids = torch.randint(0, int(model.config.vocab_size), (batch, seq))
    mask = torch.from_numpy(causal_mask(np.ones((batch, past + seq), dtype=np.int64), seq))
    pos = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    kv = [torch.zeros(batch, heads, past, head_dim, dtype=dtype) for _ in range(2 * int(model.config.num_hidden_layers))]
    return ids, mask, pos, kv


def _dynamic_shapes(num_layers: int) -> dict:
    from torch.export import Dim

    batch, seq, past, total = Dim("batch"), Dim("seq"), Dim("past"), Dim("total")
    return {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 2: seq, 3: total},
            "position_ids": {0: batch, 1: seq}, "past_key_values": [{0: batch, 2: past} for _ in range(2 * num_layers)]}


def param_bytes(model: nn.Module) -> int:
    """Bytes of the distinct parameters and buffers (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def save_graph(module: nn.Module, example: tuple, dynamic_shapes: dict, inputs: list[str], outputs: list[str],
               path: Path, config: OnnxExportConfig, nbytes: int) -> dict[str, str]:
    """torch.onnx.export (dynamo) of `module` on `example` inputs, saved to `path` (weights in an
    external data file when `nbytes` is over the limit) and checked by onnx.checker; returns the
    files written (role -> name)."""
    import onnx

    external = nbytes > config.external_data_bytes
    start = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter: axis renames, pytree deprecations
        program = torch.onnx.export(module.eval(), example, dynamo=True, verbose=False, dynamic_shapes=dynamic_shapes,
                                    input_names=inputs, output_names=outputs, opset_version=config.opset,
                                    optimize=config.optimize)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path), external_data=external)
    log.info("exported %s in %.1f s", path, time.perf_counter() - start)
    onnx.checker.check_model(str(path))  # by path: works with external data too
    files = {"graph": path.name}
    data = path.with_name(path.name + ".data")
    if external and data.is_file():
        files["external_data"] = data.name
    return files


def export_graph(model: nn.Module, path: Path, config: OnnxExportConfig = OnnxExportConfig()) -> dict[str, str]:
    """Export `model` to `path` (float32); returns the files written (role -> name)."""
    model = model.eval().float()
    num_layers = int(model.config.num_hidden_layers)
    inputs, outputs = io_names(num_layers)
    return save_graph(KVCacheWrapper(model), _example_inputs(model), _dynamic_shapes(num_layers), inputs, outputs,
                      path, config, param_bytes(model))


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest |a - b| over the entries finite in both; inf where one is infinite and the other is not
    (or infinite with another sign), and NaN never passes (logits of a draft vocabulary are -inf outside it:
    -inf - -inf is NaN, which a max would otherwise swallow)."""
    a, b = a.float(), b.float()
    if a.isnan().any() or b.isnan().any() or not torch.equal(a.isinf(), b.isinf()) or not torch.equal(a[a.isinf()], b[b.isinf()]):
        return float("inf")
    finite = a.isfinite()
    return float((a[finite] - b[finite]).abs().max()) if finite.any() else 0.0


TREE_PARENTS = (-1, 0, 0, 1, 2)  # the parity check's token tree: the pending token, two children, a grandchild each


def parity(model: nn.Module, graph_path: Path, token_ids: list[int], decode_steps: int) -> dict:
    """Max abs difference of logits (and hidden states) between torch and ORT on a prompt
    (one prefill call), `decode_steps` greedy steps of one token each, then one token tree."""
    from specdeploy.runtime.onnx_runner import OnnxGraph, OnnxRunner
    from specdeploy.runtime.runner import TorchRunner

    ref = TorchRunner(model, output_hidden=True)
    ort = OnnxRunner(OnnxGraph(graph_path), output_hidden=True)
    feed = torch.tensor(token_ids, dtype=torch.long)
    max_logits = max_hidden = 0.0
    agree = True
    tree = torch.tensor(TREE_PARENTS)
    for i in range(2 + decode_steps):
        parents = tree if i == 1 + decode_steps else None
        if parents is not None:  # the pending token and the top-2 guesses after it, each with its own top-1
            feed = torch.cat([feed, feed.new_tensor([7, 11, 13, 17])])
        a, b = ref.forward(feed, parents), ort.forward(feed, parents)
        max_logits = max(max_logits, max_abs_diff(a.logits, b.logits))
        max_hidden = max(max_hidden, max_abs_diff(a.hidden, b.hidden))
        agree &= bool(torch.equal(a.logits.argmax(-1), b.logits.argmax(-1)))
        feed = a.logits[-1:].argmax(-1)
    return {"prompt_tokens": len(token_ids), "decode_steps": decode_steps, "tree_nodes": len(TREE_PARENTS),
            "max_abs_logits": max_logits, "max_abs_hidden": max_hidden, "argmax_agree": agree}


def export_model(loaded: LoadedModel, out_dir: str | Path, name: str = "target",
                 config: OnnxExportConfig = OnnxExportConfig()) -> Manifest:
    """Export one model (graph + tokenizer + generation config + manifest) into out_dir."""
    out = Path(out_dir)
    model = loaded.model
    files = export_graph(model, out / GRAPH_FILE, config)
    loaded.tokenizer.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    ids = loaded.tokenizer(config.parity_prompt)["input_ids"]
    check = parity(model, out / GRAPH_FILE, ids, config.parity_decode_steps)
    check["tolerance"] = config.parity_tolerance
    check["ok"] = check["max_abs_logits"] <= config.parity_tolerance and check["argmax_agree"]
    inputs, outputs = io_names(int(model.config.num_hidden_layers))
    heads, head_dim = kv_shape(model.config)
    manifest = Manifest(
        kind="onnx", name=name, source=loaded.source, source_hash=loaded.source_hash,
        tokenizer_hash=tokenizer_hash(loaded.tokenizer), files=files,
        info={"opset": config.opset, "dtype": "float32", "exporter": "torch.onnx.export(dynamo=True)",
              "optimized": config.optimize,
              "num_layers": int(model.config.num_hidden_layers), "kv_heads": heads, "head_dim": head_dim,
              "hidden_size": int(model.config.hidden_size), "vocab_size": int(model.config.vocab_size),
              "max_length": int(getattr(model.config, "max_position_embeddings", 2048)),
              "inputs": inputs, "outputs": outputs, "param_bytes": param_bytes(model), "parity": check},
        versions=versions("onnx", "onnxruntime", "onnxscript"),
        created=now())
    write_manifest(out, manifest)
    if not check["ok"]:
        raise SpecDeployError(
            f"ONNX parity check failed for {name}: max |logit diff| {check['max_abs_logits']:.3g} "
            f"(tolerance {config.parity_tolerance}), argmax agree: {check['argmax_agree']}; see {out / MANIFEST}")
    return manifest


def resolve_draft(draft: str, target: LoadedModel) -> LoadedModel:
    """The draft a --draft flag names: 'layerskip' / 'layerskip:N' (the target's first N layers),
    'draft_lm' / 'draft_lm:PATH' (a trained DraftLM artifact; default: the shipped one) or a
    model source that load_model accepts."""
    from specdeploy.models.layerskip import layerskip_model
    from specdeploy.models.loader import load_model

    if draft == "layerskip" or draft.startswith("layerskip:"):
        n = None
        if ":" in draft:
            try:
                n = int(draft.split(":", 1)[1])
            except ValueError as e:
                raise SpecDeployError(f"--draft {draft!r}: expected layerskip:N with an integer N") from e
        model = layerskip_model(target.model, n)
        n = int(model.config.num_hidden_layers)
        tag = f"layerskip:{n}"
        digest = hashlib.sha256(f"{target.source_hash}:{tag}".encode()).hexdigest()
        return LoadedModel(model=model, tokenizer=target.tokenizer, source=f"{tag} of {target.source}", source_hash=digest)
    if draft == "draft_lm" or draft.startswith("draft_lm:"):
        from specdeploy.models import draft_lm

        path = draft.split(":", 1)[1] if ":" in draft else None
        model = draft_lm.load(path, target)
        digest = hashlib.sha256(f"{target.source_hash}:{draft}".encode()).hexdigest()
        return LoadedModel(model=model, tokenizer=target.tokenizer, source=f"{draft} for {target.source}", source_hash=digest)
    return load_model(draft, dtype=torch.float32)


def export_onnx(target: LoadedModel, out_dir: str | Path, draft: LoadedModel | None = None,
                config: OnnxExportConfig = OnnxExportConfig(), heads: Mapping[str, str | None] | None = None) -> Path:
    """Export the target (and draft) under out_dir/target, out_dir/draft, the Medusa / EAGLE heads
    named in `heads` (method -> artifact folder, None = the shipped one; onnx_heads.py) under
    out_dir/<method>, with a bundle manifest."""
    from specdeploy.export.onnx_heads import export_heads
    from specdeploy.models.tokenizers import check_compatible

    out = Path(out_dir)
    parts = {"target": target} | ({"draft": draft} if draft is not None else {})
    if draft is not None:
        check_compatible(target.tokenizer, draft.tokenizer)
    results = {}
    for role, loaded in parts.items():
        results[role] = export_model(loaded, out / role, role, config)
    results |= export_heads(target, out, heads or {}, config)
    write_manifest(out, Manifest(
        kind="bundle", name="onnx-export", source=target.source, source_hash=target.source_hash,
        tokenizer_hash=results["target"].tokenizer_hash, components={r: r for r in results},
        info={"format": "onnx", "parity": {r: m.info["parity"]["max_abs_logits"] for r, m in results.items()}},
        versions=results["target"].versions, created=now()))
    return out
