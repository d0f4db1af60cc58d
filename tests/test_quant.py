"""Quantization math, QuantLinear vs nn.Linear, engine directories and their manifests.

The CUDA kernels (torch._scaled_mm, torch._int_mm) also exist on CPU in recent torch, so
the exact calls QuantLinear makes on the GPU are checked here by forcing `kernel` on CPU.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from specdeploy.build import quantize as Q
from specdeploy.build.engine import BuildConfig, build_torch_engine, load_engine, load_quantized
from specdeploy.build.manifest import read_manifest, tokenizer_hash
from specdeploy.errors import SpecDeployError
from specdeploy.models.loader import LoadedModel

from test_onnx_export import tiny_llama


def _calibrated_linear(in_f=64, out_f=96, seed=0, outlier=True):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) * 0.05)
        lin.bias.copy_(torch.randn(out_f, generator=g) * 0.01)
    x = torch.randn(32, in_f, generator=g)
    if outlier:
        x[:, 3] *= 20.0  # an outlier channel, what SmoothQuant migrates into the weights
    return lin, x, Q.ActStats(x.abs().amax(0), x.shape[0])


def test_int8_round_trip_error_is_half_a_step():
    x = torch.randn(16, 32)
    scale = Q.per_channel_scale(x, Q.INT8_MAX)[:, None]
    q = Q.quantize_int8(x, scale)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert ((q.float() * scale - x).abs() <= scale / 2 + 1e-7).all()


def test_fp8_round_trip_relative_error():
    x = torch.randn(1000) * 3
    scale = Q.per_tensor_scale(x.abs().max(), Q.FP8_MAX)
    q = Q.quantize_fp8(x, scale)
    assert q.dtype == torch.float8_e4m3fn
    back = q.float() * scale
    big = x.abs() > 1e-2  # E4M3 keeps 3 mantissa bits: relative error <= 2^-4 for normal values
    assert ((back - x).abs()[big] / x.abs()[big]).max() <= 2 ** -4 + 1e-6
    assert float(back.abs().max()) == pytest.approx(float(x.abs().max()), rel=2 ** -4)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.85, 1.0])
def test_smoothquant_is_exact_before_quantization(alpha):
    lin, x, act = _calibrated_linear()
    s = Q.smoothing_factors(act.channel_amax, lin.weight, alpha)
    smoothed = (x / s) @ (lin.weight * s).t() + lin.bias
    assert torch.allclose(smoothed, lin(x), atol=1e-5)
    if alpha > 0:  # the outlier channel's activation range shrinks
        assert (x / s)[:, 3].abs().max() < x[:, 3].abs().max()


def test_smoothing_alpha_out_of_range():
    lin, _, act = _calibrated_linear()
    with pytest.raises(SpecDeployError, match="migration strength"):
        Q.smoothing_factors(act.channel_amax, lin.weight, 1.5)


def _quant_linear(lin, act, algo, act_scaling="per-token"):
    buffers = Q.quantize_linear(lin, algo, act, smooth_alpha=0.5)
    q = Q.QuantLinear(lin.in_features, lin.out_features, algo, bias=True, act_scaling=act_scaling)
    q.load_state_dict(buffers)
    return q


@pytest.mark.parametrize("algo,act_scaling,tol", [
    ("int8_wo", "per-token", 0.01), ("int8", "per-token", 0.02), ("int8", "static", 0.05), ("fp8", "static", 0.08),
])
def test_quant_linear_close_to_linear_on_cpu_fallback(algo, act_scaling, tol):
    lin, x, act = _calibrated_linear()
    q = _quant_linear(lin, act, algo, act_scaling)
    assert Q.kernel_path(algo, "cpu").endswith(("fallback", "dequant"))
    with torch.no_grad():
        ref, out = lin(x), q(x)
    rel = (out - ref).norm() / ref.norm()
    assert rel < tol, float(rel)
    assert q(x.view(4, 8, -1)).shape == (4, 8, lin.out_features)  # [..., in] -> [..., out]


@pytest.mark.parametrize("algo,kernel", [("int8", "torch._int_mm"), ("fp8", "torch._scaled_mm")])
def test_cuda_kernel_calls_match_fallback(algo, kernel):
    """The GPU code path (padding, column-major weight view, scales) gives the fallback's result."""
    lin, x, act = _calibrated_linear(in_f=64, out_f=96)
    q = _quant_linear(lin, act, algo, "per-token" if algo == "int8" else "static")
    for rows in (1, 5, 17, 40):  # _int_mm needs > 16 rows: fewer are padded
        with torch.no_grad():
            fallback = q(x[:rows])
            q.kernel = kernel
            fast = q(x[:rows])
            q.kernel = None
        assert fast.shape == fallback.shape
        assert torch.allclose(fast, fallback, atol=1e-4, rtol=1e-4), (rows, float((fast - fallback).abs().max()))


