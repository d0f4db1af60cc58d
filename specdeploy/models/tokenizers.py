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


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The special token the chat template puts right after an assistant message (e.g. <|im_end|>), if any."""
    if not tokenizer.chat_template:
        return None
    marker = "specdeploy-end-of-turn-probe"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
                                             tokenize=False)
    except Exception:  # templates that refuse this conversation shape: no end-of-turn token to learn
        return None
    suffix = text[text.find(marker) + len(marker):] if marker in text else ""
    ids = tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix else []
    return ids[0] if ids and ids[0] in set(tokenizer.all_special_ids) else None


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, generation_eos: int | list[int] | None = None) -> list[int]:
    """The ids that end a generation: the generation config's EOS, the tokenizer's, the chat end-of-turn.

    The BOS id is left out when other candidates exist: some transformers versions read a GGUF's
    special tokens so that EOS reports the BOS id (SmolLM2 on 5.17: eos = <|im_start|>), and
    stopping there would run every chat answer past its <|im_end|>.
    """
    eos = generation_eos if isinstance(generation_eos, list) else [generation_eos]
    found = {int(e) for e in eos + [tokenizer.eos_token_id, end_of_turn_id(tokenizer)] if e is not None}
    bos = tokenizer.bos_token_id
    if bos in found and len(found) > 1:
        found.discard(bos)
    return sorted(found)
