"""The bench's backend: the target loaded once, its runner, and every method's proposer over it."""
from __future__ import annotations

from specdeploy.bench.tasks import Prompt
from specdeploy.config import HEAD_METHODS, METHODS, SpecConfig, draft_confidence_for
from specdeploy.errors import SpecDeployError
from specdeploy.models.loader import LoadedModel
from specdeploy.models.layerskip import layerskip_layers as layerskip_draft_layers
from specdeploy.models.tokenizers import encode_prompt


def encode_all(backend: "Backend", prompts: list[Prompt], max_new_tokens: int) -> list[list[int]]:
    """Token ids of each prompt under the chat template (as SpecEngine.encode), without building a runner."""
    return [encode_prompt(backend.loaded.tokenizer, p.prompt) for p in prompts]


# ---- the loaded target and every method over it --------------------------------------------
class Backend:
    """The target loaded once, its runner (eager torch, or CUDA graphs) and each method's proposer.

    kind "graph": `CudaGraphRunner` for the target and the draft models (layerskip = the first
    quarter of the target's layers, draft = the trained DraftLM artifact); its token trees serve
    Medusa/EAGLE/multi. kind "torch": `TorchRunner`.
    """

    def __init__(self, loaded: LoadedModel, device: str, dtype: str, kind: str = "torch", max_length: int = 1024,
                 layerskip_layers: int | None = None, draft_path: str | None = None) -> None:
        self.loaded, self.device, self.dtype, self.kind = loaded, device, dtype, kind
        self.max_length = max_length
        self.layerskip_layers = layerskip_draft_layers(loaded.model.config.num_hidden_layers, layerskip_layers)
        self.draft_path = draft_path
        self._runners: dict[bool, object] = {}
        self._drafts: dict[str, object] = {}  # method -> draft runner
        self._draft_hf: dict[str, object] = {}  # method -> HF draft model (assisted generation, batch engines)
        self._lean = None

    @classmethod
    def load(cls, target: str, device: str, dtype: str | None, runner: str = "auto", max_new_tokens: int = 128,
             max_k: int = 8, **kw) -> "Backend":
        from specdeploy.models.loader import load_model
        from specdeploy.runtime.engine import DTYPES, resolve_device

        device, torch_dtype = resolve_device(device, dtype)
        kind = runner
        if kind == "auto":
            kind = "graph" if device.startswith("cuda") and _has_module("specdeploy.runtime.cuda_runner") else "torch"
        loaded = load_model(target, device=device, dtype=torch_dtype)
        name = next(n for n, d in DTYPES.items() if d == torch_dtype)
        max_length = max(1024, 512 + max_new_tokens + max_k + 8)
        return cls(loaded, device, name, kind, max_length, **kw)

    @property
    def lean(self):
        if self._lean is None:
            from specdeploy.runtime.cuda_runner import LeanLlama

            self._lean = LeanLlama.from_hf(self.loaded.model)
        return self._lean

    def runner(self, hidden: bool = False):
        if hidden not in self._runners:
            if self.kind == "graph":
                from specdeploy.runtime.cuda_runner import CudaGraphRunner

                self._runners[hidden] = CudaGraphRunner(self.lean, max_length=self.max_length, output_hidden=hidden)
            else:
                from specdeploy.runtime.runner import TorchRunner

                self._runners[hidden] = TorchRunner(self.loaded.model, output_hidden=hidden)
        return self._runners[hidden]

    def draft_hf(self, method: str):
        """The Hugging Face model of a draft-model method (layerskip: shares the target's modules)."""
        if method not in self._draft_hf:
            if method == "layerskip":
                from specdeploy.models.layerskip import layerskip_model

                self._draft_hf[method] = layerskip_model(self.loaded.model, self.layerskip_layers)
            elif method == "draft":
                from specdeploy.models import artifacts, draft_lm

                artifacts.resolve("draft_lm", self.draft_path)  # a clear error when no artifact is shipped
                self._draft_hf[method] = draft_lm.load(self.draft_path, self.loaded)
            else:
                raise SpecDeployError(f"{method} is not a draft-model method")
        return self._draft_hf[method]

    def _spec(self, method: str, k: int = 4, switch: str = "on") -> SpecConfig:
        return SpecConfig(method=method, k=k, draft=self.draft_path if method == "draft" else None,
                          layerskip_layers=self.layerskip_layers, switch=switch)

    def draft_lean(self, method: str):
        from specdeploy.runtime.cuda_runner import lean_draft

        return lean_draft(self._spec(method), self.loaded, self.lean, None if method == "layerskip" else self.draft_hf(method))

    def batch_engine(self, method: str, k: int, batch: int, switch: str = "on", sampling=None):
        """A `BatchSpeculator` of `method` over the shared lean target (and the draft models the peers use);
        sampling: SamplingParams (None or greedy: greedy)."""
        from specdeploy.runtime.engine import build_batch_speculator

        draft_model = self.draft_hf(method) if method == "draft" else None
        return build_batch_speculator(self._spec(method, k, switch), self.loaded, max_batch=batch, max_length=self.max_length,
                                      lean=self.lean, draft_model=draft_model, sampling=sampling)

    def draft_runner(self, method: str):
        if method not in ("layerskip", "draft"):
            return None
        if method not in self._drafts:
            if self.kind == "graph":
                from specdeploy.runtime.cuda_runner import CudaGraphRunner

                self._drafts[method] = CudaGraphRunner(self.draft_lean(method), max_length=self.max_length)
            else:
                from specdeploy.runtime.runner import TorchRunner

                self._drafts[method] = TorchRunner(self.draft_hf(method))
        return self._drafts[method]

    def proposer(self, method: str, k: int):
        """The proposer of `method`; SpecDeployError when it cannot be built here (e.g. no artifact)."""
        from specdeploy.runtime.proposers import DraftModelProposer, NGramProposer, NoProposer

        if method == "none":
            return NoProposer()
        if method == "ngram":
            return NGramProposer(1, 4)
        if method in ("layerskip", "draft"):
            return DraftModelProposer(self.draft_runner(method), draft_confidence_for(method))
        if method in HEAD_METHODS:
            from specdeploy.runtime.head_proposers import build_head_proposer

            try:
                graphs = self.max_length if self.kind == "graph" else None  # EAGLE trees drafted by CUDA graphs
                return build_head_proposer(SpecConfig(method=method, k=k), self.loaded,
                                           graph_max_length=graphs)
            except (OSError, ValueError, KeyError) as e:
                raise SpecDeployError(f"{method} artifact not loadable: {e}") from None
        raise SpecDeployError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")

    def engine(self, method: str, k: int, policy=None, more: dict | None = None):
        """An engine drafting with `method`; `more`: {method: proposer} a policy may switch to per task."""
        from specdeploy.runtime.engine import SpecEngine

        proposer = self.proposer(method, k)
        more = more or {}
        hidden = any(getattr(p, "needs_hidden", False) for p in (proposer, *more.values()))
        spec = SpecConfig(method=method, k=max(1, k))
        engine = SpecEngine(self.loaded, spec, runner=self.runner(hidden), proposer=proposer, policy=policy,
                            plain_runner=self.runner(False))
        for m, p in more.items():
            engine.add_proposer(m, p)
        return engine


def _has_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False
