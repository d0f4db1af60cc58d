"""Memory estimate: hand-computed numbers for a tiny config, published 8B/135M sizes, the CLI,
and the estimate against the peak memory measured on an H100 (results/gpu/run*_spec.json).

The 16-bit KV cache layout (2 x layers x kv_heads x head_dim per token) is the one TensorRT-LLM
allocates (tensorrt_llm/models/modeling_utils.py kv_dtype; 1 GiB for Llama-3-8B at 8192 tokens).
"""
from __future__ import annotations

import argparse
import json

import pytest
from transformers import LlamaConfig

from pathlib import Path

from specdeploy.build.estimate import WORKSPACE_BYTES, EngineShape, add_cli, arch_of, estimate_memory, load_config
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
    assert est.target.total == 404096 + 5120 + 28480
    # overhead: two cuBLAS workspaces of 32 MiB (the default stream and one capture stream)
    assert est.overhead_bytes == 2 * 32 * 2**20 and est.total == est.target.total + est.overhead_bytes
    assert est.draft is None and est.rows() == [("target", 404096, 5120, 28480, 437696),
                                                ("cuBLAS workspaces (2)", 0, 0, 0, 2 * 32 * 2**20),
                                                ("total", 404096, 5120, 28480, 437696 + 2 * 32 * 2**20)]


def test_engine_shape_and_layerskip_draft_by_hand():
    engine = EngineShape(k=3, max_num_tokens=6, draft_max_num_tokens=4, streams=0)
    est = estimate_memory(TINY, batch=2, context=10, engine=engine, draft_shares_weights=True,
                          draft_config={**TINY, "num_hidden_layers": 1})
    per_token = (128 + 128 + 256) * 2
    # the target scores k + 1 = 4 rows per sequence in float32; its largest forward is 6 tokens
    assert est.target.activation_bytes == 6 * per_token + 2 * 4 * 1000 * 4
    # the draft: one row per sequence, its own largest forward, no weights of its own, its own KV
    assert est.draft.activation_bytes == 4 * per_token + 2 * 1000 * 4
    assert est.draft.weights_bytes == 0 and est.draft.kv_cache_bytes == est.target.kv_cache_bytes // 2
    assert est.overhead_bytes == 0 and est.total == est.target.total + est.draft.total


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
    assert est.draft is not None and est.total == est.target.total + est.draft.total + est.overhead_bytes
    assert [r[0] for r in est.rows()] == ["target", "draft", "cuBLAS workspaces (2)", "total"]
    assert est.rows()[-1][1:] == (est.weights_bytes, est.kv_cache_bytes, est.activation_bytes, est.total)
    assert est.table().row_count == 4


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
    args = parser.parse_args(["estimate", "--config", "smollm2", "--draft", "layerskip:7", "--k", "4", "--batch", "32",
                              "--context", "641", "--max-num-tokens", "160", "--streams", "1", "--json"])
    args.func(args)
    out = json.loads(capsys.readouterr().out)
    assert out["draft"]["weights_bytes"] == 0 and out["draft"]["kv_cache_bytes"] == 110_272_512  # as measured
    assert out["overhead_bytes"] == 32 * 2**20 and out["engine"]["k"] == 4
    for n in (99, 30, 0):  # 30 = all of SmolLM2's layers: no early exit, the runtime refuses it too
        args = parser.parse_args(["estimate", "--config", "smollm2", "--draft", f"layerskip:{n}"])
        with pytest.raises(SpecDeployError, match="layerskip"):
            args.func(args)


# ----------------------------------------------------------------------------- estimate vs measured (H100)
#
# The H100 runs (specdeploy/bench/gpu_bench.py) record, per configuration of the batched engine,
# the peak of torch.cuda.max_memory_allocated() and what the process held before. How the
# configuration's own memory is reconstructed from them, and why, is the docstring of
# specdeploy/bench/memory_check.py. Tolerances:
# - weights and KV caches: exact (byte for byte);
# - cuBLAS workspaces: resident memory grows by whole 32 MiB workspaces plus < 8 MiB of leftovers;
# - weights + KV + working set: within 5 %. The static terms are exact, so the error is the
#   working set's (kernel temporaries, bf16 vs the formula's fp32 logits), at most 3.5 % here,
#   and within one workspace (32 MiB) in absolute terms; a mis-modelled term of the size that
#   matters for planning (prefill unchunked, a layerskip draft's weights counted again, fp32 KV)
#   moves the estimate by 25 % or more and fails.

RUNS = [Path(__file__).resolve().parents[1] / "results" / "gpu" / f"run{i}_spec.json" for i in (1, 2)]


@pytest.fixture(scope="module")
def measured():
    from specdeploy.bench.memory_check import compare_file

    return [r for path in RUNS for r in compare_file(path)]


def test_measured_records_cover_both_runs(measured):
    comparable = [r for r in measured if r.comparable]
    assert len(measured) == 24 and len(comparable) == 11
    assert {r.batch for r in comparable} == {1, 32} and {r.method for r in comparable} == {"none", "ngram", "draft"}
    assert {r.k for r in comparable} == {0, 4, 8} and all(r.estimate.dtype == "bfloat16" for r in measured)


def test_static_terms_equal_the_measured_allocation(measured):
    for r in measured:
        e, s = r.estimate, r.static
        assert e.target.weights_bytes == s["target_weights"], r.name
        assert e.target.kv_cache_bytes == s["target_kv_cache"], (r.name, r.batch)
        assert (e.draft.kv_cache_bytes if e.draft else 0) == s["draft_kv_cache"], (r.name, r.batch)
        assert (e.draft.weights_bytes if e.draft else 0) == s["draft_weights_extra"] == 0  # layerskip shares


def test_workspace_term_is_what_resident_memory_grew_by(measured):
    from specdeploy.bench.memory_check import LEFTOVER_LIMIT

    assert WORKSPACE_BYTES == 32 * 2**20  # torch's default on Hopper (CublasHandlePool.cpp, :4096:8)
    comparable = [r for r in measured if r.comparable]
    assert all(0 <= r.leftover < LEFTOVER_LIMIT for r in comparable), [(r.name, r.leftover) for r in comparable]
    assert [r.new_workspaces for r in comparable[:2]] == [16, 16]  # then torch's 32-stream pool is used up
    assert all(r.new_workspaces == 0 for r in comparable[2:])


def test_configuration_memory_within_tolerance(measured):
    from specdeploy.bench.memory_check import TOTAL_TOLERANCE, WORKING_SET_SLACK

    assert TOTAL_TOLERANCE == 0.05
    for r in (r for r in measured if r.comparable):
        label = f"{r.name} {r.switch} batch {r.batch} k {r.k}"
        assert abs(r.rel_error) <= TOTAL_TOLERANCE, (label, r.estimated, r.measured)
        assert r.measured_working_set > 0, label
        assert abs(r.estimate.activation_bytes - r.measured_working_set) <= WORKING_SET_SLACK, label
    # the estimator's default (every slot prefilled whole at once) is 25 % or more over at batch 32:
    # the engine's largest forward is what makes the estimate tight
    b32 = [r for r in measured if r.comparable and r.batch == 32]
    assert b32 and all((r.unchunked_total - r.measured) / r.measured > 0.25 for r in b32)


def test_report_is_the_generated_one(measured):
    """results/estimate_vs_measured.md is exactly what `python -m specdeploy.bench.memory_check` writes."""
    from specdeploy.bench.memory_check import render

    sources = [str(p.relative_to(RUNS[0].parents[2])) for p in RUNS]
    report = RUNS[0].parents[1] / "estimate_vs_measured.md"
    assert report.read_text() == render(measured, sources)
