"""Request-level settings: sampling parameters and the speculation config.

Defaults live here once; the CLI, the Triton model and the benchmarks build from them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from specdeploy.errors import SpecDeployError

METHODS = ("none", "ngram", "draft", "layerskip", "medusa", "eagle", "multi", "specinfer")
HEAD_METHODS = ("medusa", "eagle", "multi", "specinfer")  # proposers that read the target's hidden states
TRAINED = ("draft", "medusa", "eagle", "multi", "specinfer")  # methods that load a trained artifact (`draft`: its path)
MAX_K = 64
# per method, the draft confidence where none is given: chosen on training prompts, not the eval set
# (results/cpu/draft_confidence/README.md); Medusa's heads guess each position without the ones before it,
# so their path probabilities are products of marginals and fall much faster than a draft model's
DRAFT_CONFIDENCE = {"draft": 0.1, "layerskip": 0.1, "medusa": 0.005}
# share of the target's answer tokens a trained EAGLE head's draft vocabulary covers (FR-Spec): on SmolLM2 15,570 of
# 49,152 ids, acceptance within 1% (results/cpu/draft_vocab)
DRAFT_VOCAB_COVERAGE = 0.995


def check_confidence(value: float) -> float:
    """A draft confidence threshold, checked: a probability in [0, 1)."""
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0 <= value < 1):
        raise SpecDeployError(f"draft confidence must be a number in [0, 1), got {value!r}")
    return float(value)


def draft_confidence_for(method: str, value: float | None = None) -> float:
    """The draft confidence a method runs with: `value`, or the method's default (0: no cut)."""
    return DRAFT_CONFIDENCE.get(method, 0.0) if value is None else check_confidence(value)


@dataclass(frozen=True)
class SamplingParams:
    """How the target's next token is chosen. temperature 0 means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)) or self.temperature < 0:
            raise SpecDeployError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise SpecDeployError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise SpecDeployError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise SpecDeployError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise SpecDeployError("stop strings must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class SpecConfig:
    """Which proposer drafts and how many tokens it proposes per step (k).

    `from_vllm` accepts vLLM's `speculative_config` dict shape, e.g.
    {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}.
    """

    method: str = "ngram"
    k: int = 4
    draft: str | None = None  # path of a draft model or artifact (draft and the head methods); None = shipped default
    ngram_min: int = 1
    ngram_max: int = 4
    layerskip_layers: int | None = None  # None: a quarter of the target's layers
    # token trees (medusa, eagle, multi, specinfer): nodes per tree, 0 = a chain of k; None = the method's
    # default for the runner (head_proposers.default_tree_size). specinfer merges the EAGLE tree with the
    # n-gram chain into at most tree_size + k nodes (2k for an EAGLE chain).
    # EAGLE trees are k deep, `tree_topk` wide.
    tree_size: int | None = None
    tree_topk: int = 8
    switch: str = "on"  # "auto": decode plain steps where this request's speculation does not pay (switch.py)
    # draft and layerskip chains and Medusa trees stop where the draft's own probability of the path
    # drafted so far falls below this (0: always draft k / the whole tree); see DraftModelProposer
    draft_confidence: float | None = None  # None: the method's default (DRAFT_CONFIDENCE)
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SpecDeployError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not isinstance(self.k, int) or not 1 <= self.k <= MAX_K:
            raise SpecDeployError(f"k must be an integer in [1, {MAX_K}], got {self.k!r}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise SpecDeployError(f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min}, {self.ngram_max}")
        if self.layerskip_layers is not None and self.layerskip_layers < 1:
            raise SpecDeployError(f"layerskip_layers must be >= 1, got {self.layerskip_layers}")
        if self.tree_size is not None and not (isinstance(self.tree_size, int) and 0 <= self.tree_size <= 1024):
            raise SpecDeployError(f"tree_size must be an integer in [0, 1024], got {self.tree_size!r}")
        if not isinstance(self.tree_topk, int) or not 1 <= self.tree_topk <= 64:
            raise SpecDeployError(f"tree_topk must be an integer in [1, 64], got {self.tree_topk!r}")
        if self.draft_confidence is not None:
            check_confidence(self.draft_confidence)
        if self.switch not in ("on", "auto"):
            raise SpecDeployError(f"switch must be 'on' or 'auto', got {self.switch!r}")

    @property
    def confidence(self) -> float:
        """The draft confidence this config's proposer runs with."""
        return draft_confidence_for(self.method, self.draft_confidence)

    @classmethod
    def from_vllm(cls, cfg: dict) -> "SpecConfig":
        """Build from vLLM's speculative_config dict ("model" given and no method means a draft model)."""
        method = cfg.get("method") or ("draft" if cfg.get("model") else "ngram")
        method = {"draft_model": "draft"}.get(method, method)
        return cls(
            method=method,
            k=int(cfg.get("num_speculative_tokens", 4)),
            draft=cfg.get("model") if method in TRAINED else None,
            ngram_min=int(cfg.get("prompt_lookup_min", 1)),
            ngram_max=int(cfg.get("prompt_lookup_max", 4)),
        )
