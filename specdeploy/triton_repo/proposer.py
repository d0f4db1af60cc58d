"""The proposer spec_decode drives, built from the repository's method and the request's k.

`FallbackProposer` keeps a request alive when the draft model fails: the error is
reported once, and from then on the request drafts nothing (plain decoding, which the
verifier makes lossless all the same).
"""
from __future__ import annotations

from typing import Callable

from specdeploy.runtime.proposers import DraftModelProposer, NGramProposer, NoProposer, Proposer
from specdeploy.runtime.types import Context, Draft
from specdeploy.triton_repo.runner import TritonRunner


class FallbackProposer:
    def __init__(self, inner: Proposer, on_failure: Callable[[BaseException], None]) -> None:
        self.inner = inner
        self.on_failure = on_failure
        self.failure: BaseException | None = None

    def reset(self) -> None:
        self._guard(self.inner.reset)

    def propose(self, ctx: Context, k: int) -> Draft:
        draft = self._guard(lambda: self.inner.propose(ctx, k))
        return draft if draft is not None else Draft.empty()

    def _guard(self, call):
        if self.failure is not None:
            return None
        try:
            return call()
        except Exception as e:  # noqa: BLE001 - any draft failure means "decode without drafts"
            self.failure = e
            self.on_failure(e)
            return None


def build_proposer(method: str, *, draft_runner: TritonRunner | None = None, ngram_min: int = 1, ngram_max: int = 4,
                   draft_confidence: float = 0.0) -> Proposer:
    if method == "none":
        return NoProposer()
    if method == "ngram":
        return NGramProposer(ngram_min, ngram_max)
    if method in ("draft", "layerskip"):
        if draft_runner is None:
            raise ValueError(f"method {method!r} needs a draft runner")
        return DraftModelProposer(draft_runner, draft_confidence)
    raise ValueError(f"unknown method {method!r}")
