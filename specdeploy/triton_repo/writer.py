"""Write a Triton model repository that serves lossless speculative generation.

    REPO/
      specdeploy_repo.json      marker + manifest: what wrote it, target source and sha256
      preprocessing/            text_input -> input_ids (tokenizer + chat template)
      verify/                   the target; one KV cache per sequence (sequence batcher) -> logits
      draft/                    the draft model (or the target's first N layers), same interface
      spec_decode/              Python BLS model, decoupled: runs speculative_generate()
      postprocessing/           output_ids -> text_output (detokenizer, stop strings)
      ensemble/                 text in -> preprocessing -> spec_decode -> postprocessing -> text out

Every Python model's model.py is three lines of path setup plus an import of its class
from `specdeploy.triton_repo.models`: the stub runs in isolated mode and ignores
PYTHONPATH, so the venv's site-packages are written into model.py at generation time.
Ensemble inputs and outputs are named as in Triton's TensorRT-LLM backend where they
correspond. The writer refuses to write into a non-empty folder it did not write.

The weights come from a model (`RepoSpec.target`: 'smollm2', a GGUF file, a HF directory)
or from engines made by `specdeploy build` (`RepoSpec.engines`): then verify and draft load
the built (quantized) weights, and every engine file is recorded with its sha256.
"""
from __future__ import annotations

import json
import shutil
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import specdeploy
from typing import Any

from specdeploy.config import SpecConfig
from specdeploy.errors import SpecDeployError
from specdeploy.models.tokenizers import stop_token_ids
from specdeploy.runtime.policy import OFF, Policy, read_policy_file
from specdeploy.triton_repo.pbtxt import Tensor, ensemble_config, instance_group, model_config, sequence_batching

MARKER = "specdeploy_repo.json"
MODELS = ("preprocessing", "verify", "draft", "spec_decode", "postprocessing", "ensemble")
_HASHED_SUFFIXES = (".safetensors", ".gguf", ".json", ".model", ".txt", ".bin")
SERVED_METHODS = ("none", "ngram", "draft", "layerskip")  # proposers spec_decode can build over BLS runners


@dataclass(frozen=True)
class InstanceSpec:
    """Where the models run: instance_group kind (of verify and draft), count (of every model) and GPU ids.

    On GPUs Triton starts `count` instances of verify and draft on each GPU listed (all
    visible GPUs when none is); the tokenizer and spec_decode models run on the CPU."""

    kind: str = "cpu"  # cpu | gpu
    count: int = 1
    gpus: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("cpu", "gpu"):
            raise SpecDeployError(f"instance kind must be cpu or gpu, got {self.kind!r}")
        if not isinstance(self.count, int) or self.count < 1:
            raise SpecDeployError(f"instance count must be an integer >= 1, got {self.count!r}")
        if self.gpus and self.kind != "gpu":
            raise SpecDeployError("--gpus needs --instance-kind gpu")


@dataclass(frozen=True)
class RepoSpec:
    target: str | None = None  # model source; default 'smollm2'. With `engines`: checked to be their source
    spec: SpecConfig = field(default_factory=lambda: SpecConfig(method="none"))
    instances: InstanceSpec = field(default_factory=InstanceSpec)
    dtype: str | None = None  # default: float32 on cpu, bfloat16 on gpu
    policy: Policy | None = None  # per-task method / k / off (runtime.policy); None: spec.method and spec.k
    engines: str | None = None  # a `specdeploy build` output: its target (and draft) engines replace `target`
    draft_engine: str | None = None  # engine dir of the draft (its `draft` component, else its `target`)
    max_sequences: int = 256  # KV caches (sequences) one verify/draft instance holds at once
    sequence_idle_s: float = 600.0  # Triton drops a sequence that sent nothing for this long
    max_concurrency: int = 64  # requests spec_decode runs at once (threads)
    cpu_threads: int = 1  # torch threads per model process: several processes share the cores
    extra_python_path: tuple[str, ...] = ()  # folders put before the venv's on the stub's sys.path

    @property
    def torch_dtype(self) -> str:
        return self.dtype or ("float32" if self.instances.kind == "cpu" else "bfloat16")


