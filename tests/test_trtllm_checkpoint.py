"""TensorRT-LLM checkpoint export: config.json keys, tensor names, per-rank splits, quantized layouts.

The expected format comes from NVIDIA/TensorRT-LLM (TensorRT-LLM itself is not run here):
- docs/source/architecture/checkpoint.md: config fields, rank{N}.safetensors, tensor names,
  FP8 `weights_scaling_factor` / `activation_scaling_factor`, `kv_cache_scaling_factor`.
- tensorrt_llm/models/llama/convert.py: mlp.fc = gate_proj, mlp.gate = up_proj, q/k/v split
  per rank then fused, dup_kv_weight when kv heads < tp, lm_head padded then split on dim 0,
  dense/proj split on dim 1.
- tensorrt_llm/models/convert_utils.py: split (torch.chunk), dup_kv_weight.
- tensorrt_llm/models/llama/config.py, tensorrt_llm/models/modeling_utils.py: config keys,
  QuantConfig fields.
- tensorrt_llm/quantization/layers.py: FP8Linear / Int8SmoothQuantLinear parameter shapes/dtypes.
- tensorrt_llm/mapping.py: rank = pp_rank * tp + tp_rank, pp_layers.
- tensorrt_llm/models/medusa/{config,model,weight}.py and tensorrt_llm/models/eagle/
  {config,model,weight}.py: Medusa and EAGLE config keys and tensor names.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from specdeploy.errors import SpecDeployError
from specdeploy.export.trtllm_checkpoint import EagleDraft, export_trtllm_checkpoint

H, HEADS, KV, HD, INTER, VOCAB, LAYERS = 64, 4, 2, 16, 128, 1000, 2


def tiny(vocab: int = VOCAB, tied: bool = False, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV,
                      intermediate_size=INTER, vocab_size=vocab, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny()


def export(model, tmp_path, name="ckpt", **kw):
    out = export_trtllm_checkpoint(model, tmp_path / name, **kw)
    config = json.loads((out / "config.json").read_text())
    ranks = [load_file(str(out / f"rank{r}.safetensors")) for r in range(config["mapping"]["world_size"])]
    return config, ranks


def hf(model, name):
    return dict(model.named_parameters())[name].detach()


def test_config_json(model, tmp_path):
    config, _ = export(model, tmp_path, tp_size=2, dtype="float16")
    assert config["architecture"] == "LlamaForCausalLM"
    assert config["dtype"] == "float16"
    expect = {"vocab_size": VOCAB, "hidden_size": H, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
              "num_key_value_heads": KV, "intermediate_size": INTER, "head_size": HD, "hidden_act": "silu",
              "norm_epsilon": 1e-6, "position_embedding_type": "rope_gpt_neox", "rotary_base": 10000.0,
              "rotary_scaling": None, "max_position_embeddings": 2048, "tie_word_embeddings": False,
              "use_parallel_embedding": False, "embedding_sharding_dim": 0, "logits_dtype": "float32"}
    assert {k: config[k] for k in expect} == expect
    assert config["mapping"] == {"world_size": 2, "tp_size": 2, "pp_size": 1}
    assert config["quantization"]["quant_algo"] is None and config["quantization"]["kv_cache_quant_algo"] is None
    assert (tmp_path / "ckpt" / "specdeploy_manifest.json").is_file()


def test_rotary_scaling_from_rope_parameters(tmp_path):
    m = tiny()
    m.config.rope_parameters = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192}
    config, _ = export(m, tmp_path)
    assert config["rotary_base"] == 500000.0
    assert config["rotary_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("tp", [1, 2])
def test_names_and_shapes(model, tmp_path, tp):
    _, ranks = export(model, tmp_path, tp_size=tp)
    qkv_rows = (HEADS + 2 * KV) * HD // tp
    for tensors in ranks:
        expect = {"transformer.vocab_embedding.weight": (VOCAB, H), "transformer.ln_f.weight": (H,),
                  "lm_head.weight": (VOCAB // tp, H)}
        for i in range(LAYERS):
            p = f"transformer.layers.{i}."
            expect.update({p + "attention.qkv.weight": (qkv_rows, H), p + "attention.dense.weight": (H, H // tp),
                           p + "mlp.fc.weight": (INTER // tp, H), p + "mlp.gate.weight": (INTER // tp, H),
                           p + "mlp.proj.weight": (H, INTER // tp), p + "input_layernorm.weight": (H,),
                           p + "post_layernorm.weight": (H,)})
        assert {k: tuple(v.shape) for k, v in tensors.items()} == expect
        assert all(v.dtype == torch.bfloat16 for v in tensors.values())


def test_rank_splits_recover_weights(model, tmp_path):
    tp = 2
    _, ranks = export(model, tmp_path, tp_size=tp, dtype="float32")
    q_rows, kv_rows = HEADS * HD // tp, KV * HD // tp
    for i in range(LAYERS):
        hp, p = f"model.layers.{i}.", f"transformer.layers.{i}."
        qkv = [r[p + "attention.qkv.weight"] for r in ranks]
        q = torch.cat([t[:q_rows] for t in qkv])
        k = torch.cat([t[q_rows:q_rows + kv_rows] for t in qkv])
        v = torch.cat([t[q_rows + kv_rows:] for t in qkv])
        torch.testing.assert_close(q, hf(model, hp + "self_attn.q_proj.weight"), rtol=0, atol=0)
        torch.testing.assert_close(k, hf(model, hp + "self_attn.k_proj.weight"), rtol=0, atol=0)
        torch.testing.assert_close(v, hf(model, hp + "self_attn.v_proj.weight"), rtol=0, atol=0)
        cat = lambda name, dim: torch.cat([r[p + name] for r in ranks], dim=dim)  # noqa: E731
        torch.testing.assert_close(cat("attention.dense.weight", 1), hf(model, hp + "self_attn.o_proj.weight"))
        torch.testing.assert_close(cat("mlp.fc.weight", 0), hf(model, hp + "mlp.gate_proj.weight"))
        torch.testing.assert_close(cat("mlp.gate.weight", 0), hf(model, hp + "mlp.up_proj.weight"))
        torch.testing.assert_close(cat("mlp.proj.weight", 1), hf(model, hp + "mlp.down_proj.weight"))
        for r in ranks:
            torch.testing.assert_close(r[p + "post_layernorm.weight"], hf(model, hp + "post_attention_layernorm.weight"))
    torch.testing.assert_close(torch.cat([r["lm_head.weight"] for r in ranks]), hf(model, "lm_head.weight"))
    torch.testing.assert_close(ranks[1]["transformer.vocab_embedding.weight"], hf(model, "model.embed_tokens.weight"))


def test_kv_heads_duplicated_when_fewer_than_tp(model, tmp_path):
    _, ranks = export(model, tmp_path, tp_size=4, dtype="float32")  # 2 kv heads, 4 ranks
    k = hf(model, "model.layers.0.self_attn.k_proj.weight").reshape(KV, HD, H)
    v = hf(model, "model.layers.0.self_attn.v_proj.weight").reshape(KV, HD, H)
    q = hf(model, "model.layers.0.self_attn.q_proj.weight").reshape(HEADS, HD, H)
    for r, tensors in enumerate(ranks):
        qkv = tensors["transformer.layers.0.attention.qkv.weight"]  # [q head, k head, v head] rows
        assert qkv.shape == (3 * HD, H)
        torch.testing.assert_close(qkv[:HD], q[r])
        torch.testing.assert_close(qkv[HD:2 * HD], k[r // 2])  # dup_kv_weight: h0, h0, h1, h1
        torch.testing.assert_close(qkv[2 * HD:], v[r // 2])


def test_vocab_padding_and_tied_embeddings(tmp_path):
    m = tiny(vocab=1001, tied=True)
    config, ranks = export(m, tmp_path, tp_size=2, dtype="float32")
    assert config["vocab_size"] == 1001 and config["tie_word_embeddings"] is True
    heads = [r["lm_head.weight"] for r in ranks]
    assert [h.shape[0] for h in heads] == [501, 501]  # pad_vocab_size(1001, 2) = 1002
    lm = torch.cat(heads)
    torch.testing.assert_close(lm[:1001], hf(m, "model.embed_tokens.weight"))
    assert torch.count_nonzero(lm[1001:]) == 0


def test_pipeline_parallel_layout(model, tmp_path):
    _, ranks = export(model, tmp_path, pp_size=2, dtype="float32")
    first, last = ranks
    assert "transformer.vocab_embedding.weight" in first and "lm_head.weight" not in first
    assert "lm_head.weight" in last and "transformer.ln_f.weight" in last
    assert not any(k.startswith("transformer.layers.1.") for r in ranks for k in r)  # local indices
    torch.testing.assert_close(last["transformer.layers.0.mlp.proj.weight"], hf(model, "model.layers.1.mlp.down_proj.weight"))


def test_fp8_layout_and_round_trip(model, tmp_path):
    amax = {f"model.layers.{i}.{n}": 2.0 + i for i in range(LAYERS)
            for n in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")}
    config, (tensors,) = export(model, tmp_path, quant_algo="FP8", act_amax=amax)
    assert config["quantization"]["quant_algo"] == "FP8"
    p = "transformer.layers.1."
    for lin in ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj"):
        assert tensors[f"{p}{lin}.weight"].dtype == torch.float8_e4m3fn
        for s in ("weights_scaling_factor", "activation_scaling_factor"):
            assert tensors[f"{p}{lin}.{s}"].shape == (1,) and tensors[f"{p}{lin}.{s}"].dtype == torch.float32
        assert tensors[f"{p}{lin}.activation_scaling_factor"].item() == pytest.approx(3.0 / 448)
    qkv = torch.cat([hf(model, f"model.layers.1.self_attn.{n}_proj.weight") for n in "qkv"])
    deq = tensors[p + "attention.qkv.weight"].float() * tensors[p + "attention.qkv.weights_scaling_factor"]
    assert tensors[p + "attention.qkv.weights_scaling_factor"].item() == pytest.approx(qkv.abs().max().item() / 448)
    assert ((deq - qkv).abs() <= qkv.abs() / 16 + 1e-6).all()  # e4m3: 3 mantissa bits
    # FP8Linear.forward: quantize(x, act) -> fp8 GEMM with the fp8 weight, rescaled by both scales
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(5))
    x = layer_input(model, "model.layers.1.mlp.down_proj", ids)
    act, w_scale = tensors[p + "mlp.proj.activation_scaling_factor"], tensors[p + "mlp.proj.weights_scaling_factor"]
    x8 = (x / act).clamp(-448, 448).to(torch.float8_e4m3fn).float() * act
    y = x8 @ (tensors[p + "mlp.proj.weight"].float() * w_scale).T
    ref = x @ hf(model, "model.layers.1.mlp.down_proj.weight").T
    assert (y - ref).norm() <= 0.1 * ref.norm()
    assert tensors["lm_head.weight"].dtype == torch.bfloat16  # excluded from quantization upstream


def test_smoothquant_layout_and_round_trip(model, tmp_path):
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    config, ranks = export(model, tmp_path, tp_size=2, quant_algo="W8A8_SQ_PER_CHANNEL", calib_token_ids=ids)
    assert config["quantization"]["quant_algo"] == "W8A8_SQ_PER_CHANNEL"
    p = "transformer.layers.0."
    for r in ranks:
        assert r[p + "mlp.fc.weight"].dtype == torch.int8
        assert r[p + "mlp.fc.weights_scaling_factor"].shape == (INTER // 2,)  # column: split out
        assert r[p + "mlp.fc.prequant_scaling_factor"].shape == (H,)
        assert r[p + "mlp.proj.weights_scaling_factor"].shape == (H,)  # row: out whole
        assert r[p + "mlp.proj.prequant_scaling_factor"].shape == (INTER // 2,)  # row: in split
        assert r[p + "attention.qkv.activation_scaling_factor"].shape == (1,)
    for lin, hf_name, dim in (("mlp.fc", "mlp.gate_proj", 0), ("mlp.proj", "mlp.down_proj", 1)):
        q = torch.cat([r[f"{p}{lin}.weight"] for r in ranks], dim=dim).float()
        if dim == 0:
            w_scale = torch.cat([r[f"{p}{lin}.weights_scaling_factor"] for r in ranks])
            pre = ranks[0][f"{p}{lin}.prequant_scaling_factor"].float()
        else:
            w_scale = ranks[0][f"{p}{lin}.weights_scaling_factor"]
            pre = torch.cat([r[f"{p}{lin}.prequant_scaling_factor"] for r in ranks]).float()
        w = hf(model, f"model.layers.0.{hf_name}.weight")
        recon = q * w_scale[:, None] * pre[None, :]  # W = (W * s) * (1 / s)
        assert (recon - w).abs().max() <= 0.02 * w.abs().max()
    # Int8SmoothQuantLinear.forward at tp=1: x * prequant -> int8 with the static act scale -> GEMM
    _, (t,) = export(model, tmp_path, name="tp1", quant_algo="W8A8_SQ_PER_CHANNEL", calib_token_ids=ids)
    x = layer_input(model, "model.layers.0.mlp.gate_proj", ids)  # [tokens, hidden]
    act = t[p + "mlp.fc.activation_scaling_factor"]
    xq = torch.round(x * t[p + "mlp.fc.prequant_scaling_factor"].float() / act).clamp(-128, 127) * act
    y = xq @ (t[p + "mlp.fc.weight"].float() * t[p + "mlp.fc.weights_scaling_factor"][:, None]).T
    ref = x @ hf(model, "model.layers.0.mlp.gate_proj.weight").T
    assert (y - ref).norm() <= 0.05 * ref.norm()


def layer_input(model, name: str, ids: torch.Tensor) -> torch.Tensor:
    """The input a Linear sees for these token ids: [tokens, in_features]."""
    seen = []
    handle = dict(model.named_modules())[name].register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    return seen[0].reshape(-1, seen[0].shape[-1]).float()


def test_w8a16_keeps_float_weights_for_trtllm_build(model, tmp_path):
    config, (tensors,) = export(model, tmp_path, quant_algo="W8A16")
    assert config["quantization"]["quant_algo"] == "W8A16"
    w = tensors["transformer.layers.0.mlp.proj.weight"]
    assert w.dtype == torch.bfloat16 and not any(k.endswith("per_channel_scale") for k in tensors)
    torch.testing.assert_close(w, hf(model, "model.layers.0.mlp.down_proj.weight").to(torch.bfloat16))


def test_kv_cache_scales(model, tmp_path):
    _, (fp8,) = export(model, tmp_path, name="a", kv_cache_quant_algo="FP8")
    assert fp8["transformer.layers.0.attention.kv_cache_scaling_factor"].tolist() == [1.0]  # uncalibrated
    with pytest.raises(SpecDeployError, match="calib_token_ids"):
        export(model, tmp_path, name="b", kv_cache_quant_algo="INT8")
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(2))
    outs = {}
    hooks = [dict(model.named_modules())[f"model.layers.0.self_attn.{n}_proj"].register_forward_hook(
        lambda m, i, o, n=n: outs.__setitem__(n, o.abs().max().item())) for n in "qkv"]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    _, (int8,) = export(model, tmp_path, name="c", kv_cache_quant_algo="INT8", calib_token_ids=ids)
    scale = int8["transformer.layers.0.attention.kv_cache_scaling_factor"]
    assert scale.dtype == torch.float32 and scale.item() == pytest.approx(max(outs.values()) / 127, rel=1e-5)


def test_quantization_needs_activation_ranges(model, tmp_path):
    with pytest.raises(SpecDeployError, match="act_amax"):
        export(model, tmp_path, quant_algo="FP8")


def medusa_heads(num_heads=2, num_layers=1, lm_key="{h}.{L}.weight"):
    g = torch.Generator().manual_seed(3)
    heads = {}
    for h in range(num_heads):
        for layer in range(num_layers):
            heads[f"{h}.{layer}.linear.weight"] = torch.randn(H, H, generator=g)
            heads[f"{h}.{layer}.linear.bias"] = torch.randn(H, generator=g)
        heads[lm_key.format(h=h, L=num_layers)] = torch.randn(VOCAB, H, generator=g)
    return heads


@pytest.mark.parametrize("lm_key", ["{h}.{L}.weight", "{h}.lm_head.weight"])
def test_medusa_layout(model, tmp_path, lm_key):
    heads = medusa_heads(lm_key=lm_key)
    config, ranks = export(model, tmp_path, tp_size=2, dtype="float32", medusa=heads, max_draft_len=7)
    assert config["architecture"] == "MedusaForCausalLM"
    assert (config["num_medusa_heads"], config["num_medusa_layers"], config["max_draft_len"]) == (2, 1, 7)
    for h in range(2):
        p = f"medusa_heads.{h}."
        assert ranks[0][p + "medusa_layers.0.linear.weight"].shape == (H // 2, H)
        torch.testing.assert_close(torch.cat([r[p + "medusa_layers.0.linear.weight"] for r in ranks]),
                                   heads[f"{h}.0.linear.weight"])
        torch.testing.assert_close(torch.cat([r[p + "medusa_layers.0.linear.bias"] for r in ranks]),
                                   heads[f"{h}.0.linear.bias"])
        torch.testing.assert_close(torch.cat([r[p + "lm_head.weight"] for r in ranks]),
                                   heads[lm_key.format(h=h, L=1)])
    assert "transformer.layers.0.attention.qkv.weight" in ranks[0]
    with pytest.raises(SpecDeployError):
        export(model, tmp_path, name="q", medusa=heads, quant_algo="FP8", act_amax={})


def eagle_state(num_layers=2):
    g = torch.Generator().manual_seed(4)
    sd = {"fc.weight": torch.randn(H, 2 * H, generator=g), "fc.bias": torch.randn(H, generator=g)}
    shapes = {"self_attn.q_proj": (HEADS * HD, H), "self_attn.k_proj": (KV * HD, H), "self_attn.v_proj": (KV * HD, H),
              "self_attn.o_proj": (H, HEADS * HD), "mlp.gate_proj": (96, H), "mlp.up_proj": (96, H),
              "mlp.down_proj": (H, 96)}
    for layer in range(num_layers):
        for name, shape in shapes.items():
            sd[f"layers.{layer}.{name}.weight"] = torch.randn(*shape, generator=g)
        sd[f"layers.{layer}.post_attention_layernorm.weight"] = torch.ones(H)
        if layer > 0:
            sd[f"layers.{layer}.input_layernorm.weight"] = torch.ones(H)
    return sd


def test_eagle_layout(model, tmp_path):
    sd = eagle_state()
    config, ranks = export(model, tmp_path, tp_size=2, dtype="float32",
                           eagle=EagleDraft(state_dict=sd, num_eagle_layers=3), max_draft_len=15)
    assert config["architecture"] == "EagleForCausalLM"
    assert (config["num_eagle_layers"], config["max_draft_len"], config["max_non_leaves_per_layer"]) == (3, 15, 10)
    net = config["eagle_net_config"]
    assert net["architecture"] == "LlamaForCausalLM" and net["num_hidden_layers"] == 2
    assert net["intermediate_size"] == 96 and net["mapping"] == {"world_size": 2, "tp_size": 2, "pp_size": 1}
    r0 = ranks[0]
    for i in range(3):
        p = f"eagle_nets.{i}."
        assert r0[p + "drafter.fc.weight"].shape == (H // 2, 2 * H)
        assert p + "drafter.layers.0.input_layernorm.weight" not in r0  # layer 0 has none
        assert p + "drafter.layers.1.input_layernorm.weight" in r0
        assert r0[p + "drafter.layers.0.attention.qkv.weight"].shape == ((HEADS + 2 * KV) * HD // 2, H)
        assert r0[p + "drafter.layers.0.mlp.fc.weight"].shape == (48, H)
        assert p + "drafter.ln_f.weight" not in r0
        torch.testing.assert_close(r0[p + "drafter.vocab_embedding.weight"], hf(model, "model.embed_tokens.weight"))
    torch.testing.assert_close(torch.cat([r["eagle_nets.2.drafter.fc.weight"] for r in ranks]), sd["fc.weight"])
    torch.testing.assert_close(torch.cat([r["eagle_nets.0.lm_head.weight"] for r in ranks]), hf(model, "lm_head.weight"))


def test_directory_input_matches_in_memory(model, tmp_path):
    model.save_pretrained(tmp_path / "hf")
    _, (from_dir,) = export(str(tmp_path / "hf"), tmp_path, name="d", dtype="float32")
    _, (in_mem,) = export(model, tmp_path, name="m", dtype="float32")
    assert from_dir.keys() == in_mem.keys()
    for k in in_mem:
        torch.testing.assert_close(from_dir[k], in_mem[k], rtol=0, atol=0)
    manifest = json.loads((tmp_path / "d" / "specdeploy_manifest.json").read_text())
    assert manifest["source_sha256"] and "not an engine" in manifest["kind"]


@pytest.mark.parametrize("kw", [dict(dtype="int3"), dict(tp_size=3), dict(quant_algo="W4A16"),
                                dict(kv_cache_quant_algo="NVFP4"), dict(pp_size=5)])
def test_bad_requests_raise(model, tmp_path, kw):
    with pytest.raises(SpecDeployError):
        export(model, tmp_path, **kw)


def test_export_cli(model, tmp_path, capsys):
    import argparse

    from specdeploy.export.trtllm_checkpoint import add_export_arguments, trtllm_export_cli

    model.save_pretrained(tmp_path / "hf")
    parser = argparse.ArgumentParser()
    parser.add_argument("--target")
    parser.add_argument("--out")
    parser.add_argument("--quant", default="none")
    add_export_arguments(parser)
    args = parser.parse_args(["--target", str(tmp_path / "hf"), "--out", str(tmp_path / "cli"), "--tp-size", "2",
                              "--quant", "int8_wo"])
    assert trtllm_export_cli(args) == 0
    out = tmp_path / "cli"
    config = json.loads((out / "config.json").read_text())
    assert config["mapping"]["tp_size"] == 2 and config["quantization"]["quant_algo"] == "W8A16"
    assert sorted(p.name for p in out.glob("rank*.safetensors")) == ["rank0.safetensors", "rank1.safetensors"]
    assert "not an engine" in capsys.readouterr().out
    args.quant = "int4"
    with pytest.raises(SpecDeployError, match="--quant"):
        trtllm_export_cli(args)