def test_dtype_cast_keeps_quantized_buffers():
    lin, _, act = _calibrated_linear()
    for algo in ("fp8", "int8"):
        q = _quant_linear(lin, act, algo)
        before = {k: v.clone() for k, v in q.state_dict().items()}
        q.to(torch.bfloat16)
        assert q.bias.dtype == torch.bfloat16
        for k in ("qweight", "weight_scale", "input_scale"):
            assert q._buffers[k].dtype == before[k].dtype and torch.equal(q._buffers[k].float(), before[k].float())


@pytest.fixture(scope="module")
def tiny(smollm2) -> LoadedModel:
    return LoadedModel(tiny_llama(len(smollm2.tokenizer), seed=1), smollm2.tokenizer, "tiny-llama", "ef" * 32)


@pytest.mark.parametrize("algo", ["int8", "fp8", "int8_wo", "none"])
def test_engine_round_trip_and_manifest(tiny, tmp_path, algo):
    cfg = BuildConfig(calib_samples=4, calib_tokens=64, progress=False)
    m = build_torch_engine(tiny, tmp_path / algo, algo, cfg)
    man = read_manifest(tmp_path / algo)
    assert man.kind == "torch-quant" and man.files["weights"] == "model.safetensors"
    assert man.source_hash == tiny.source_hash and man.tokenizer_hash == tokenizer_hash(tiny.tokenizer)
    assert man.quant["algo"] == algo and "kernel_path" in man.quant and man.created and "torch" in man.versions
    if algo in ("int8", "fp8"):
        assert man.quant["calibration"]["texts"] == 4 and man.quant["input_scale"]["count"] == 7 * 2
        assert "weight_scale" in man.quant
    if algo == "int8":
        assert man.quant["smooth_alpha"] == 0.5 and man.quant["activation_scaling"] == "per-token"
    model, _ = load_quantized(tmp_path / algo)
    n_quant = sum(isinstance(mod, Q.QuantLinear) for mod in model.modules())
    assert n_quant == (0 if algo == "none" else 7 * 2)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, stored once
    ids = torch.tensor([tiny.tokenizer("Quantized engines keep the argmax of the target.")["input_ids"]])
    with torch.no_grad():
        ref, out = tiny.model(ids).logits, model(ids).logits
    rel = float((out - ref).norm() / ref.norm())
    assert rel < (1e-6 if algo == "none" else 0.1), rel
    assert m.info["stored_bytes"] > 0


def test_quantized_model_runs_through_torch_runner(tiny, tmp_path):
    from specdeploy.runtime.runner import TorchRunner

    build_torch_engine(tiny, tmp_path / "e", "int8_wo", BuildConfig(progress=False))
    model, _ = load_quantized(tmp_path / "e")
    runner = TorchRunner(model)
    step = runner.forward(torch.tensor([5, 6, 7, 8]))
    runner.rollback(2)
    again = runner.forward(torch.tensor([7, 8]))
    assert torch.allclose(step.logits[2:], again.logits, atol=1e-5)


def test_engine_from_another_model_is_refused(tiny, tmp_path):
    from specdeploy.config import SpecConfig

    build_torch_engine(tiny, tmp_path / "e", "int8_wo", BuildConfig(progress=False))
    with pytest.raises(SpecDeployError, match="built from tiny-llama"):
        load_engine(tmp_path / "e", SpecConfig(method="none"), "smollm2")


def test_unknown_quant_and_onnx_fp8_refused(tmp_path, tiny):
    from specdeploy.build.engine import build_onnx_engine

    with pytest.raises(SpecDeployError, match="unknown quantization"):
        build_torch_engine(tiny, tmp_path / "x", "int4")
    with pytest.raises(SpecDeployError, match="not available for ONNX Runtime"):
        build_onnx_engine(tmp_path, tmp_path / "y", "fp8", "target")


