"""ONNX export with KV-cache I/O: structure, dynamic axes, parity, tied weights, manifests,
token trees (4D mask) in the ORT runner, and the Medusa / EAGLE head graphs.

Structural tests use a small random-weight Llama (2 layers) with SmolLM2's tokenizer and
random heads, so they export in seconds; SmolLM2 itself is exported (once, cached) in
test_onnx_runner.py.
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
from specdeploy.runtime.onnx_runner import OnnxGraph, OnnxRunner, causal_mask, load_onnx_engine, load_onnx_runner

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
    assert shapes["attention_mask"][:3] == ["batch", 1, "seq"] and isinstance(shapes["attention_mask"][3], str)
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
        ref = KVCacheWrapper(tiny.model)(ids, torch.from_numpy(causal_mask(mask.numpy(), seq)), pos, kv)
    # a 2D padding mask: the graph gets its causal 4D mask
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
    assert p["tree_nodes"] >= 3
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


def test_causal_mask_from_padding():
    pad = np.array([[0, 1, 1, 1], [1, 1, 1, 1]])
    m = causal_mask(pad, 2)  # the last 2 of 4 positions
    assert m.shape == (2, 1, 2, 4)
    assert m[0, 0].tolist() == [[0, 1, 1, 0], [0, 1, 1, 1]]  # padding key 0 masked
    assert m[1, 0].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert causal_mask(np.array([[0, 0, 1]]), 3)[0, 0, 0].tolist() == [1, 0, 0]  # a padded query sees itself


def test_runner_token_tree_and_keep_path_match_torch(tiny, tiny_export):
    """One tree forward (4D mask, depth positions) and keep_path, as TorchRunner does them."""
    from specdeploy.runtime.runner import TorchRunner

    ort, ref = OnnxRunner(OnnxGraph(tiny_export / GRAPH_FILE), output_hidden=True), TorchRunner(tiny.model, output_hidden=True)
    prompt = torch.tensor([5, 9, 17, 33, 2, 8, 41])
    tree = torch.tensor([-1, 0, 0, 1, 2, 2])  # pending token, 2 children, 3 grandchildren
    nodes = torch.tensor([12, 100, 200, 300, 400, 500])
    for runner in (ort, ref):
        runner.forward(prompt)
    a, b = ort.forward(nodes, tree), ref.forward(nodes, tree)
    assert ort.supports_tree and (a.logits - b.logits).abs().max() < 1e-4
    assert (a.hidden - b.hidden).abs().max() < 1e-4
    for runner in (ort, ref):
        runner.keep_path(len(prompt) + 1, [len(prompt) + 2, len(prompt) + 5])  # accept nodes 2, 5
    assert ort.length == ref.length == len(prompt) + 3
    a, b = ort.forward(torch.tensor([7])), ref.forward(torch.tensor([7]))
    assert (a.logits - b.logits).abs().max() < 1e-4
    # the kept path equals feeding it as a chain
    chain = OnnxRunner(OnnxGraph(tiny_export / GRAPH_FILE))
    c = chain.forward(torch.cat([prompt, torch.tensor([12, 200, 500, 7])]))
    assert (c.logits[-1] - a.logits[-1]).abs().max() < 1e-4


# ----------------------------------------------------------------------------- head graphs

MEDUSA_TREE = [(0,), (1,), (0, 0), (1, 0), (0, 0, 0)]


@pytest.fixture(scope="module")
def tiny_heads(tiny, tmp_path_factory):
    """Random (non-zero) Medusa heads and an EAGLE head (with a draft vocabulary) saved as artifacts for the
    tiny target, and their export."""
    from specdeploy.export.onnx_heads import export_heads
    from specdeploy.models import artifacts, eagle, medusa

    root = tmp_path_factory.mktemp("heads")
    torch.manual_seed(1)
    heads = medusa.MedusaHeads(HIDDEN, 3)
    for p in heads.parameters():
        torch.nn.init.normal_(p, 0.0, 0.05)
    head = eagle.EagleHead.init_from_target(tiny.model)
    for p in head.parameters():
        p.data += 0.05 * torch.randn_like(p)
    head.draft_vocab = torch.arange(1, tiny.model.config.vocab_size, 2)  # its graph scores these rows only
    meta = {"target_hash": tiny.source_hash, "tokenizer_hash": artifacts.tokenizer_hash(tiny.tokenizer)}
    medusa.save(heads, root / "medusa-artifact", meta, MEDUSA_TREE)
    eagle.save(head, root / "eagle-artifact", meta)
    manifests = export_heads(tiny, root / "onnx", {"medusa": root / "medusa-artifact", "eagle": root / "eagle-artifact"},
                             OnnxExportConfig(parity_decode_steps=1))
    return root, manifests


def test_head_graphs_checker_names_axes_parity(tiny_heads):
    from specdeploy.export.onnx_heads import EAGLE_IO, MEDUSA_IO

    root, manifests = tiny_heads
    for method, io in (("medusa", MEDUSA_IO), ("eagle", EAGLE_IO)):
        path = root / "onnx" / method / GRAPH_FILE
        onnx.checker.check_model(str(path))
        model = onnx.load(str(path))
        assert [i.name for i in model.graph.input] == io[0] and [o.name for o in model.graph.output] == io[1]
        m = read_manifest(root / "onnx" / method)
        assert m.kind == "onnx" and m.name == method and m.info["graph"] == method
        p = m.info["parity"]
        assert p["ok"] and p["argmax_agree"] and p["max_abs_logits"] < 1e-4, p
        assert m.info["head_sha256"] and m.source_hash == "ab" * 32
    shapes = {v.name: _dims(v) for v in onnx.load(str(root / "onnx/eagle" / GRAPH_FILE)).graph.input}
    assert shapes["attention_mask"][:3] == ["batch", 1, "seq"] and shapes["past_key_values.0.key"] == ["batch", KV_HEADS, "past", HEAD_DIM]
    assert read_manifest(root / "onnx/medusa").info["tree"] == [list(p) for p in MEDUSA_TREE]
    assert manifests["eagle"].info["parity"]["max_abs_kv"] < 1e-4 and manifests["eagle"].info["parity"]["tree_width"] >= 2


def test_parity_differences_see_infinities_and_nans():
    """-inf logits (outside a draft vocabulary) must sit at the same places; a NaN never reads as agreement."""
    from specdeploy.export.onnx import max_abs_diff

    inf = float("inf")
    a = torch.tensor([[0.5, -inf, 2.0]])
    assert max_abs_diff(a, torch.tensor([[0.25, -inf, 2.0]])) == 0.25
    assert max_abs_diff(a, torch.tensor([[0.5, 3.0, 2.0]])) == inf
    assert max_abs_diff(a, torch.tensor([[0.5, inf, 2.0]])) == inf
    assert max_abs_diff(a, torch.tensor([[float("nan"), -inf, 2.0]])) == inf
    assert max_abs_diff(torch.full((2,), -inf), torch.full((2,), -inf)) == 0.0


def test_eagle_graph_stores_tied_embedding_once(tiny, tiny_heads):
    root, _ = tiny_heads
    model = onnx.load(str(root / "onnx/eagle" / GRAPH_FILE))
    vocab = tiny.model.config.vocab_size
    assert len([i.name for i in model.graph.initializer if vocab in list(i.dims)]) == 1


def test_ort_head_proposers_draft_what_torch_heads_draft(tiny, tiny_heads):
    """The ORT adapters behind MedusaProposer / EagleProposer give the torch heads' drafts."""
    from specdeploy.config import SamplingParams, SpecConfig
    from specdeploy.models import eagle, medusa
    from specdeploy.runtime.head_proposers import EagleProposer, MedusaProposer
    from specdeploy.runtime.onnx_heads import onnx_head_proposer
    from specdeploy.runtime.types import Context

    root, _ = tiny_heads
    heads, tree, _ = medusa.load(root / "medusa-artifact", tiny)
    head, _ = eagle.load(root / "eagle-artifact", tiny)
    embed, lm_head = tiny.model.get_input_embeddings(), tiny.model.get_output_embeddings()
    ids = [5, 9, 17, 33, 2, 8, 41, 7]
    with torch.no_grad():
        hidden = tiny.model(torch.tensor([ids[:-1]]), output_hidden_states=True).hidden_states[-1][0]
    for k, size in ((3, len(tree)), (2, 0)):  # the artifact's whole tree, a chain
        spec = SpecConfig(method="medusa", k=k, tree_size=size, draft_confidence=0)  # random heads: no cut
        ort, ref = onnx_head_proposer(spec, root / "onnx/medusa", tiny), MedusaProposer(heads, lm_head, tree[:size])
        ctx = Context(list(ids), 4, SamplingParams(), target_hidden=hidden)
        a, b = ort.propose(ctx, k), ref.propose(ctx, k)
        assert torch.equal(a.tokens, b.tokens) and (a.parents is None) == (b.parents is None)
    for k, size in ((3, 6), (3, 0)):
        spec = SpecConfig(method="eagle", k=k, tree_size=size, tree_topk=3)
        ort, ref = onnx_head_proposer(spec, root / "onnx/eagle", tiny), EagleProposer.from_head(head, embed, lm_head, tree_size=size, topk=3)
        for n in (6, 8):  # a prefill, then one more committed token on top of the head's cache
            ctx = Context(list(ids[:n]), 4, SamplingParams(), target_hidden=hidden[: n - 1])
            a, b = ort.propose(ctx, k), ref.propose(ctx, k)
            assert torch.equal(a.tokens, b.tokens), (k, size, n)
            assert (a.parents is None and b.parents is None) or torch.equal(a.parents, b.parents)


