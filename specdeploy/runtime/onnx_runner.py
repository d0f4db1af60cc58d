"""ONNX Runtime runner: the exported KV-cache graph behind the `Runner` protocol.

One `forward(tokens)` is one `InferenceSession.run`: the runner feeds the KV arrays it
holds as `past_key_values.*` and keeps the graph's `present.*` outputs as its new cache;
`rollback(keep)` slices them. Batch 1, causal chains only (no token trees).

Artifacts are found through their manifest (specdeploy.build.manifest), never by file
name, and `load_onnx_engine` refuses a graph exported from another model or tokenizer.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from specdeploy.build.manifest import artifact_file, check_source, component_dir, read_manifest, tokenizer_hash
from specdeploy.errors import SpecDeployError
from specdeploy.runtime.types import Step

log = logging.getLogger(__name__)

_NP_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it, then CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxGraph:
    """An InferenceSession over one exported graph, with its KV layout read from the graph."""

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=providers or default_providers())
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
        """input_ids, position_ids: [batch, seq] int64; attention_mask: [batch, past + seq] int64;
        past: 2L arrays [batch, H, past, D]. Returns logits [batch, seq, vocab], hidden
        [batch, seq, hidden] (or None) and the present arrays [batch, H, past + seq, D]."""
        feed = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        feed.update(zip(self.past_names, past))
        outs = self.session.run(self.output_names, feed)
        if self.has_hidden:
            return outs[0], outs[1], outs[2:]
        return outs[0], None, outs[1:]


class OnnxRunner:
    """Runner over an `OnnxGraph`: batch 1, the KV cache held as numpy arrays."""

    supports_tree = False

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

    def forward(self, tokens: torch.Tensor) -> Step:
        """tokens: [m] int64 -> logits [m, vocab] float32 (hidden [m, hidden] if asked for)."""
        m = int(tokens.numel())
        if self._length + m > self.max_length:
            raise ValueError(f"KV cache would hold {self._length + m} tokens, over the context of {self.max_length}")
        ids = tokens.detach().cpu().to(torch.long).numpy().reshape(1, m)
        mask = np.ones((1, self._length + m), dtype=np.int64)
        pos = np.arange(self._length, self._length + m, dtype=np.int64).reshape(1, m)
        logits, hidden, self._kv = self.graph.run(ids, mask, pos, self._kv)
        self._length += m
        hidden_t = torch.from_numpy(hidden[0]).float() if (self.output_hidden and hidden is not None) else None
        return Step(logits=torch.from_numpy(logits[0]).float(), hidden=hidden_t)

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
    """A SpecEngine whose target (and, for method 'draft', draft) run in ONNX Runtime.

    engine_dir: an `export --format onnx` or ORT `build` output (a bundle with target and
    optionally draft), or a single model directory. target: the LoadedModel it must come
    from (tokenizer, stop tokens). For method 'draft' the bundle's draft graph is used; a
    draft given as a torch model (draft) is used only when the bundle has none.
    """
    from specdeploy.runtime.engine import SpecEngine
    from specdeploy.runtime.proposers import DraftModelProposer

    target_tok = tokenizer_hash(target.tokenizer)
    tdir = component_dir(engine_dir, "target")
    if tdir is None:
        raise SpecDeployError(f"{engine_dir}: no target model in this export")
    # Medusa / EAGLE heads read the target's last hidden state: the graph's hidden_states output
    runner = load_onnx_runner(tdir, source_hash=target.source_hash, tok_hash=target_tok, what=f"target {target.source}",
                              output_hidden=spec.method in ("medusa", "eagle", "multi"))
    ddir = component_dir(engine_dir, "draft") if spec.method == "draft" else None
    if ddir is None:
        return SpecEngine(target, spec, draft, runner=runner)
    draft_hash = None if draft is None else draft.source_hash
    draft_runner = load_onnx_runner(ddir, source_hash=draft_hash, tok_hash=target_tok, what="draft")
    return SpecEngine(target, spec, runner=runner, proposer=DraftModelProposer(draft_runner))
