"""Write a Triton model repository that serves lossless speculative generation.

    REPO/
      specdeploy_repo.json      marker + manifest: what wrote it, target source and sha256
      preprocessing/            text_input -> input_ids (tokenizer + chat template)
      verify/                   the target; one KV cache per sequence_id -> logits
      draft/                    the draft model (or the target's first N layers), same interface
      spec_decode/              Python BLS model, decoupled: runs speculative_generate()
      postprocessing/           output_ids -> text_output (detokenizer, stop strings)
      ensemble/                 text in -> preprocessing -> spec_decode -> postprocessing -> text out

Every Python model's model.py is three lines of path setup plus an import of its class
from `specdeploy.triton_repo.models`: the stub runs in isolated mode and ignores
PYTHONPATH, so the venv's site-packages are written into model.py at generation time.
Ensemble inputs and outputs are named as in Triton's TensorRT-LLM backend where they
correspond. The writer refuses to write into a non-empty folder it did not write.
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
from specdeploy.config import MAX_K, SpecConfig
from specdeploy.errors import SpecDeployError
from specdeploy.triton_repo.pbtxt import Tensor, instance_group, model_config, ensemble_config

MARKER = "specdeploy_repo.json"
MODELS = ("preprocessing", "verify", "draft", "spec_decode", "postprocessing", "ensemble")
_HASHED_SUFFIXES = (".safetensors", ".gguf", ".json", ".model", ".txt", ".bin")


@dataclass(frozen=True)
class InstanceSpec:
    """Where the models run: instance_group kind, count and GPU ids."""

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
class Policy:
    """Per-task speculation switch and k: {"default": {"enabled": true, "k": 4}, "tasks": {"chat": {"enabled": false}}}."""

    default: dict = field(default_factory=dict)
    tasks: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> "Policy":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise SpecDeployError(f"cannot read policy {path}: {e}") from e
        if not isinstance(data, dict) or set(data) - {"default", "tasks"}:
            raise SpecDeployError(f"{path}: a policy is {{\"default\": {{...}}, \"tasks\": {{name: {{...}}}}}}")
        policy = cls(default=data.get("default", {}), tasks=data.get("tasks", {}))
        for name, entry in [("default", policy.default)] + list(policy.tasks.items()):
            if not isinstance(entry, dict) or set(entry) - {"enabled", "k"}:
                raise SpecDeployError(f"{path}: task {name!r}: only 'enabled' (bool) and 'k' (int) are allowed")
            if "k" in entry and not (isinstance(entry["k"], int) and 1 <= entry["k"] <= MAX_K):
                raise SpecDeployError(f"{path}: task {name!r}: k must be an integer in [1, {MAX_K}]")
            if "enabled" in entry and not isinstance(entry["enabled"], bool):
                raise SpecDeployError(f"{path}: task {name!r}: enabled must be true or false")
        return policy


@dataclass(frozen=True)
class RepoSpec:
    target: str = "smollm2"
    spec: SpecConfig = field(default_factory=lambda: SpecConfig(method="none"))
    instances: InstanceSpec = field(default_factory=InstanceSpec)
    dtype: str | None = None  # default: float32 on cpu, bfloat16 on gpu
    policy: Policy = field(default_factory=Policy)
    max_sequences: int = 256  # KV caches a verify/draft instance keeps before evicting the oldest
    max_concurrency: int = 64  # requests spec_decode runs at once (threads)
    cpu_threads: int = 1  # torch threads per model process: several processes share the cores
    extra_python_path: tuple[str, ...] = ()  # folders put before the venv's on the stub's sys.path

    @property
    def torch_dtype(self) -> str:
        return self.dtype or ("float32" if self.instances.kind == "cpu" else "bfloat16")


def python_path(extra: tuple[str, ...] = ()) -> list[str]:
    """Folders the stub must see: `extra`, specdeploy's own root, this interpreter's site-packages."""
    paths = [str(Path(p).resolve()) for p in extra] + [str(Path(specdeploy.__file__).resolve().parent.parent)]
    for key in ("purelib", "platlib"):
        p = sysconfig.get_paths()[key]
        if p not in paths:
            paths.append(p)
    return paths


def file_manifest(path: Path) -> dict[str, str]:
    """sha256 of a GGUF file, or of each weight/config/tokenizer file of a model folder."""
    from specdeploy.models.loader import file_sha256

    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _HASHED_SUFFIXES)
    return {str(f.resolve()): file_sha256(f) for f in files}


def write_repository(out: str | Path, rs: RepoSpec) -> Path:
    """Write the model repository for `rs` into `out`; returns its path."""
    from specdeploy.models.layerskip import layerskip_model
    from specdeploy.models.loader import load_model, resolve_source
    from specdeploy.models.tokenizers import check_compatible, stop_token_ids

    out = Path(out).resolve()
    _check_writable(out)
    spec = rs.spec
    if spec.method == "draft" and not spec.draft:
        raise SpecDeployError("method 'draft' needs a draft model: pass --draft PATH")
    target_path = resolve_source(rs.target)
    target = load_model(rs.target)
    cfg = target.model.config
    vocab = int(cfg.vocab_size)
    max_length = int(getattr(cfg, "max_position_embeddings", 2048))
    eos_ids = stop_token_ids(target.model, target.tokenizer)

    draft_entry = None
    if spec.method == "layerskip":
        layerskip_model(target.model, spec.layerskip_layers)  # validates the layer count now, not at serve time
        layers = spec.layerskip_layers or max(1, int(cfg.num_hidden_layers) // 4)
        draft_entry = _weights_entry(rs.target, target_path, target.source_hash, role="draft", layerskip_layers=layers)
    elif spec.method == "draft":
        draft_path = resolve_source(spec.draft)
        draft = load_model(spec.draft)
        check_compatible(target.tokenizer, draft.tokenizer)
        if int(draft.model.config.vocab_size) != vocab:
            raise SpecDeployError(f"draft vocab size {draft.model.config.vocab_size} differs from the target's {vocab}")
        draft_entry = _weights_entry(str(Path(spec.draft).resolve()) if Path(spec.draft).exists() else spec.draft,
                                     draft_path, draft.source_hash, role="draft")

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
            inputs=[Tensor("sequence_id", "UINT64", [1]), Tensor("tokens", "INT64", [-1]), Tensor("keep", "INT64", [1]),
                    Tensor("release", "BOOL", [1], optional=True)],
            outputs=[Tensor("logits", "FP32", [-1, vocab])],
        )
        verify_entry = _weights_entry(rs.target, target_path, target.source_hash, role="target")
        _python_model(tmp, "verify", groups["weights"],
                      common | verify_entry | {"dtype": rs.torch_dtype, "max_sequences": rs.max_sequences}, **weights_io)
        if draft_entry:
            _python_model(tmp, "draft", groups["weights"],
                          common | draft_entry | {"dtype": rs.torch_dtype, "max_sequences": rs.max_sequences}, **weights_io)
        request_inputs = [
            Tensor("temperature", "FP32", [1], optional=True), Tensor("top_p", "FP32", [1], optional=True),
            Tensor("top_k", "INT32", [1], optional=True), Tensor("random_seed", "UINT64", [1], optional=True),
            Tensor("stop_words", "STRING", [-1], optional=True), Tensor("stream", "BOOL", [1], optional=True),
            Tensor("task", "STRING", [1], optional=True), Tensor("num_draft_tokens", "INT32", [1], optional=True),
        ]
        stats_outputs = [
            Tensor("acceptance_rate", "FP32", [1]), Tensor("total_accepted_draft_tokens", "INT32", [1]),
            Tensor("total_draft_tokens", "INT32", [1]), Tensor("acceptance_length", "FP32", [1]),
            Tensor("finish_reason", "STRING", [1]),
        ]
        _python_model(
            tmp, "spec_decode", groups["light"],
            common | tok | {
                "method": spec.method, "k": spec.k, "ngram_min": spec.ngram_min, "ngram_max": spec.ngram_max,
                "eos_ids": eos_ids, "max_length": max_length, "vocab_size": vocab,
                "target_model": "verify", "draft_model": "draft" if draft_entry else None,
                "policy": asdict(rs.policy), "max_concurrency": rs.max_concurrency,
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
        )
        for name in ("preprocessing", "spec_decode", "postprocessing"):
            target.tokenizer.save_pretrained(tmp / name / tok["tokenizer"])
        _write_ensemble(tmp, request_inputs, stats_outputs)
        manifest = {
            "written_by": f"specdeploy {getattr(specdeploy, '__version__', '?')}",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "target": verify_entry, "draft": draft_entry,
            "method": spec.method, "k": spec.k, "dtype": rs.torch_dtype, "cpu_threads": rs.cpu_threads,
            "instances": asdict(rs.instances), "policy": asdict(rs.policy),
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


def _weights_entry(source: str, path: Path, digest: str, *, role: str, layerskip_layers: int | None = None) -> dict:
    entry = {"role": role, "source": source, "source_path": str(path), "sha256": digest, "files": file_manifest(path)}
    if layerskip_layers:
        entry["layerskip_layers"] = layerskip_layers
    return entry


def _groups(inst: InstanceSpec) -> dict[str, str]:
    """instance_group text for the weight models (verify, draft) and the light ones (tokenizers, BLS)."""
    # verify/draft keep KV caches in their process: one instance per device, so a
    # sequence's steps always reach the instance holding its cache
    if inst.kind == "gpu":
        weights = instance_group("gpu", 1, inst.gpus[:1])
    else:
        weights = instance_group("cpu", 1)
    return {"weights": weights, "light": instance_group("cpu", inst.count)}


def _python_model(repo: Path, name: str, group: str, settings: dict, *, inputs: list[Tensor], outputs: list[Tensor],
                  decoupled: bool = False) -> None:
    d = repo / name
    (d / "1").mkdir(parents=True)
    (d / "config.pbtxt").write_text(model_config(name, inputs, outputs, group, settings, decoupled=decoupled))
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
