"""ONNX Runtime runner: the exported KV-cache graph behind the `Runner` protocol.

One `forward(tokens)` is one `InferenceSession.run`: the runner feeds the KV arrays it
holds as `past_key_values.*` and keeps the graph's `present.*` outputs as its new cache;
`rollback(keep)` slices them. Batch 1. Token trees (`forward(tokens, tree_parents)`, then
`keep_path`) are one call too: the graph takes a 4D attention mask and explicit position ids.
With `output_hidden=True` each step also returns the target's last hidden state, which the
Medusa / EAGLE proposers read (their ONNX heads: onnx_heads.py).

Artifacts are found through their manifest (specdeploy.build.manifest), never by file
name, and `load_onnx_engine` refuses a graph exported from another model or tokenizer.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from specdeploy.build.manifest import artifact_file, check_source, component_dir, read_manifest, tokenizer_hash
from specdeploy.config import HEAD_METHODS
from specdeploy.errors import SpecDeployError
from specdeploy.runtime.runner import path_needs_move
from specdeploy.runtime.tree import ancestor_matrix
from specdeploy.runtime.types import Step

log = logging.getLogger(__name__)

_NP_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def causal_mask(padding: np.ndarray, seq: int) -> np.ndarray:
    """The graph's 4D mask [batch, 1, seq, total] int64 for the last `seq` of `total` positions,
    from a 2D padding mask [batch, total] (1 = a real token): causal, padding keys masked; each
    token always sees itself, so a padded query row is never empty (no NaN)."""
    batch, total = padding.shape
    past = total - seq
    keys = np.arange(total)[None, :]
    queries = np.arange(past, total)[:, None]
    allowed = (keys <= queries)[None] & padding[:, None, :].astype(bool)  # [batch, seq, total]
    allowed |= keys == queries
    return allowed[:, None].astype(np.int64)


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it, then CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def make_session(path: str | Path, providers: list[str] | None = None, threads: int | None = None):
    """An onnxruntime InferenceSession with every graph optimization on."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=providers or default_providers())


class OnnxGraph:
    """An InferenceSession over one exported graph, with its KV layout read from the graph."""

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int | None = None) -> None:
        self.path = Path(path)
        self.session = make_session(path, providers, threads)
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        for name in ("input_ids", "attention_mask", "position_ids"):
            if name not in inputs:
                raise SpecDeployError(f"{path}: graph input {name!r} missing; not a specdeploy KV-cache export")
        self.num_layers = sum(1 for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
        if self.num_layers == 0 or "logits" not in outputs:
            raise SpecDeployError(f"{path}: graph has no past_key_values.* inputs or no logits output")
        key = inputs["past_key_values.0.key"]
        self.kv_heads, self.head_dim = int(key.shape[1]), int(key.shape[3])  # [batch, H, past, D]
        self.kv_dtype = _NP_DTYPES.get(key.type, np.float32)
        self.vocab_size = int(outputs["logits"].shape[2])  # [batch, seq, vocab]
        self.has_hidden = "hidden_states" in outputs
        self.past_names = [f"past_key_values.{i}.{k}" for i in range(self.num_layers) for k in ("key", "value")]
        self.output_names = ["logits"] + (["hidden_states"] if self.has_hidden else []) + [
            f"present.{i}.{k}" for i in range(self.num_layers) for k in ("key", "value")]

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def empty_cache(self, batch: int = 1) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=self.kv_dtype) for _ in self.past_names]

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
            past: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None, list[np.ndarray]]:
        """input_ids, position_ids: [batch, seq] int64; attention_mask: [batch, 1, seq, past + seq]
        int64 (1 = attend), or a 2D padding mask [batch, past + seq] for causal chains;
        past: 2L arrays [batch, H, past, D]. Returns logits [batch, seq, vocab], hidden
        [batch, seq, hidden] (or None) and the present arrays [batch, H, past + seq, D]."""
        if attention_mask.ndim == 2:
            attention_mask = causal_mask(attention_mask, input_ids.shape[1])
        feed = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        feed.update(zip(self.past_names, past))
        outs = self.session.run(self.output_names, feed)
        if self.has_hidden:
            return outs[0], outs[1], outs[2:]
        return outs[0], None, outs[1:]


