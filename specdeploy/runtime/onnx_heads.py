"""Medusa and EAGLE heads in ONNX Runtime, behind the interfaces of the torch proposers.

The exported head graphs (specdeploy.export.onnx_heads) fold the target's token embedding
and lm_head in, so that one ORT call yields a whole tree level's logits. The adapters here
plug that call into the proposers of head_proposers.py, so the drafting logic (trees,
EAGLE-2 expansion) stays in one place:

- `OrtMedusaHeads(features)` returns the heads' logits (the graph applied the lm_head), so
  the Medusa proposer's lm_head is the identity.
- `OrtEagleHead` is an `EagleStep`: features and tokens in, the graph's predicted features
  and their draft logits out, as `TorchEagleStep` gives them from the torch head.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from specdeploy.build.manifest import artifact_file, check_source, component_dir, read_manifest, tokenizer_hash
from specdeploy.errors import SpecDeployError
from specdeploy.runtime.onnx_runner import make_session


class OnnxHeadGraph:
    """An InferenceSession over one head graph: named numpy inputs in, outputs in graph order."""

    def __init__(self, path: str | Path, providers: list[str] | None = None) -> None:
        self.path = Path(path)
        self.session = make_session(path, providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, **feed: np.ndarray) -> list[np.ndarray]:
        missing = set(self.input_names) - set(feed)
        if missing:
            raise SpecDeployError(f"{self.path}: inputs {sorted(missing)} not given")
        return self.session.run(self.output_names, feed)


class OrtMedusaHeads:
    """Medusa heads + lm_head in ORT: features [..., H] -> logits [num_heads, ..., vocab]."""

    def __init__(self, graph: OnnxHeadGraph, num_heads: int) -> None:
        self.graph, self.num_heads = graph, int(num_heads)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        lead = features.shape[:-1]
        flat = features.detach().float().reshape(-1, features.shape[-1]).cpu().numpy()
        logits = self.graph.run(hidden_states=flat)[0]  # [num_heads, rows, vocab]
        return torch.from_numpy(logits).reshape(self.num_heads, *lead, -1)


class OrtEagleHead:
    """The EAGLE head + embedding + lm_head in ORT: an `EagleStep` (head_proposers.py) for `EagleProposer`."""

    def __init__(self, graph: OnnxHeadGraph) -> None:
        self.graph = graph

    def __call__(self, features: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
                 allowed: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None, last_only: bool = False):
        """features: [n, H]; tokens: [n] (the graph embeds them); positions: [n]; allowed: [n, L + n] bool;
        cache: (keys, values) [1, kv_heads, L, head_dim] or None. Returns features [n, H], their
        logits [n, vocab] ([1, vocab] when `last_only`) and the new cache."""
        n = features.shape[0]
        if cache is None:
            key, value = self._empty()
        else:
            key, value = (np.ascontiguousarray(t.detach().cpu().numpy()) for t in cache)
        out, logits, key, value = self.graph.run(
            hidden_states=np.ascontiguousarray(features.detach().float().cpu().numpy())[None],
            input_ids=tokens.detach().cpu().to(torch.long).numpy().reshape(1, n),
            position_ids=positions.detach().cpu().to(torch.long).numpy().reshape(1, n),
            attention_mask=allowed.detach().cpu().numpy().astype(np.int64)[None, None],
            **{"past_key_values.0.key": key, "past_key_values.0.value": value})
        logits = torch.from_numpy(logits[0])  # [n, vocab]
        cache = (torch.from_numpy(key), torch.from_numpy(value))
        return torch.from_numpy(out[0]), logits[-1:] if last_only else logits, cache

    def _empty(self) -> tuple[np.ndarray, np.ndarray]:
        shape = next(i.shape for i in self.graph.session.get_inputs() if i.name == "past_key_values.0.key")
        empty = np.zeros((1, int(shape[1]), 0, int(shape[3])), dtype=np.float32)  # [1, kv_heads, 0, head_dim]
        return empty, empty.copy()


def load_head_graph(engine_dir: str | Path, method: str, target) -> tuple[OnnxHeadGraph, dict] | None:
    """The `method` head graph of an export (None if it has none), checked against the target."""
    directory = component_dir(engine_dir, method)
    if directory is None:
        return None
    manifest = read_manifest(directory)
    if manifest.kind != "onnx" or manifest.info.get("graph") != method:
        raise SpecDeployError(f"{directory}: not an ONNX {method} head graph")
    check_source(manifest, directory, source_hash=target.source_hash, tok_hash=tokenizer_hash(target.tokenizer),
                 what=f"target {target.source}")
    return OnnxHeadGraph(artifact_file(directory, manifest, "graph")), manifest.info


def onnx_head_proposer(spec, engine_dir: str | Path, target):
    """The medusa / eagle / multi proposer of `spec` over the export's head graphs, or None when
    the export has no graph for that method (the torch head is used then). Tree shape, tree size
    and top-k: `build_head_proposer`, given these heads."""
    from specdeploy.runtime.head_proposers import build_head_proposer

    method = "medusa" if spec.method == "medusa" else "eagle"
    found = load_head_graph(engine_dir, method, target)
    if found is None:
        return None
    graph, info = found
    if method == "medusa":
        tree = [tuple(p) for p in info["tree"]]
        heads = OrtMedusaHeads(graph, info["num_heads"])
        return build_head_proposer(spec, target, medusa_heads=(heads, nn.Identity(), tree))
    return build_head_proposer(spec, target, eagle_step=OrtEagleHead(graph))
