"""ONNX export of the Medusa heads and the EAGLE head, each a graph of its own.

medusa/model.onnx (all heads in one call):
    inputs   hidden_states                 [batch, hidden] float32: the target's last hidden state
                                           (after its final norm; the target graph's `hidden_states`)
    outputs  logits                        [num_heads, batch, vocab] float32: head i's guess of the
                                           token i + 2 places after the feature's position (-inf
                                           outside the heads' draft vocabulary, if they have one)

eagle/model.onnx (a prefill of committed pairs, or one level of a draft tree, is one call):
    inputs   hidden_states                 [batch, seq, hidden] float32: features (the target's, or
                                           the head's own predictions while drafting)
             input_ids                     [batch, seq] int64: the token after each feature's position
             position_ids                  [batch, seq] int64
             attention_mask                [batch, 1, seq, past + seq] int64, 1 = attend (tree masks)
             past_key_values.0.key / .value  [batch, kv_heads, past, head_dim] the head's own KV cache
    outputs  predicted_hidden_states       [batch, seq, hidden] predicted next features
             logits                        [batch, seq, vocab] float32: the target's lm_head on them
                                           (-inf outside the head's draft vocabulary, if it has one)
             present.0.key / .value        [batch, kv_heads, past + seq, head_dim]

Each graph carries the target's lm_head (EAGLE also its token embedding: tied, so stored once
in that graph), so drafting needs no torch weights and one ORT call gives a tree level's
logits; the price is one more copy of the vocabulary matrix per head graph (113 MB for
SmolLM2 in float32; an EAGLE head with a draft vocabulary stores its rows of it besides).
The Medusa tree shape travels in the manifest (`info.tree`).
Parity with the torch head (max abs difference of logits and features) is in the manifest.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from specdeploy.build.manifest import Manifest, now, tokenizer_hash, versions, write_manifest
from specdeploy.errors import SpecDeployError
from specdeploy.export.onnx import GRAPH_FILE, OnnxExportConfig, max_abs_diff, param_bytes, save_graph
from specdeploy.models.artifacts import WEIGHTS
from specdeploy.models.draft_vocab import with_draft_vocab
from specdeploy.models.eagle import EagleHead
from specdeploy.models.loader import LoadedModel, file_sha256
from specdeploy.models.medusa import MedusaHeads

ONNX_HEAD_METHODS = ("medusa", "eagle")  # heads with a graph of their own (multi reuses eagle's)
MEDUSA_IO = (["hidden_states"], ["logits"])
EAGLE_IO = (["hidden_states", "input_ids", "position_ids", "attention_mask", "past_key_values.0.key",
             "past_key_values.0.value"], ["predicted_hidden_states", "logits", "present.0.key", "present.0.value"])


class MedusaGraph(nn.Module):
    """Medusa heads + the target's lm_head: features [batch, H] -> logits [num_heads, batch, vocab]."""

    def __init__(self, heads: MedusaHeads, lm_head: nn.Module) -> None:
        super().__init__()
        self.heads, self.lm_head = heads, with_draft_vocab(lm_head, heads.draft_vocab)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.heads(hidden_states)).float()


