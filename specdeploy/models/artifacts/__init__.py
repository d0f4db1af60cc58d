"""Trained drafts shipped with specdeploy, and the manifest every draft artifact carries.

An artifact is a folder: ``weights.safetensors`` (only what the draft adds to the target:
layers, heads, norms; the target's embedding and lm_head are reused at load time),
``config.json`` (the architecture) and ``manifest.json`` (kind, target hash, tokenizer
hash, training data manifest, steps, final losses, head accuracies). Loaders read the
manifest, never the folder name. A draft trained for another target hash loads with a
`DraftMismatchWarning`; a different tokenizer is refused.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from specdeploy.errors import SpecDeployError

ARTIFACTS_DIR = Path(__file__).resolve().parent
WEIGHTS, CONFIG, MANIFEST = "weights.safetensors", "config.json", "manifest.json"
KINDS = ("draft_lm", "medusa", "eagle")
# the default artifact of each kind for the embedded target
DEFAULTS = {"draft_lm": "smollm2-draft", "medusa": "smollm2-medusa", "eagle": "smollm2-eagle"}


class DraftMismatchWarning(UserWarning):
    """A draft artifact was trained for another target (it may be stale)."""


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of the vocabulary (every token and its id): equal hashes mean interchangeable ids.

    Special-token attributes are left out on purpose: the same GGUF tokenizer reports
    eos/pad differently across transformers versions (5.17: eos 1, pad None; 5.24: eos 2,
    pad 2) while every id means the same token.
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def is_artifact(path: str | Path | None) -> bool:
    """True if `path` is a specdeploy draft artifact folder (it has a manifest of a known kind)."""
    if path is None:
        return False
    manifest = Path(path) / MANIFEST
    try:
        return manifest.is_file() and json.loads(manifest.read_text()).get("kind") in KINDS
    except (OSError, ValueError):
        return False


def resolve(kind: str, path: str | Path | None = None) -> Path:
    """The artifact folder to load: `path`, or the shipped default for `kind`."""
    folder = Path(path).expanduser() if path else ARTIFACTS_DIR / DEFAULTS[kind]
    if not (folder / MANIFEST).is_file():
        where = f"{folder}" if path else f"the default {kind} artifact ({folder})"
        raise SpecDeployError(f"{where} has no {MANIFEST}: not a specdeploy draft artifact")
    return folder


def read_manifest(folder: Path, kind: str) -> dict:
    manifest = json.loads((folder / MANIFEST).read_text())
    if manifest.get("kind") != kind:
        raise SpecDeployError(f"{folder}: manifest says kind {manifest.get('kind')!r}, expected {kind!r}")
    return manifest


def check_target(manifest: dict, folder: Path, target_hash: str, tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse another tokenizer; warn when the draft was trained for another target."""
    want_tok = manifest.get("tokenizer_hash")
    if want_tok and want_tok != tokenizer_hash(tokenizer):
        raise SpecDeployError(f"{folder}: this draft was trained with another tokenizer than the target's "
                              f"(tokenizer hash {want_tok[:12]} vs {tokenizer_hash(tokenizer)[:12]})")
    want = manifest.get("target_hash")
    if want != target_hash:
        warnings.warn(f"{folder.name}: draft was trained for target {str(want)[:12]}, but the target loaded is "
                      f"{target_hash[:12]}; it still runs losslessly, but its acceptance rate may be poor "
                      f"(retrain it with `specdeploy train`)", DraftMismatchWarning, stacklevel=3)


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
