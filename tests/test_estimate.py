"""Memory estimate: hand-computed numbers for a tiny config, published 8B/135M sizes, the CLI.

The 16-bit KV cache layout (2 x layers x kv_heads x head_dim per token) is the one TensorRT-LLM
allocates (tensorrt_llm/models/modeling_utils.py kv_dtype; 1 GiB for Llama-3-8B at 8192 tokens).
"""
from __future__ import annotations

import argparse
import json

import pytest
from transformers import LlamaConfig

from specdeploy.build.estimate import add_cli, arch_of, estimate_memory, load_config
from specdeploy.errors import SpecDeployError

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=1000, tie_word_embeddings=False)


def test_tiny_config_by_hand():
    est = estimate_memory(TINY, dtype="bfloat16", batch=2, context=10)
    # weights: per layer q 64*64 + k 64*32 + v 64*32 + o 64*64 = 12288, mlp 3*64*128 = 24576
    # -> 2 * 36864 = 73728; embed + lm_head 2*1000*64 = 128000; norms (2*2 + 1)*64 = 320
    assert est.target.weights_bytes == (73728 + 128000 + 320) * 2
    # kv: 2 (k, v) * 2 layers * 2 kv heads * 16 head_dim * 10 tokens * 2 batch * 2 bytes
    assert est.target.kv_cache_bytes == 2 * 2 * 2 * 16 * 10 * 2 * 2
    # activations: 20 tokens * (2*64 + (4 + 2*2)*16 + 2*128) * 2 bytes + 2 * 1000 * 4 (fp32 logits)
    assert est.target.activation_bytes == 20 * (128 + 128 + 256) * 2 + 8000
    assert est.total == est.target.total == 404096 + 5120 + 28480
    assert est.draft is None and est.rows() == [("target", 404096, 5120, 28480, 437696)]


def test_tied_and_quantized_weights():
    tied = estimate_memory({**TINY, "tie_word_embeddings": True}, batch=1, context=1)
    assert tied.target.weights_bytes == (73728 + 64000 + 320) * 2
    fp8 = estimate_memory(TINY, dtype="fp8", kv_dtype="fp8", batch=1, context=1)
    assert fp8.target.weights_bytes == 73728 * 1 + (128000 + 320) * 2  # embeddings, norms stay 16-bit
    assert fp8.target.kv_cache_bytes == 2 * 2 * 2 * 16 * 1


def test_llama3_8b_bf16():
    est = estimate_memory(load_config("llama-3-8b"), dtype="bfloat16", batch=1, context=8192)
    assert est.target.weights_bytes == 16_060_522_496
    assert est.target.weights_bytes == pytest.approx(16.06e9, rel=1e-3)
    assert est.target.kv_cache_bytes == 2**30  # GQA: 8 kv heads


def test_published_parameter_counts():
    for name, params in (("smollm2-135m", 134_515_008), ("llama-3-70b", 70_553_706_496)):
        arch = arch_of(load_config(name))
        assert arch.linear_params + arch.other_params == params


def test_transformers_config_and_draft():
    cfg = LlamaConfig(**TINY)
    assert estimate_memory(cfg) == estimate_memory(TINY)
    est = estimate_memory(load_config("llama-3-8b"), draft_config=load_config("smollm2"), context=2048)
    assert est.draft is not None and est.total == est.target.total + est.draft.total
    assert [r[0] for r in est.rows()] == ["target", "draft", "total"]
    assert est.rows()[-1][1:] == (est.weights_bytes, est.kv_cache_bytes, est.activation_bytes, est.total)
    assert est.table().row_count == 3


def test_load_config_sources(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    assert load_config(tmp_path) == TINY
    assert load_config(tmp_path / "config.json") == TINY
    assert load_config("SmolLM2")["hidden_size"] == 576
    with pytest.raises(SpecDeployError):
        load_config("llama-9-1t")
    with pytest.raises(SpecDeployError):
        estimate_memory({"hidden_size": 8})
    with pytest.raises(SpecDeployError):
        estimate_memory(TINY, dtype="int3")


def test_cli_json_and_table(capsys):
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["estimate", "--config", "llama-3-8b", "--draft", "smollm2", "--context", "1024", "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["target"]["weights_bytes"] == 16_060_522_496 and out["draft"] is not None
    args = parser.parse_args(["estimate", "--config", "llama-3-70b", "--batch", "4"])
    args.func(args)
    assert "GB" in capsys.readouterr().out