class EagleGraph(nn.Module):
    """EAGLE head + the target's embedding and lm_head, its KV cache as explicit tensors."""

    def __init__(self, head: EagleHead, embed: nn.Module, lm_head: nn.Module) -> None:
        super().__init__()
        self.head, self.embed, self.lm_head = head, embed, with_draft_vocab(lm_head, head.draft_vocab)

    def forward(self, hidden_states: torch.Tensor, input_ids: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out, (key, value) = self.head(hidden_states, self.embed(input_ids), position_ids, attention_mask.bool(),
                                      (past_key, past_value))
        return out, self.lm_head(out).float(), key, value


def _eagle_example(head: EagleHead, vocab: int, batch: int = 2, seq: int = 3, past: int = 4) -> tuple:
    """Inputs whose dynamic sizes are all >= 2 (torch.export specialises sizes 0 and 1)."""
    c = head.config
    mask = torch.ones(batch, 1, seq, past + seq, dtype=torch.long)
    kv = torch.zeros(batch, c.num_key_value_heads, past, c.head_dim)
    return (torch.randn(batch, seq, c.hidden_size), torch.randint(0, vocab, (batch, seq)),
            torch.arange(past, past + seq).expand(batch, seq).contiguous(), mask, kv, kv.clone())


def _eagle_dynamic_shapes() -> dict:
    from torch.export import Dim

    batch, seq, past, total = Dim("batch"), Dim("seq"), Dim("past"), Dim("total")
    return {"hidden_states": {0: batch, 1: seq}, "input_ids": {0: batch, 1: seq}, "position_ids": {0: batch, 1: seq},
            "attention_mask": {0: batch, 2: seq, 3: total}, "past_key": {0: batch, 2: past},
            "past_value": {0: batch, 2: past}}


def medusa_parity(module: MedusaGraph, path: Path, features: torch.Tensor) -> dict:
    """Torch vs ORT on `features` [n, H] (n rows as the batch)."""
    from specdeploy.runtime.onnx_heads import OnnxHeadGraph

    with torch.no_grad():
        ref = module(features)
    got = torch.from_numpy(OnnxHeadGraph(path).run(hidden_states=features.numpy())[0])
    return {"rows": int(features.shape[0]), "max_abs_logits": max_abs_diff(ref, got),
            "argmax_agree": bool(torch.equal(ref.argmax(-1), got.argmax(-1)))}


def eagle_parity(module: EagleGraph, path: Path, features: torch.Tensor, token_ids: list[int], width: int = 3) -> dict:
    """Torch vs ORT: a prefill of the committed pairs (features [n, H], the next token of each),
    then one tree level of `width` sibling nodes that see the cache and themselves only."""
    from specdeploy.runtime.onnx_heads import OnnxHeadGraph

    graph = OnnxHeadGraph(path)
    n = features.shape[0]
    c = module.head.config
    empty = torch.zeros(1, c.num_key_value_heads, 0, c.head_dim)
    prefill = (features[None], torch.tensor([token_ids[1 : n + 1]]), torch.arange(n)[None],
               torch.ones(n, n, dtype=torch.long).tril()[None, None], empty, empty)
    diffs = {"max_abs_logits": 0.0, "max_abs_hidden": 0.0, "max_abs_kv": 0.0}
    agree = True
    inputs = prefill
    for step in range(2):
        with torch.no_grad():
            ref = module(*inputs)
        got = [torch.from_numpy(a) for a in graph.run(**dict(zip(EAGLE_IO[0], (t.numpy() for t in inputs))))]
        diffs["max_abs_hidden"] = max(diffs["max_abs_hidden"], max_abs_diff(ref[0], got[0]))
        diffs["max_abs_logits"] = max(diffs["max_abs_logits"], max_abs_diff(ref[1], got[1]))
        diffs["max_abs_kv"] = max(diffs["max_abs_kv"], max(max_abs_diff(r, g) for r, g in zip(ref[2:], got[2:])))
        agree &= bool(torch.equal(ref[1].argmax(-1), got[1].argmax(-1)))
        if step == 0:  # a tree level: `width` siblings after the last pair, at the same position
            top = ref[1][0, -1].topk(width).indices
            mask = torch.cat([torch.ones(width, n, dtype=torch.long), torch.eye(width, dtype=torch.long)], 1)
            inputs = (ref[0][:, -1:].expand(1, width, -1), top[None], torch.full((1, width), n), mask[None, None],
                      ref[2], ref[3])
    return {"prefill_pairs": int(n), "tree_width": width, **diffs, "argmax_agree": agree}


def _head_manifest(method: str, target: LoadedModel, artifact: Path, files: dict, info: dict,
                   check: dict, config: OnnxExportConfig) -> Manifest:
    head_hash = file_sha256(artifact / WEIGHTS)
    return Manifest(
        kind="onnx", name=method, source=f"{method} head {artifact} for {target.source}",
        source_hash=target.source_hash, tokenizer_hash=tokenizer_hash(target.tokenizer), files=files,
        info={"graph": method, "head_sha256": head_hash, "opset": config.opset, "dtype": "float32",
              "exporter": "torch.onnx.export(dynamo=True)", "optimized": config.optimize, **info, "parity": check},
        versions=versions("onnx", "onnxruntime", "onnxscript"), created=now())


def _check(method: str, check: dict, config: OnnxExportConfig, out: Path) -> None:
    check["tolerance"] = config.parity_tolerance
    check["ok"] = check["max_abs_logits"] <= config.parity_tolerance and check["argmax_agree"]
    if not check["ok"]:
        raise SpecDeployError(f"ONNX parity check failed for the {method} head: max |logit diff| "
                              f"{check['max_abs_logits']:.3g} (tolerance {config.parity_tolerance}), argmax agree: "
                              f"{check['argmax_agree']}; see {out}")


def _target_features(target: LoadedModel, config: OnnxExportConfig) -> tuple[list[int], torch.Tensor]:
    """Token ids of the parity prompt and the target's last hidden state at each ([n, H] float32)."""
    ids = target.tokenizer(config.parity_prompt)["input_ids"]
    with torch.no_grad():  # the decoder stack alone: no lm_head, no per-layer states kept
        features = target.model.model(input_ids=torch.tensor([ids]), use_cache=False).last_hidden_state
    return ids, features[0].float()


def export_medusa(heads: MedusaHeads, tree: list[tuple[int, ...]], target: LoadedModel, out_dir: str | Path,
                  artifact: Path, config: OnnxExportConfig = OnnxExportConfig()) -> Manifest:
    """The Medusa graph (heads + lm_head), its manifest (tree shape, parity) and nothing else."""
    out = Path(out_dir)
    module = MedusaGraph(heads.float().eval(), target.model.get_output_embeddings()).eval()
    hidden = int(heads.hidden_size)
    from torch.export import Dim

    files = save_graph(module, (torch.randn(2, hidden),), {"hidden_states": {0: Dim("batch")}}, *MEDUSA_IO,
                       out / GRAPH_FILE, config, param_bytes(module))
    _, features = _target_features(target, config)
    check = medusa_parity(module, out / GRAPH_FILE, features)
    _check("medusa", check, config, out)
    info = {"num_heads": int(heads.num_heads), "hidden_size": hidden, "vocab_size": int(target.model.config.vocab_size),
            "tree": [list(p) for p in tree], "inputs": MEDUSA_IO[0], "outputs": MEDUSA_IO[1],
            "param_bytes": param_bytes(module)}
    manifest = _head_manifest("medusa", target, artifact, files, info, check, config)
    write_manifest(out, manifest)
    return manifest


def export_eagle(head: EagleHead, target: LoadedModel, out_dir: str | Path, artifact: Path,
                 config: OnnxExportConfig = OnnxExportConfig()) -> Manifest:
    """The EAGLE graph (embedding + head + lm_head, its KV cache as I/O) and its manifest."""
    out = Path(out_dir)
    model = target.model
    module = EagleGraph(head.float().eval(), model.get_input_embeddings(), model.get_output_embeddings()).eval()
    vocab = int(model.config.vocab_size)
    files = save_graph(module, _eagle_example(head, vocab), _eagle_dynamic_shapes(), *EAGLE_IO, out / GRAPH_FILE,
                       config, param_bytes(module))
    ids, features = _target_features(target, config)
    check = eagle_parity(module, out / GRAPH_FILE, features[:-1], ids)
    _check("eagle", check, config, out)
    c = head.config
    info = {"hidden_size": c.hidden_size, "vocab_size": vocab, "kv_heads": c.num_key_value_heads, "head_dim": c.head_dim,
            "inputs": EAGLE_IO[0], "outputs": EAGLE_IO[1], "param_bytes": param_bytes(module)}
    manifest = _head_manifest("eagle", target, artifact, files, info, check, config)
    write_manifest(out, manifest)
    return manifest


def export_heads(target: LoadedModel, out_dir: str | Path, heads: Mapping[str, str | None],
                 config: OnnxExportConfig = OnnxExportConfig()) -> dict[str, Manifest]:
    """Export each head method named in `heads` (method -> artifact folder, None = the shipped
    one) under out_dir/<method>; the artifacts must fit the target (models.medusa / eagle.load)."""
    from specdeploy.models import artifacts, eagle, medusa

    out = {}
    for method, path in heads.items():
        if method not in ONNX_HEAD_METHODS:
            raise SpecDeployError(f"no ONNX head export for method {method!r}; use one of {', '.join(ONNX_HEAD_METHODS)}")
        folder = artifacts.resolve(method, path)
        if method == "medusa":
            module, tree, _ = medusa.load(folder, target)
            out[method] = export_medusa(module, tree, target, Path(out_dir) / method, folder, config)
        else:
            module, _ = eagle.load(folder, target)
            out[method] = export_eagle(module, target, Path(out_dir) / method, folder, config)
    return out
