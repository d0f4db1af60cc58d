"""ONNX Runtime runner on SmolLM2 (fp32, CPU): speculative greedy through ORT (n-gram, a
draft model that also runs in ORT, and the shipped Medusa / EAGLE heads as ORT graphs, token
trees included) == ORT plain greedy == the torch target's greedy.

SmolLM2 (+ a 2-layer layerskip draft + the Medusa and EAGLE head graphs) is exported once and
cached under the specdeploy cache folder, keyed by the model hash, the exporters' source and
the library versions: the first run pays the export (~2 min on 2 cores), later runs reuse it.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

import specdeploy.export.onnx as onnx_export
import specdeploy.export.onnx_heads as onnx_heads_export
from specdeploy.build.manifest import read_manifest
from specdeploy.config import SamplingParams, SpecConfig
from specdeploy.export.onnx import OnnxExportConfig, export_onnx, resolve_draft
from specdeploy.models.loader import cache_root
from specdeploy.runtime.engine import SpecEngine
from specdeploy.runtime.onnx_heads import OrtEagleHead, OrtMedusaHeads
from specdeploy.runtime.onnx_runner import OnnxRunner, load_onnx_engine, load_onnx_runner
from conftest import assert_matches_reference, greedy_reference

PROMPTS = [
    "Write a Python function that returns the factorial of n.",
    "What is the capital of France? Answer in one sentence.",
    "List three colors of the rainbow.",
    "Translate to French: The cat sleeps on the sofa.",
    "Summarize in one sentence: The meeting was moved from Monday to Wednesday because the manager was sick.",
]
MAX_NEW = 24


def _cache_key(source_hash: str) -> str:
    import onnxruntime
    import transformers

    h = hashlib.sha256(Path(onnx_export.__file__).read_bytes() + Path(onnx_heads_export.__file__).read_bytes())
    h.update(f"{source_hash}|{torch.__version__}|{transformers.__version__}|{onnxruntime.__version__}".encode())
    return h.hexdigest()[:16]


@pytest.fixture(scope="session")
def smollm2_onnx(smollm2) -> Path:
    out = cache_root() / "test-artifacts" / f"onnx-smollm2-{_cache_key(smollm2.source_hash)}"
    if (out / "manifest.json").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # optimize=False: the onnxscript optimizer doubles export time; ORT optimizes at load anyway
    export_onnx(smollm2, tmp, resolve_draft("layerskip:2", smollm2), OnnxExportConfig(optimize=False),
                heads={"medusa": None, "eagle": None})
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def test_export_manifest_and_parity(smollm2, smollm2_onnx):
    bundle = read_manifest(smollm2_onnx)
    assert bundle.kind == "bundle"
    assert bundle.components == {"target": "target", "draft": "draft", "medusa": "medusa", "eagle": "eagle"}
    target = read_manifest(smollm2_onnx / "target")
    assert target.source_hash == smollm2.source_hash
    assert target.info["parity"]["max_abs_logits"] < 1e-3 and target.info["parity"]["argmax_agree"]
    assert target.info["parity"]["tree_nodes"] >= 3 and "hidden_states" in target.info["outputs"]
    assert read_manifest(smollm2_onnx / "draft").info["num_layers"] == 2
    for method in ("medusa", "eagle"):
        m = read_manifest(smollm2_onnx / method)
        assert m.source_hash == smollm2.source_hash and m.info["parity"]["ok"], m.info["parity"]
        assert bundle.info["parity"][method] < 1e-3


def test_rollback_matches_fresh_forward(smollm2, smollm2_onnx):
    runner = load_onnx_runner(smollm2_onnx / "target")
    ids = torch.tensor(smollm2.tokenizer("One two three four five six seven")["input_ids"])
    full = runner.forward(ids).logits
    runner.reset()
    runner.forward(ids[:4])
    runner.forward(torch.tensor([7, 8, 9]))  # rejected draft tokens
    runner.rollback(4)
    assert runner.length == 4
    tail = runner.forward(ids[4:]).logits
    assert torch.allclose(tail, full[4:], atol=1e-4)
    assert isinstance(runner, OnnxRunner) and runner.vocab_size == smollm2.model.config.vocab_size


def test_ort_speculative_greedy_equals_plain_and_torch(smollm2, smollm2_onnx):
    params = SamplingParams(max_new_tokens=MAX_NEW)
    torch_plain = SpecEngine(smollm2, SpecConfig(method="none"))
    plain = load_onnx_engine(smollm2_onnx, SpecConfig(method="none"), smollm2)
    engines = {
        "ort-none": plain,
        "ort-ngram": SpecEngine(smollm2, SpecConfig(method="ngram", k=4), runner=plain.runner),  # one ORT session
        "ort-draft": load_onnx_engine(smollm2_onnx, SpecConfig(method="draft", k=3), smollm2),
    }
    assert isinstance(plain.runner, OnnxRunner)
    assert isinstance(engines["ort-draft"].proposer.runner, OnnxRunner)
    drafted = 0
    for prompt in PROMPTS:
        ids = torch_plain.encode(prompt, max_new_tokens=MAX_NEW)
        expected = torch_plain.generate_ids(ids, params).token_ids
        assert len(expected) > 0
        for name, engine in engines.items():
            r = engine.generate_ids(ids, params)
            assert r.token_ids == expected, (name, prompt)
            if name == "ort-draft":
                drafted += r.stats.proposed
    assert drafted > 0


def test_cli_generate_with_engine(smollm2, smollm2_onnx, capsys):
    from specdeploy.cli import main

    prompt = PROMPTS[1]
    code = main(["generate", "--engine", str(smollm2_onnx), "--prompt", prompt, "--method", "ngram",
                 "--max-new-tokens", "12", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    plain = SpecEngine(smollm2, SpecConfig(method="none"))
    expected = plain.generate(prompt, SamplingParams(max_new_tokens=12)).token_ids
    assert out["token_ids"] == expected


HEAD_PROMPTS = PROMPTS[:3]
HEAD_CASES = [("medusa", 4, 48), ("eagle", 4, 0), ("eagle", 4, 24), ("multi", 4, 24), ("specinfer", 3, 16)]


@pytest.fixture(scope="module")
def head_reference(smollm2):
    return greedy_reference(smollm2, HEAD_PROMPTS, MAX_NEW)


@pytest.mark.parametrize("method, k, tree_size", HEAD_CASES, ids=[f"{m}-k{k}-tree{t}" for m, k, t in HEAD_CASES])
def test_ort_heads_greedy_equals_torch_target(smollm2, smollm2_onnx, head_reference, method, k, tree_size):
    """Target and head both in ORT (trees through the 4D mask + keep_path) == the torch target's greedy."""
    engine = load_onnx_engine(smollm2_onnx, SpecConfig(method=method, k=k, tree_size=tree_size), smollm2)
    assert isinstance(engine.runner, OnnxRunner) and engine.runner.output_hidden
    head_proposer = engine.proposer
    if method == "multi":  # the lookup first, then EAGLE
        head_proposer = head_proposer.model
    elif method == "specinfer":  # the lookup and EAGLE, merged
        head_proposer = head_proposer.proposers[1]
    ort_head = head_proposer.heads if method == "medusa" else head_proposer.step
    assert isinstance(ort_head, OrtMedusaHeads if method == "medusa" else OrtEagleHead)
    assert_matches_reference(engine, head_reference, HEAD_PROMPTS, MAX_NEW)
    assert engine.task_stats.total().accepted > 0


def test_cli_generate_with_engine_and_eagle(smollm2, smollm2_onnx, head_reference, capsys):
    from specdeploy.cli import main

    ids, expected = head_reference[1]
    code = main(["generate", "--engine", str(smollm2_onnx), "--prompt", HEAD_PROMPTS[1], "--method", "eagle",
                 "--k", "3", "--max-new-tokens", str(MAX_NEW), "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["token_ids"] == expected