def load_policy(path: str | Path, spec: SpecConfig) -> Policy:
    """A policy.json (runtime.policy's format, as `specdeploy advise` writes it) for a repository
    serving `spec`. Without a "default" entry (top level or in its sampled section), tasks the
    policy does not name get spec's method and k."""
    data = read_policy_file(path)
    repository = {"method": spec.method, "k": OFF if spec.method == "none" else spec.k}
    if isinstance(data, dict):
        data = {"default": repository, **data}
        if isinstance(data.get("sampled"), dict):
            data["sampled"] = {"default": repository, **data["sampled"]}
    return Policy.from_dict(data)


def served_methods(spec: SpecConfig) -> tuple[str, ...]:
    """Methods a repository for `spec` can run per request: plain, n-gram, and its own draft model."""
    return ("none", "ngram") + ((spec.method,) if spec.method in ("draft", "layerskip") else ())


def check_policy(policy: Policy, spec: SpecConfig) -> None:
    """Every method the policy names must be one the repository serves."""
    served = served_methods(spec)
    for where, rule in policy.rules():
        if not rule.off and rule.method not in served:
            raise SpecDeployError(f"policy {where}: method {rule.method!r} is not served by this repository "
                                  f"(it serves {', '.join(served)}); write it with --method {rule.method}")


def python_path(extra: tuple[str, ...] = ()) -> list[str]:
    """Folders the stub must see: `extra`, specdeploy's own root, this interpreter's site-packages."""
    paths = [str(Path(p).resolve()) for p in extra] + [str(Path(specdeploy.__file__).resolve().parent.parent)]
    for key in ("purelib", "platlib"):
        p = sysconfig.get_paths()[key]
        if p not in paths:
            paths.append(p)
    return paths


def file_manifest(path: Path) -> dict[str, str]:
    """sha256 of a GGUF file, or of each weight/config/tokenizer file of a model or engine folder."""
    from specdeploy.models.loader import file_sha256

    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _HASHED_SUFFIXES)
    return {str(f.resolve()): file_sha256(f) for f in files}


@dataclass(frozen=True)
class Served:
    """What the writer needs of the served models: tokenizer, sizes, stop ids and the weights entries."""

    tokenizer: Any
    vocab_size: int
    max_length: int  # the context window
    eos_ids: list[int]
    target: dict  # weights entry of verify (settings of the served model; see weights.load_weights)
    draft: dict | None  # weights entry of draft, or None (method none / ngram)


def served_from_model(rs: RepoSpec) -> Served:
    """The target (and draft) named by model sources: float weights loaded through models.loader."""
    from specdeploy.models.loader import load_model, resolve_source

    source = rs.target or "smollm2"
    target = load_model(source)
    cfg = target.model.config
    vocab = int(cfg.vocab_size)
    target_entry = _weights_entry(source, resolve_source(source), target.source_hash, role="target")
    draft = None
    if rs.spec.method == "layerskip":
        draft = {**target_entry, "role": "draft", "layerskip_layers": _layerskip_layers(rs.spec, int(cfg.num_hidden_layers))}
    elif rs.spec.method == "draft":
        draft = _draft_model_entry(rs.spec.draft, target.tokenizer, vocab)
    return Served(target.tokenizer, vocab, int(getattr(cfg, "max_position_embeddings", 2048)),
                  target.stop_ids(), target_entry, draft)


