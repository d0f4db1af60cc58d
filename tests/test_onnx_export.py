"""ONNX export with KV-cache I/O: structure, dynamic axes, parity, tied weights, manifests.

Structural tests use a small random-weight Llama (2 layers) with SmolLM2's tokenizer, so
they export in seconds; SmolLM2 itself is exported (once, cached) in test_onnx_runner.py.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specdeploy.build.manifest import read_manifest, tokenizer_hash
from specdeploy.errors import SpecDeployError
from specdeploy.export.onnx import GRAPH_FILE, KVCacheWrapper, OnnxExportConfig, export_model, io_names
from specdeploy.models.loader import LoadedModel
from specdeploy.runtime.onnx_runner import OnnxGraph, load_onnx_engine, load_onnx_runner

LAYERS, KV_HEADS, HEAD_DIM, HIDDEN = 2, 2, 16, 64


def tiny_llama(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=KV_HEADS, tie_word_embeddings=True,
                         max_position_embeddings=512, eos_token_id=2, bos_token_id=1)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny(smollm2) -> LoadedModel:
    return LoadedModel(tiny_llama(len(smollm2.tokenizer)), smollm2.tokenizer, "tiny-llama", "ab" * 32)


@pytest.fixture(scope="module")
def tiny_export(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "target"
    export_model(tiny, out, "target")
    return out


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_checker_names_and_dynamic_axes(tiny_export):
    path = tiny_export / GRAPH_FILE
    onnx.checker.check_model(str(path))
    model = onnx.load(str(path))
    inputs, outputs = io_names(LAYERS)
    assert [i.name for i in model.graph.input] == inputs
    assert [o.name for o in model.graph.output] == outputs
    shapes = {v.name: _dims(v) for v in list(model.graph.input) + list(model.graph.output)}
    assert shapes["input_ids"] == ["batch", "seq"] and shapes["position_ids"] == ["batch", "seq"]
    assert shapes["attention_mask"][0] == "batch" and isinstance(shapes["attention_mask"][1], str)
    assert shapes["past_key_values.1.value"] == ["batch", KV_HEADS, "past", HEAD_DIM]
    assert shapes["present.0.key"][:2] == ["batch", KV_HEADS] and isinstance(shapes["present.0.key"][2], str)
    assert shapes["logits"][:2] == ["batch", "seq"] and shapes["hidden_states"] == ["batch", "seq", HIDDEN]


def test_tied_embedding_stored_once(tiny, tiny_export):
    model = onnx.load(str(tiny_export / GRAPH_FILE))
    vocab = tiny.model.config.vocab_size
    big = [i.name for i in model.graph.initializer if vocab in list(i.dims)]
    assert len(big) == 1, big
    # the file holds the weights once: no more than 10% over the distinct parameter bytes
    param_bytes = read_manifest(tiny_export).info["param_bytes"]
    assert (tiny_export / GRAPH_FILE).stat().st_size < 1.1 * param_bytes


@pytest.mark.parametrize("batch,seq,past", [(1, 5, 0), (2, 3, 4), (3, 1, 7)])
def test_ort_matches_torch_with_kv_inputs(tiny, tiny_export, batch, seq, past):
    graph = OnnxGraph(tiny_export / GRAPH_FILE)
    g = torch.Generator().manual_seed(batch * 10 + past)
    ids = torch.randint(0, tiny.model.config.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    pos = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    kv = [torch.randn(batch, KV_HEADS, past, HEAD_DIM, generator=g) for _ in range(2 * LAYERS)]
    with torch.no_grad():
        ref = KVCacheWrapper(tiny.model)(ids, mask, pos, kv)
    logits, hidden, present = graph.run(ids.numpy(), mask.numpy(), pos.numpy(), [t.numpy() for t in kv])
    assert np.abs(logits - ref[0].numpy()).max() < 1e-4
    assert np.abs(hidden - ref[1].numpy()).max() < 1e-4
    assert len(present) == 2 * LAYERS and present[0].shape == (batch, KV_HEADS, past + seq, HEAD_DIM)
    assert max(np.abs(p - r.numpy()).max() for p, r in zip(present, ref[2:])) < 1e-4


def test_manifest_records_hashes_versions_parity(tiny, tiny_export):
    m = read_manifest(tiny_export)
    raw = json.loads((tiny_export / "manifest.json").read_text())
    assert raw["kind"] == "onnx" and m.files == {"graph": GRAPH_FILE}
    assert m.source_hash == tiny.source_hash and m.tokenizer_hash == tokenizer_hash(tiny.tokenizer)
    assert m.info["opset"] == 18 and m.info["num_layers"] == LAYERS
    assert {"torch", "transformers", "onnx", "onnxruntime"} <= set(m.versions)
    p = m.info["parity"]
    assert p["ok"] and p["argmax_agree"] and p["max_abs_logits"] <= 1e-3 and p["decode_steps"] >= 1
    assert (tiny_export / "tokenizer.json").is_file()


def test_external_data_for_large_weights(tiny, tmp_path):
    m = export_model(tiny, tmp_path / "ext", "target", OnnxExportConfig(external_data_bytes=1, parity_decode_steps=1))
    assert m.files["external_data"] == GRAPH_FILE + ".data"
    assert (tmp_path / "ext" / m.files["external_data"]).stat().st_size > 0
    onnx.checker.check_model(str(tmp_path / "ext" / GRAPH_FILE))
    assert m.info["parity"]["ok"]


def test_refuses_other_model_or_tokenizer(tiny, tiny_export, smollm2):
    with pytest.raises(SpecDeployError, match="built from tiny-llama"):
        load_onnx_runner(tiny_export, source_hash="cd" * 32, what="target x")
    with pytest.raises(SpecDeployError, match="another tokenizer"):
        load_onnx_runner(tiny_export, source_hash=tiny.source_hash, tok_hash="00" * 32)
    from specdeploy.config import SpecConfig

    with pytest.raises(SpecDeployError, match="not from the target smollm2"):
        load_onnx_engine(tiny_export, SpecConfig(method="none"), smollm2)
    with pytest.raises(SpecDeployError, match="no manifest.json"):
        load_onnx_runner(tiny_export.parent)