class OnnxRunner:
    """Runner over an `OnnxGraph`: batch 1, the KV cache held as numpy arrays."""

    supports_tree = True

    def __init__(self, graph: OnnxGraph, *, max_length: int = 2048, output_hidden: bool = False) -> None:
        if output_hidden and not graph.has_hidden:
            raise SpecDeployError(f"{graph.path}: the graph has no hidden_states output")
        self.graph = graph
        self.device = torch.device("cpu")
        self.vocab_size = graph.vocab_size
        self.max_length = int(max_length)
        self.output_hidden = output_hidden
        self.reset()

    @property
    def length(self) -> int:
        return self._length

    def reset(self) -> None:
        self._kv = self.graph.empty_cache()  # 2L arrays [1, H, length, D]
        self._length = 0

    def forward(self, tokens: torch.Tensor, tree_parents: torch.Tensor | None = None) -> Step:
        """tokens: [m] int64; tree_parents: [m] int64 index of each token's parent among `tokens`
        (-1 = the last cache entry), or None for a causal chain. Returns logits [m, vocab]
        float32 (hidden [m, hidden] if asked for)."""
        m = int(tokens.numel())
        if self._length + m > self.max_length:
            raise ValueError(f"KV cache would hold {self._length + m} tokens, over the context of {self.max_length}")
        ids = tokens.detach().cpu().to(torch.long).numpy().reshape(1, m)
        # anc[i, j]: token j is token i or its ancestor (a chain: lower triangle)
        anc = np.tril(np.ones((m, m), dtype=bool)) if tree_parents is None else ancestor_matrix(tree_parents.cpu()).numpy()
        mask = np.concatenate([np.ones((m, self._length), dtype=bool), anc], axis=1)
        mask = mask.astype(np.int64).reshape(1, 1, m, self._length + m)
        pos = (self._length - 1 + anc.sum(-1)).astype(np.int64).reshape(1, m)  # cache length + depth (root depth 0)
        logits, hidden, self._kv = self.graph.run(ids, mask, pos, self._kv)
        self._length += m
        hidden_t = torch.from_numpy(hidden[0]).float() if (self.output_hidden and hidden is not None) else None
        return Step(logits=torch.from_numpy(logits[0]).float(), hidden=hidden_t)

    def keep_path(self, keep: int, path: list[int]) -> None:
        """Keep the first `keep` cache entries, then the entries at positions `path` (ascending,
        all >= keep) moved down behind them; drop the rest."""
        if not path_needs_move(keep, path, self._length):
            self.rollback(keep + len(path))
            return
        index = np.concatenate([np.arange(keep), np.asarray(path, dtype=np.int64)])
        self._kv = [np.take(a, index, axis=2) for a in self._kv]
        self._length = int(index.size)

    def rollback(self, keep: int) -> None:
        if not 0 <= keep <= self._length:
            raise ValueError(f"cannot keep {keep} of {self._length} cache entries")
        if keep < self._length:
            self._kv = [np.ascontiguousarray(a[:, :, :keep]) for a in self._kv]
            self._length = keep


def load_onnx_runner(directory: str | Path, *, source_hash: str | None = None, tok_hash: str | None = None,
                     what: str = "target", output_hidden: bool = False, providers: list[str] | None = None) -> OnnxRunner:
    """The runner of one exported (or ORT-quantized) model directory, checked against the
    model the caller has (source_hash / tok_hash None = not checked)."""
    manifest = read_manifest(directory)
    if manifest.kind != "onnx":
        raise SpecDeployError(f"{directory}: a {manifest.kind!r} artifact, not an ONNX graph")
    check_source(manifest, directory, source_hash=source_hash, tok_hash=tok_hash, what=what)
    graph = OnnxGraph(artifact_file(directory, manifest, "graph"), providers=providers)
    return OnnxRunner(graph, max_length=int(manifest.info.get("max_length", 2048)), output_hidden=output_hidden)


def load_onnx_engine(engine_dir: str | Path, spec, target, draft=None):
    """A SpecEngine whose target (and draft, or Medusa / EAGLE heads) run in ONNX Runtime.

    engine_dir: an `export --format onnx` or ORT `build` output (a bundle with target and
    optionally draft, medusa, eagle), or a single model directory. target: the LoadedModel it
    must come from (tokenizer, stop tokens). Method 'draft' uses the bundle's draft graph;
    'medusa', 'eagle' and 'multi' its head graphs (onnx_heads.py). Where the bundle lacks that
    component, the torch draft (draft) or the torch head is used beside the ORT target.
    """
    from specdeploy.runtime.engine import SpecEngine
    from specdeploy.runtime.onnx_heads import onnx_head_proposer
    from specdeploy.runtime.proposers import DraftModelProposer

    target_tok = tokenizer_hash(target.tokenizer)
    tdir = component_dir(engine_dir, "target")
    if tdir is None:
        raise SpecDeployError(f"{engine_dir}: no target model in this export")
    heads = spec.method in HEAD_METHODS
    # Medusa / EAGLE heads read the target's last hidden state: the graph's hidden_states output
    runner = load_onnx_runner(tdir, source_hash=target.source_hash, tok_hash=target_tok, what=f"target {target.source}",
                              output_hidden=heads)
    proposer = None
    if heads:
        proposer = onnx_head_proposer(spec, engine_dir, target)
        if proposer is None:
            log.info("%s has no %s graph: the torch head drafts for the ORT target", engine_dir, spec.method)
    elif spec.method == "draft":
        ddir = component_dir(engine_dir, "draft")
        if ddir is not None:
            draft_hash = None if draft is None else draft.source_hash
            proposer = DraftModelProposer(load_onnx_runner(ddir, source_hash=draft_hash, tok_hash=target_tok, what="draft"),
                                          spec.confidence)
    return SpecEngine(target, spec, None if proposer is not None else draft, runner=runner, proposer=proposer)
