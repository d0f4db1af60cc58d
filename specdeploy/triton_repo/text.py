"""Incremental detokenization shared by the served models (prompts are encoded by
`specdeploy.models.tokenizers.encode_prompt`, as `SpecEngine.encode` does).

`text_delta` turns "all ids so far + how many were sent before" into the new piece of text,
statelessly: a piece never ends inside a UTF-8 character split over tokens, nor with the
beginning of a stop string still undecided.
"""
from __future__ import annotations

from transformers import PreTrainedTokenizerBase


def decode(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def visible_text(tokenizer: PreTrainedTokenizerBase, ids: list[int], stop: tuple[str, ...], final: bool) -> str:
    """The text of `ids` that may be shown: cut at a stop string; unless final, without an
    unfinished character or a tail that could still become a stop string."""
    text = decode(tokenizer, ids)
    cut = min((text.find(s) for s in stop if s in text), default=-1)
    if cut >= 0:
        return text[:cut]
    if final:
        return text
    text = text.rstrip("\ufffd")  # a multi-byte character whose last bytes are in a later token
    hold = max((n for s in stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
    return text[: len(text) - hold]


def text_delta(tokenizer: PreTrainedTokenizerBase, ids: list[int], previous: int, stop: tuple[str, ...], final: bool) -> str:
    """New text for a response carrying `ids` (all generated so far), `previous` of them sent before."""
    before = visible_text(tokenizer, ids[:previous], stop, final=False) if previous else ""
    now = visible_text(tokenizer, ids, stop, final)
    return now[len(before):] if now.startswith(before) else now[len(_common_prefix(before, now)):]


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]