def test_ort_int8_engine_from_onnx_export(tmp_path, smollm2):
    from test_onnx_export import tiny_llama as make

    from specdeploy.build.engine import build_from_onnx
    from specdeploy.export.onnx import OnnxExportConfig, export_onnx
    from specdeploy.runtime.onnx_runner import load_onnx_runner

    loaded = LoadedModel(make(len(smollm2.tokenizer), seed=2), smollm2.tokenizer, "tiny-llama", "12" * 32)
    export_onnx(loaded, tmp_path / "exp", config=OnnxExportConfig(parity_decode_steps=1))
    build_from_onnx(tmp_path / "exp", tmp_path / "int8", target_quant="int8")
    man = read_manifest(tmp_path / "int8" / "target")
    assert man.kind == "onnx" and man.quant["algo"] == "ort_dynamic_int8"
    assert man.source_hash == loaded.source_hash and "parity_vs_fp32_graph" in man.info
    import onnx

    graph = onnx.load(str(tmp_path / "int8" / "target" / man.files["graph"]))
    int8_ops = [n for n in graph.graph.node if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul")]
    assert len(int8_ops) >= 7 * 2  # every decoder projection
    assert any(i.data_type == onnx.TensorProto.INT8 for i in graph.graph.initializer)
    runner = load_onnx_runner(tmp_path / "int8" / "target", source_hash=loaded.source_hash)
    assert runner.forward(torch.tensor([1, 2, 3])).logits.shape == (3, loaded.model.config.vocab_size)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("algo", ["int8", "fp8", "int8_wo"])
def test_cuda_quant_linear_bf16(algo):
    """On the GPU: the kernel the device selects (torch._scaled_mm on sm89+, torch._int_mm)
    agrees with the CPU fallback and stays close to the bf16 nn.Linear."""
    lin, x, act = _calibrated_linear(in_f=576, out_f=1536)
    q = _quant_linear(lin, act, algo, "per-token" if algo == "int8" else "static")
    fallback = {"int8": "int8-dequant-fallback", "fp8": "fp8-dequant-fallback", "int8_wo": "int8-weight-only-dequant"}
    with torch.no_grad():
        qc = q.to("cuda", torch.bfloat16)
        assert qc.qweight.dtype == (torch.float8_e4m3fn if algo == "fp8" else torch.int8)
        xc = x.to("cuda", torch.bfloat16)
        for rows in (1, 7, 32):  # the device kernel vs the fallback, same bf16 input on the GPU
            fast = qc(xc[:rows]).float().cpu()
            qc.kernel = fallback[algo]
            slow = qc(xc[:rows]).float().cpu()
            qc.kernel = None
            assert torch.allclose(fast, slow, atol=0.03, rtol=0.02), (rows, float((fast - slow).abs().max()))
        ref = lin.to("cuda", torch.bfloat16)(xc).float().cpu()
    assert float((fast - ref[:32]).norm() / ref[:32].norm()) < 0.1
    major, minor = torch.cuda.get_device_capability()
    if algo == "fp8" and (major, minor) >= (8, 9):
        assert Q.kernel_path("fp8", "cuda") == "torch._scaled_mm"
    if algo == "int8":
        assert Q.kernel_path("int8", "cuda") == "torch._int_mm"


@pytest.mark.parametrize("algo", ["int8", "fp8", "int8_wo"])
def test_speculation_over_a_quantized_target_is_lossless(tiny, tmp_path, algo):
    """Lossless relative to the quantized target: speculative greedy equals that target's own greedy."""
    from specdeploy.config import SamplingParams, SpecConfig
    from specdeploy.runtime.engine import SpecEngine

    build_torch_engine(tiny, tmp_path / "e", algo, BuildConfig(calib_samples=4, calib_tokens=64, progress=False))
    model, _ = load_quantized(tmp_path / "e")
    quantized = LoadedModel(model, tiny.tokenizer, f"tiny-llama ({algo})", tiny.source_hash)
    plain = SpecEngine(quantized, SpecConfig(method="none"))
    params = SamplingParams(max_new_tokens=24)
    for method in ("ngram", "layerskip"):
        spec = SpecEngine(quantized, SpecConfig(method=method, k=3, draft_confidence=0))
        proposed = 0
        for text in ("one two three one two three one two", "SELECT name FROM users WHERE id = 1;"):
            ids = plain.encode(text, raw=True)
            r = spec.generate_ids(ids, params)
            assert r.token_ids == plain.generate_ids(ids, params).token_ids, (method, text)
            proposed += r.stats.proposed
        assert proposed > 0, method  # speculation really ran
