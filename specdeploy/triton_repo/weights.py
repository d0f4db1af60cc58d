"""Loading the weights a repository names, after checking them against its manifest.

The writer records every file of the target (and draft) with its sha256; a served model
checks them before loading, so a missing or corrupt file fails the model's load with a
message that names the file rather than a stack trace from deep inside a loader. This
holds for engine folders from `specdeploy build` too (weights, config, tokenizer and
manifest.json), which load through `build.engine.load_quantized`.
"""
from __future__ import annotations

from pathlib import Path

from specdeploy.errors import SpecDeployError

DTYPES = ("float32", "bfloat16", "float16")


def check_files(files: dict[str, str]) -> None:
    """Every listed file exists and has the sha256 recorded when the repository was written.

    Cheap to call before torch is imported, so a broken repository fails fast."""
    for name in files:
        if not Path(name).is_file():
            raise SpecDeployError(f"model file missing: {name}")
    from specdeploy.models.loader import file_sha256  # imports torch: after the cheap check

    for name, digest in files.items():
        path = Path(name)
        found = file_sha256(path)
        if found != digest:
            raise SpecDeployError(f"model file corrupt: {path} (sha256 {found[:16]}..., the repository expects {digest[:16]}...)")


def load_weights(entry: dict, device: str = "cpu", dtype: str = "float32"):
    """The model a repository entry names (the target, a draft, or the target's first N layers),
    from a model source or from a built engine (`entry["engine"]`)."""
    import torch

    from specdeploy.models.layerskip import layerskip_model
    from specdeploy.models.loader import load_model

    if dtype not in DTYPES:
        raise SpecDeployError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    check_files(entry["files"])
    if entry.get("engine"):  # a torch engine of `specdeploy build`: quantized weights + manifest
        from specdeploy.build.engine import load_quantized

        model, manifest = load_quantized(entry["engine"], device, getattr(torch, dtype))
        digest = manifest.source_hash
    else:
        loaded = load_model(entry["source_path"], device=device, dtype=getattr(torch, dtype))
        model, digest = loaded.model, loaded.source_hash
    if digest != entry["sha256"]:
        raise SpecDeployError(f"{entry['source_path']}: weights hash {digest[:16]}... differs from the "
                              f"repository's {entry['sha256'][:16]}...")
    if entry.get("layerskip_layers"):
        model = layerskip_model(model, entry["layerskip_layers"])
    return model
