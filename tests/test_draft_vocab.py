"""Draft vocabularies (models/draft_vocab.py): the LM head over the vocabulary's rows, choosing one from counts,
corrupt ones refused on load for every kind of draft, and the compiled runner's DraftLM scoring the same logits as
the Hugging Face one."""
from __future__ import annotations

import shutil

import pytest
import torch

from specdeploy.errors import SpecDeployError
from specdeploy.models import artifacts, draft_lm, eagle, medusa
from specdeploy.models.draft_vocab import DraftVocabLMHead, frequent_ids


def test_draft_vocabulary_lm_head_scores_only_its_ids():
    """The LM head's logits at the vocabulary's ids, -inf everywhere else, any leading shape."""
    g = torch.Generator().manual_seed(0)
    w, h = torch.randn(500, 16, generator=g), torch.randn(2, 3, 16, generator=g)
    ids = torch.tensor([0, 7, 42, 99, 499])
    got = DraftVocabLMHead(w, ids)(h)
    keep = torch.zeros(500, dtype=torch.bool)
    keep[ids] = True
    torch.testing.assert_close(got, (h @ w.T).masked_fill(~keep, float("-inf")))
    assert set(got.argmax(-1).flatten().tolist()) <= set(ids.tolist())


def test_frequent_ids_are_the_fewest_that_cover_the_share():
    counts = torch.tensor([5, 0, 50, 1, 30, 14])  # 100 tokens: ids 2, 4, 5, 0, 3 by frequency
    assert frequent_ids(counts, 0.5).tolist() == [2]
    assert frequent_ids(counts, 0.8).tolist() == [2, 4]
    assert frequent_ids(counts, 0.81).tolist() == [2, 4, 5]
    assert frequent_ids(counts, 1.0).tolist() == [0, 2, 3, 4, 5]  # never an id the data lacks
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(SpecDeployError, match="coverage"):
            frequent_ids(counts, bad)
    with pytest.raises(SpecDeployError, match="no answer tokens"):
        frequent_ids(torch.zeros(6, dtype=torch.long), 0.5)


LOADERS = {"eagle": lambda folder, target: eagle.load(folder, target),
           "medusa": lambda folder, target: medusa.load(folder, target),
           "draft_lm": lambda folder, target: draft_lm.load(folder, target)}


@pytest.mark.parametrize("kind", sorted(LOADERS))
@pytest.mark.parametrize("vocab, error", [
    (torch.tensor([5, 3, 9]), "ascending"),
    (torch.tensor([3, 3, 9]), "ascending"),
    (torch.tensor([0, 49152]), "ascending"),
    (torch.tensor([-1, 4]), "ascending"),
    (torch.tensor([1.0, 2.0]), "token ids"),
    (torch.zeros(0, dtype=torch.long), "token ids"),
    (torch.tensor([[1, 2]]), "token ids"),
], ids=["unsorted", "repeated", "over-vocab", "negative", "float", "empty", "2-d"])
def test_a_corrupt_draft_vocabulary_is_refused(smollm2, tmp_path, kind, vocab, error):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / kind
    shutil.copytree(artifacts.resolve(kind), folder)
    weights = load_file(str(folder / artifacts.WEIGHTS))
    save_file({**weights, "draft_vocab": vocab}, str(folder / artifacts.WEIGHTS))
    with pytest.raises(SpecDeployError, match=error):
        LOADERS[kind](folder, smollm2)


def test_shipped_drafts_carry_a_draft_vocabulary(smollm2):
    head, _ = eagle.load(None, smollm2)
    heads, _, _ = medusa.load(None, smollm2)
    model = draft_lm.load(None, smollm2)
    assert isinstance(model.lm_head, DraftVocabLMHead) and model.lm_head.weight.shape[0] == head.draft_vocab.numel()
    for ids in (head.draft_vocab, heads.draft_vocab, model.lm_head.ids):
        assert 0 < ids.numel() < smollm2.model.config.vocab_size and torch.equal(ids, head.draft_vocab)
    assert draft_lm.load(None, smollm2, draft_vocab=False).lm_head is smollm2.model.lm_head  # for training


def test_compiled_draft_lm_scores_its_draft_vocabulary_as_the_hf_one(smollm2):
    """LeanLlama of the shipped DraftLM (the compiled runner's and the batched engine's draft) gives the HF
    model's logits: -inf at the same ids, the rest equal up to float32 rounding."""
    from specdeploy.runtime.cuda_runner import LeanLlama

    model = draft_lm.load(None, smollm2)
    lean = LeanLlama.from_hf(model, kernels="torch")
    assert torch.equal(lean.vocab_ids, model.lm_head.ids) and lean.lm_head.shape[0] == lean.vocab_ids.numel()
    ids = torch.tensor([[1, 504, 3458, 314, 260, 1463]])
    with torch.no_grad():
        ref = model(input_ids=ids).logits[0]
        cache = lean.new_cache(1, 64)
        got = lean.forward(cache, ids, torch.arange(6)[None], None, 64)[0][0]
    assert torch.equal(ref.isinf(), got.isinf()) and int(ref.isinf().sum(-1)[0]) == 49152 - lean.vocab_ids.numel()
    torch.testing.assert_close(got[~got.isinf()], ref[~ref.isinf()], atol=1e-4, rtol=1e-4)