def test_head_graph_refuses_another_target(tiny_heads, smollm2):
    from specdeploy.config import SpecConfig
    from specdeploy.runtime.onnx_heads import onnx_head_proposer

    root, _ = tiny_heads
    with pytest.raises(SpecDeployError, match="built from"):
        onnx_head_proposer(SpecConfig(method="eagle"), root / "onnx/eagle", smollm2)


def test_bundle_with_heads_builds_int8_and_runs_losslessly(tiny, tiny_heads, tmp_path):
    """export --method medusa,eagle writes the heads into the bundle; an ORT int8 build copies them;
    EAGLE trees over the int8 ORT target give that target's own greedy output."""
    from specdeploy.build.engine import build_from_onnx
    from specdeploy.config import SamplingParams, SpecConfig
    from specdeploy.export.onnx import export_onnx
    from specdeploy.runtime.onnx_heads import OrtEagleHead

    root, _ = tiny_heads
    heads = {"medusa": root / "medusa-artifact", "eagle": root / "eagle-artifact"}
    export_onnx(tiny, tmp_path / "exp", config=OnnxExportConfig(parity_decode_steps=1), heads=heads)
    assert read_manifest(tmp_path / "exp").components == {"target": "target", "medusa": "medusa", "eagle": "eagle"}
    build_from_onnx(tmp_path / "exp", tmp_path / "int8", target_quant="int8")
    assert read_manifest(tmp_path / "int8" / "eagle").quant["algo"] == "none"
    assert read_manifest(tmp_path / "int8" / "target").quant["algo"] == "ort_dynamic_int8"
    plain = load_onnx_engine(tmp_path / "int8", SpecConfig(method="none"), tiny)
    tree = load_onnx_engine(tmp_path / "int8", SpecConfig(method="eagle", k=3, tree_size=8, tree_topk=3), tiny)
    assert isinstance(tree.proposer.step, OrtEagleHead)
    params = SamplingParams(max_new_tokens=12)
    for prompt in ([5, 9, 17, 33, 2, 8], [100, 200, 300]):
        assert tree.generate_ids(prompt, params).token_ids == plain.generate_ids(prompt, params).token_ids
    assert tree.task_stats.total().proposed > 0


def test_cli_export_method_eagle(tiny, tiny_heads, tmp_path, monkeypatch, capsys):
    """`specdeploy export --format onnx --method eagle --head PATH` writes target + eagle with a bundle manifest."""
    import specdeploy.models.loader as loader
    from specdeploy.cli import main

    root, _ = tiny_heads
    monkeypatch.setattr(loader, "load_model", lambda *a, **k: tiny)
    code = main(["export", "--format", "onnx", "--target", "tiny", "--method", "eagle", "--head", str(root / "eagle-artifact"),
                 "--out", str(tmp_path / "exp")])
    assert code == 0 and "eagle" in capsys.readouterr().out
    bundle = read_manifest(tmp_path / "exp")
    assert bundle.components == {"target": "target", "eagle": "eagle"} and bundle.info["parity"]["eagle"] < 1e-4
