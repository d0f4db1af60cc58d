"""Medusa and EAGLE heads in ONNX Runtime, behind the module interfaces of the torch proposers.

`MedusaProposer` and `EagleProposer` (head_proposers.py) draft with a head, the target's
token embedding and its lm_head, each a torch module. The exported head graphs
(specdeploy.export.onnx_heads) fold the embedding and the lm_head in, so that one ORT call
yields a whole tree level's logits; the adapters here present that fused call through the
proposers' interfaces, so the drafting logic (trees, EAGLE-2 expansion) stays in one place:

- `OrtMedusaHeads(features)` returns the heads' logits (the graph applied the lm_head), so
  the Medusa proposer's lm_head is the identity.
- `OrtEagleHead` returns each predicted feature with its draft logits appended,
  [..., hidden + vocab]: the proposer feeds features back (the adapter reads the first
  `hidden` columns) and selects rows of them, which carries the logits along; its lm_head is
  `LogitsOf`, the last `vocab` columns; its embedding passes token ids through (`TokenIds`),
  as the graph embeds them itself. A hack, admitted: `EagleProposer` taking one callable
  "features, tokens, positions, mask, cache -> features, logits, cache" would remove it.
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
    """The EAGLE head + embedding + lm_head in ORT, called as `EagleHead` is by `EagleProposer`."""

    def __init__(self, graph: OnnxHeadGraph, hidden_size: int) -> None:
        self.graph, self.hidden = graph, int(hidden_size)

    def __call__(self, features: torch.Tensor, token_ids: torch.Tensor, positions: torch.Tensor,
                 mask: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None):
        """features: [1, n, H] (the target's) or [1, n, H + vocab] (this head's own output);
        token_ids: [1, n] int64 (`TokenIds` passed them through); positions: [n];
        mask: [n, L + n] bool; cache: (keys, values) [1, kv_heads, L, head_dim] or None.
        Returns features with their logits appended [1, n, H + vocab] and the new cache."""
        x = np.ascontiguousarray(features[..., : self.hidden].detach().float().cpu().numpy())
        n = x.shape[1]
        if cache is None:
            key, value = self._empty()
        else:
            key, value = (np.ascontiguousarray(t.detach().cpu().numpy()) for t in cache)
        out, logits, key, value = self.graph.run(
            hidden_states=x, input_ids=token_ids.detach().cpu().to(torch.long).numpy().reshape(1, n),
            position_ids=positions.detach().cpu().to(torch.long).numpy().reshape(1, n),
            attention_mask=mask.detach().cpu().numpy().astype(np.int64)[None, None],
            **{"past_key_values.0.key": key, "past_key_values.0.value": value})
        joined = torch.from_numpy(np.concatenate([out, logits], axis=-1))  # [1, n, H + vocab]
        return joined, (torch.from_numpy(key), torch.from_numpy(value))

    def _empty(self) -> tuple[np.ndarray, np.ndarray]:
        shape = next(i.shape for i in self.graph.session.get_inputs() if i.name == "past_key_values.0.key")
        empty = np.zeros((1, int(shape[1]), 0, int(shape[3])), dtype=np.float32)  # [1, kv_heads, 0, head_dim]
        return empty, empty.copy()


class TokenIds(nn.Module):
    """The EAGLE proposer's "embedding": token ids pass through, the graph embeds them."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens


class LogitsOf(nn.Module):
    """The EAGLE proposer's "lm_head": the logits `OrtEagleHead` appended to each feature."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.hidden = int(hidden_size)

    def forward(self, joined: torch.Tensor) -> torch.Tensor:
        return joined[..., self.hidden :]


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
    and top-k follow `build_head_proposer`."""
    from specdeploy.runtime.head_proposers import EagleProposer, MedusaProposer, MultiDraftProposer
    from specdeploy.runtime.proposers import NGramProposer

    if spec.method == "medusa":
        found = load_head_graph(engine_dir, "medusa", target)
        if found is None:
            return None
        graph, info = found
        tree = [tuple(p) for p in info["tree"]]
        if spec.tree_size is not None:
            tree = tree[: spec.tree_size]  # breadth-first: any prefix is a tree
        return MedusaProposer(OrtMedusaHeads(graph, info["num_heads"]), nn.Identity(), tree or None)
    found = load_head_graph(engine_dir, "eagle", target)
    if found is None:
        return None
    graph, info = found
    size = 48 if spec.tree_size is None else spec.tree_size
    hidden = int(info["hidden_size"])
    eagle = EagleProposer(OrtEagleHead(graph, hidden), TokenIds(), LogitsOf(hidden), tree_size=size, topk=spec.tree_topk)
    if spec.method == "eagle":
        return eagle
    return MultiDraftProposer([NGramProposer(spec.ngram_min, spec.ngram_max), eagle], budget=size + spec.k)