def served_from_engines(rs: RepoSpec) -> Served:
    """The target (and draft) from `specdeploy build` engines: each engine's manifest is checked
    (torch engine, tokenizer, and with `rs.target` the model it was built from)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from specdeploy.build.manifest import check_source, read_manifest, tokenizer_hash

    tdir = _engine_dir(rs.engines, "target")
    tm = read_manifest(tdir)
    tokenizer = AutoTokenizer.from_pretrained(tdir)
    check_source(tm, tdir, source_hash=None, tok_hash=tokenizer_hash(tokenizer), what="engine folder")
    if rs.target:
        from specdeploy.models.loader import load_model

        loaded = load_model(rs.target)
        check_source(tm, tdir, source_hash=loaded.source_hash, tok_hash=tokenizer_hash(loaded.tokenizer),
                     what=f"target {rs.target}")
    cfg = AutoConfig.from_pretrained(tdir)
    vocab = int(cfg.vocab_size)
    try:
        eos = GenerationConfig.from_pretrained(tdir).eos_token_id
    except OSError:
        eos = None
    target_entry = _engine_entry(tdir, tm, "target")
    draft = None
    if rs.spec.method == "layerskip":  # the first layers of the built (quantized) target
        draft = {**target_entry, "role": "draft", "layerskip_layers": _layerskip_layers(rs.spec, int(cfg.num_hidden_layers))}
    elif rs.spec.method == "draft" and (rs.draft_engine or not rs.spec.draft):
        ddir = _engine_dir(rs.draft_engine or rs.engines, "draft", or_target=bool(rs.draft_engine))
        dm = read_manifest(ddir)
        check_source(dm, ddir, source_hash=None, tok_hash=tm.tokenizer_hash, what=f"target engine {tdir}")
        if int(AutoConfig.from_pretrained(ddir).vocab_size) != vocab:
            raise SpecDeployError(f"{ddir}: the draft's vocab size differs from the target's {vocab}")
        draft = _engine_entry(ddir, dm, "draft")
    elif rs.spec.method == "draft":  # a float draft model beside the built target
        draft = _draft_model_entry(rs.spec.draft, tokenizer, vocab)
    return Served(tokenizer, vocab, int(getattr(cfg, "max_position_embeddings", 2048)), stop_token_ids(tokenizer, eos),
                  target_entry, draft)


def write_repository(out: str | Path, rs: RepoSpec) -> Path:
    """Write the model repository for `rs` into `out`; returns its path."""
    out = Path(out).resolve()
    _check_writable(out)
    spec = rs.spec
    if spec.method not in SERVED_METHODS:
        raise SpecDeployError(f"method {spec.method!r} cannot be served yet; use one of {', '.join(SERVED_METHODS)}")
    if spec.method == "draft" and not (spec.draft or rs.draft_engine or rs.engines):
        raise SpecDeployError("method 'draft' needs a draft model: pass --draft PATH")
    if rs.draft_engine and not rs.engines:
        raise SpecDeployError("--draft-engine needs --engines (the target's engine)")
    if rs.policy is not None:
        check_policy(rs.policy, spec)
    served = served_from_engines(rs) if rs.engines else served_from_model(rs)
    vocab, max_length = served.vocab_size, served.max_length

    tmp = out.with_name(f".{out.name}.tmp-{time.time_ns()}")
    tmp.mkdir(parents=True)
    try:
        common = {"python_path": python_path(rs.extra_python_path), "cpu_threads": rs.cpu_threads}
        groups = _groups(rs.instances)
        tok = {"tokenizer": "1/tokenizer"}  # relative to the model's folder (inside the version: not a version itself)

        _python_model(tmp, "preprocessing", groups["light"], common | tok | {"max_length": max_length},
                      inputs=[Tensor("text_input", "STRING", [1])],
                      outputs=[Tensor("input_ids", "INT64", [-1])])
        weights_io = dict(
            inputs=[Tensor("tokens", "INT64", [-1]), Tensor("keep", "INT64", [1])],
            outputs=[Tensor("logits", "FP32", [-1, vocab])],
            scheduling=sequence_batching(rs.max_sequences, rs.sequence_idle_s),
        )
        weights_settings = {"dtype": rs.torch_dtype, "max_sequences": rs.max_sequences}
        _python_model(tmp, "verify", groups["weights"], common | served.target | weights_settings, **weights_io)
        if served.draft:
            _python_model(tmp, "draft", groups["weights"], common | served.draft | weights_settings, **weights_io)
        request_inputs = [
            Tensor("temperature", "FP32", [1], optional=True), Tensor("top_p", "FP32", [1], optional=True),
            Tensor("top_k", "INT32", [1], optional=True), Tensor("random_seed", "UINT64", [1], optional=True),
            Tensor("stop_words", "STRING", [-1], optional=True), Tensor("stream", "BOOL", [1], optional=True),
            Tensor("task", "STRING", [1], optional=True), Tensor("num_draft_tokens", "INT32", [1], optional=True),
        ]
        stats_outputs = [
            Tensor("acceptance_rate", "FP32", [1]), Tensor("total_accepted_draft_tokens", "INT32", [1]),
            Tensor("total_draft_tokens", "INT32", [1]), Tensor("acceptance_length", "FP32", [1]),
            Tensor("finish_reason", "STRING", [1]), Tensor("decision", "STRING", [1]),
        ]
        policy = rs.policy.to_dict() if rs.policy is not None else None
        _python_model(
            tmp, "spec_decode", groups["light"],
            common | tok | {
                "method": spec.method, "k": spec.k, "ngram_min": spec.ngram_min, "ngram_max": spec.ngram_max,
                "draft_confidence": spec.draft_confidence,
                "eos_ids": served.eos_ids, "max_length": max_length, "vocab_size": vocab,
                "target_model": "verify", "draft_model": "draft" if served.draft else None,
                "policy": policy, "max_concurrency": rs.max_concurrency,
            },
            inputs=[Tensor("input_ids", "INT64", [-1]), Tensor("max_tokens", "INT32", [1])] + request_inputs,
            # stop_words goes out again: after a decoupled model, a step's inputs must all come from it
            outputs=[Tensor("output_ids", "INT64", [-1]), Tensor("previous_length", "INT32", [1]),
                     Tensor("stop_words", "STRING", [-1])] + stats_outputs,
            decoupled=True,
        )
        _python_model(
            tmp, "postprocessing", groups["light"], common | tok,
            inputs=[Tensor("output_ids", "INT64", [-1]), Tensor("previous_length", "INT32", [1]),
                    Tensor("stop_words", "STRING", [-1])] + stats_outputs,
            outputs=[Tensor("text_output", "STRING", [1])] + stats_outputs,
            # a stream's pieces reach postprocessing in order; with several instances they may
            # finish out of order: preserve_ordering sends the responses in the requests' order
            scheduling="dynamic_batching {\n  preserve_ordering: true\n}",
        )
        for name in ("preprocessing", "spec_decode", "postprocessing"):
            served.tokenizer.save_pretrained(tmp / name / tok["tokenizer"])
        _write_ensemble(tmp, request_inputs, stats_outputs)
        manifest = {
            "written_by": f"specdeploy {getattr(specdeploy, '__version__', '?')}",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "target": served.target, "draft": served.draft,
            "method": spec.method, "k": spec.k, "dtype": rs.torch_dtype, "cpu_threads": rs.cpu_threads,
            "instances": asdict(rs.instances), "policy": policy,
            "python": sys.version.split()[0], "models": sorted(p.name for p in tmp.iterdir() if p.is_dir()),
        }
        (tmp / MARKER).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_writable(out: Path) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise SpecDeployError(f"{out} exists and is not a directory")
    if any(out.iterdir()) and not (out / MARKER).is_file():
        raise SpecDeployError(f"{out} is not empty and was not written by specdeploy (no {MARKER}); refusing to overwrite it")


def _weights_entry(source: str, path: Path, digest: str, *, role: str) -> dict:
    """Settings of a served model whose weights a model source names (loaded by models.loader)."""
    return {"role": role, "source": source, "source_path": str(path), "sha256": digest, "files": file_manifest(path)}


def _engine_entry(directory: Path, manifest, role: str) -> dict:
    """Settings of a served model whose weights are a `specdeploy build` torch engine (build.engine.load_quantized)."""
    directory = Path(directory).resolve()
    return {"role": role, "source": f"{manifest.source} ({manifest.quant.get('algo', 'none')} engine)",
            "engine": str(directory), "source_path": str(directory), "sha256": manifest.source_hash,
            "quant": manifest.quant.get("algo", "none"), "files": file_manifest(directory)}


def _engine_dir(directory: str | Path, role: str, or_target: bool = False) -> Path:
    """The torch engine of `role` in a build output (a bundle, or one engine); with `or_target`,
    a build without that role gives its target (a small model built on its own as the draft)."""
    from specdeploy.build.manifest import component_dir, read_manifest

    found = component_dir(directory, role)
    if found is None and or_target:
        found = component_dir(directory, "target")
    if found is None:
        hint = "build the draft too (`specdeploy build ... --draft PATH`) or pass --draft-engine DIR" if role == "draft" else \
            "give the output folder of `specdeploy build`"
        raise SpecDeployError(f"{directory}: no {role} engine here; {hint}")
    kind = read_manifest(found).kind
    if kind != "torch-quant":
        raise SpecDeployError(f"{found}: a {kind!r} artifact; the Triton repository serves torch engines "
                              f"(`specdeploy build --target ...`)")
    return found


def _draft_model_entry(draft: str, target_tokenizer, vocab: int) -> dict:
    """The entry of a draft model given by path (float weights), after checking it fits the target."""
    from specdeploy.models.loader import load_model, resolve_source
    from specdeploy.models.tokenizers import check_compatible

    loaded = load_model(draft)
    check_compatible(target_tokenizer, loaded.tokenizer)
    if int(loaded.model.config.vocab_size) != vocab:
        raise SpecDeployError(f"draft vocab size {loaded.model.config.vocab_size} differs from the target's {vocab}")
    source = str(Path(draft).resolve()) if Path(draft).exists() else draft
    return _weights_entry(source, resolve_source(draft), loaded.source_hash, role="draft")


def _layerskip_layers(spec: SpecConfig, num_layers: int) -> int:
    """Layers of the layerskip draft, checked now, not at serve time."""
    from specdeploy.models.layerskip import layerskip_layers

    return layerskip_layers(num_layers, spec.layerskip_layers)


def _groups(inst: InstanceSpec) -> dict[str, str]:
    """instance_group text for the weight models (verify, draft) and the light ones (tokenizers, BLS).

    verify and draft may run as several instances: their sequence batcher keeps each
    sequence on the instance that holds its KV cache."""
    return {"weights": instance_group(inst.kind, inst.count, inst.gpus), "light": instance_group("cpu", inst.count)}


def _python_model(repo: Path, name: str, group: str, settings: dict, *, inputs: list[Tensor], outputs: list[Tensor],
                  decoupled: bool = False, scheduling: str = "") -> None:
    d = repo / name
    (d / "1").mkdir(parents=True)
    (d / "config.pbtxt").write_text(model_config(name, inputs, outputs, group, settings, decoupled=decoupled,
                                                 scheduling=scheduling))
    paths = settings["python_path"]
    (d / "1" / "model.py").write_text(_MODEL_PY.format(name=name, paths=json.dumps(paths, indent=4)))


def _write_ensemble(repo: Path, request_inputs: list[Tensor], stats_outputs: list[Tensor]) -> None:
    d = repo / "ensemble"
    (d / "1").mkdir(parents=True)
    inputs = [Tensor("text_input", "STRING", [1]), Tensor("max_tokens", "INT32", [1])] + request_inputs
    outputs = [Tensor("text_output", "STRING", [1])] + stats_outputs
    stats = [t.name for t in stats_outputs]
    steps = [
        ("preprocessing", {"text_input": "text_input"}, {"input_ids": "_input_ids"}),
        ("spec_decode", {"input_ids": "_input_ids"} | {t.name: t.name for t in inputs[1:]},
         {"output_ids": "_output_ids", "previous_length": "_previous_length", "stop_words": "_stop_words"}
         | {s: f"_{s}" for s in stats}),
        ("postprocessing", {"output_ids": "_output_ids", "previous_length": "_previous_length", "stop_words": "_stop_words"}
         | {s: f"_{s}" for s in stats}, {"text_output": "text_output"} | {s: s for s in stats}),
    ]
    (d / "config.pbtxt").write_text(ensemble_config("ensemble", inputs, outputs, steps))


_MODEL_PY = '''"""The {name} model, written by `specdeploy repo`. Its code is in specdeploy.triton_repo.models.{name}."""
import site
import sys

# The stub runs Python in isolated mode (PYTHONPATH ignored): put specdeploy and the
# venv's site-packages first, before anything imports numpy (numpy 2 corrupts tensors).
_PATHS = {paths}
for _p in _PATHS:
    site.addsitedir(_p)
sys.path[:] = _PATHS + [_p for _p in sys.path if _p not in _PATHS]

from specdeploy.triton_repo.models.{name} import TritonPythonModel  # noqa: E402,F401
'''
