"""Checks that a draft speaks the target's tokenizer."""
from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from specdeploy.errors import SpecDeployError

_SPECIAL = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


def check_compatible(target: PreTrainedTokenizerBase, draft: PreTrainedTokenizerBase) -> None:
    """Raise SpecDeployError unless both tokenizers have the same vocabulary and special tokens."""
    target_vocab, draft_vocab = target.get_vocab(), draft.get_vocab()
    if target_vocab != draft_vocab:
        only_target = len(target_vocab.keys() - draft_vocab.keys())
        only_draft = len(draft_vocab.keys() - target_vocab.keys())
        moved = sum(1 for t, i in draft_vocab.items() if target_vocab.get(t, i) != i)
        raise SpecDeployError(
            f"draft tokenizer does not match the target's: vocab sizes {len(target_vocab)} vs {len(draft_vocab)}, "
            f"{only_target} tokens only in the target, {only_draft} only in the draft, {moved} with other ids"
        )
    for name in _SPECIAL:
        a, b = getattr(target, name, None), getattr(draft, name, None)
        if a != b:
            raise SpecDeployError(f"draft tokenizer does not match the target's: {name} is {b} in the draft, {a} in the target")


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, raw: bool = False) -> list[int]:
    """Token ids of a user prompt: through the chat template unless `raw` (or the tokenizer has none)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise SpecDeployError("empty prompt")
    if raw or not tokenizer.chat_template:
        text = prompt
    else:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=raw)["input_ids"]
    if not ids:
        raise SpecDeployError("the prompt encodes to no tokens")
    return ids
