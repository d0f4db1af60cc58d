"""Artifact manifests: what every exported graph and built engine directory carries.

A manifest names the files of its directory, the model it came from (the loader's
`source_hash`), the tokenizer (`tokenizer_hash`: the vocabulary and special tokens, so
re-serialising the same tokenizer does not change it), the format and quantization, the
library versions and the build time. Loaders read the manifest, never a file name, and
refuse an artifact made from another model or tokenizer (`check_source`).

An export or build directory with several components (target, draft) has a top-level
manifest of kind "bundle" whose `components` map a role to a sub-directory.
"""
from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from specdeploy.errors import SpecDeployError

MANIFEST = "manifest.json"
SCHEMA = 1


@dataclass(frozen=True)
class Manifest:
    kind: str  # "onnx" | "torch-quant" | "bundle"
    name: str  # role of this component: "target", "draft", or the bundle's name
    source: str = ""  # what the user named ('smollm2', a path, 'layerskip:8 of smollm2')
    source_hash: str = ""  # LoadedModel.source_hash of the model it was made from
    tokenizer_hash: str = ""  # tokenizer_hash() of its tokenizer
    files: dict[str, str] = field(default_factory=dict)  # role -> file name in this directory
    components: dict[str, str] = field(default_factory=dict)  # bundles: role -> sub-directory
    quant: dict[str, Any] = field(default_factory=dict)  # algorithm, scales summary, kernel path
    info: dict[str, Any] = field(default_factory=dict)  # format details: opset, dtype, I/O names, parity
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    schema: int = SCHEMA

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def tokenizer_hash(tokenizer: Any) -> str:
    """sha256 of the vocabulary (token -> id) and the special token ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = {k: getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")}
    payload = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def versions(*extra: str) -> dict[str, str]:
    """Versions of python, torch, transformers and any extra packages that are installed."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("specdeploy", "torch", "transformers", *extra):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_manifest(directory: str | Path, manifest: Manifest) -> Path:
    path = Path(directory) / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest.as_json(), indent=2, sort_keys=False) + "\n")
    return path


def read_manifest(directory: str | Path) -> Manifest:
    """The manifest of an artifact directory; SpecDeployError if missing, unreadable or newer."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise SpecDeployError(f"{directory}: no {MANIFEST} here; is it an export or build output directory?")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SpecDeployError(f"{path}: unreadable manifest ({e})") from e
    if not isinstance(data, dict) or "kind" not in data:
        raise SpecDeployError(f"{path}: not a specdeploy manifest")
    if int(data.get("schema", 0)) > SCHEMA:
        raise SpecDeployError(f"{path}: manifest schema {data['schema']} is newer than this specdeploy ({SCHEMA})")
    known = set(Manifest.__dataclass_fields__)
    return Manifest(**{k: v for k, v in data.items() if k in known})


def component_dir(directory: str | Path, role: str) -> Path | None:
    """Directory of one component (`target`, `draft`) of a bundle, or the directory itself
    when it holds a single artifact of that role; None when the bundle has no such role."""
    directory = Path(directory)
    m = read_manifest(directory)
    if m.kind == "bundle":
        sub = m.components.get(role)
        return None if sub is None else directory / sub
    return directory if m.name == role else None


def artifact_file(directory: str | Path, manifest: Manifest, role: str) -> Path:
    """The file a manifest lists for `role`; SpecDeployError if unlisted or missing."""
    name = manifest.files.get(role)
    if not name:
        raise SpecDeployError(f"{directory}/{MANIFEST} lists no {role!r} file")
    path = Path(directory) / name
    if not path.is_file():
        raise SpecDeployError(f"{path}: listed in the manifest but missing")
    return path


def check_source(manifest: Manifest, directory: str | Path, *, source_hash: str | None, tok_hash: str | None,
                 what: str) -> None:
    """Refuse an artifact built from another model (source_hash) or tokenizer (tok_hash).

    `what` names the model the caller has, for the message ("target smollm2")."""
    if source_hash is not None and manifest.source_hash != source_hash:
        raise SpecDeployError(
            f"{directory} was built from {manifest.source or 'another model'} (sha256 {manifest.source_hash[:12]}), "
            f"not from the {what} (sha256 {source_hash[:12]}); rebuild it from this model")
    if tok_hash is not None and manifest.tokenizer_hash != tok_hash:
        raise SpecDeployError(
            f"{directory} was built with another tokenizer (sha256 {manifest.tokenizer_hash[:12]}) than the "
            f"{what}'s ({tok_hash[:12]}); rebuild it with this model's tokenizer")
