"""verify (and draft): a causal LM holding one KV cache per sequence_id.

    sequence_id UINT64 [1], tokens INT64 [m], keep INT64 [1] (-1: new sequence), release BOOL [1]
    -> logits FP32 [m, vocab]

Weights load through `specdeploy.models.loader.load_model` after every file the
repository's manifest lists is checked (present, same sha256), so a missing or corrupt
file fails the model's load with a message naming it. The draft model of method
"layerskip" is the target's first N layers.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from specdeploy.errors import SpecDeployError
from specdeploy.triton_repo.kvstore import SequenceCaches
from specdeploy.triton_repo.models.common import array, error_response, logger, scalar, settings
from specdeploy.triton_repo.runner import KVRequest

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_files(files: dict[str, str]) -> None:
    """Every listed file exists and has the sha256 recorded when the repository was written."""
    from specdeploy.models.loader import file_sha256

    for name, digest in files.items():
        path = Path(name)
        if not path.is_file():
            raise SpecDeployError(f"model file missing: {path}")
        found = file_sha256(path)
        if found != digest:
            raise SpecDeployError(f"model file corrupt: {path} (sha256 {found[:16]}..., the repository expects {digest[:16]}...)")


def load(s: dict, device: str):
    from specdeploy.models.layerskip import layerskip_model
    from specdeploy.models.loader import load_model

    check_files(s["files"])
    loaded = load_model(s["source_path"], device=device, dtype=DTYPES[s["dtype"]])
    if loaded.source_hash != s["sha256"]:
        raise SpecDeployError(f"{s['source_path']}: weights hash {loaded.source_hash[:16]}... differs from the repository's {s['sha256'][:16]}...")
    model = loaded.model
    if s.get("layerskip_layers"):
        model = layerskip_model(model, s["layerskip_layers"])
    return model


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.settings = settings(args)
        self.name = args["model_name"]
        device = "cpu"
        if args.get("model_instance_kind") == "GPU":
            device = f"cuda:{args['model_instance_device_id']}"
        model = load(self.settings, device)  # SpecDeployError -> the load fails with its message
        self.caches = SequenceCaches(model, self.settings.get("max_sequences", 256))
        logger(self.name).info("%s ready on %s (%s, %s)", self.name, device, self.settings["source"], self.settings["dtype"])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                req = KVRequest(
                    sequence_id=int(scalar(request, "sequence_id", required=True)),
                    tokens=array(request, "tokens").reshape(-1).astype(np.int64),
                    keep=int(scalar(request, "keep", required=True)),
                    release=bool(scalar(request, "release", default=False)),
                )
                if req.tokens.size and (req.tokens.min() < 0 or req.tokens.max() >= self.caches.vocab_size):
                    raise SpecDeployError(f"token ids must be in [0, {self.caches.vocab_size})")
                logits = self.caches.step(req)
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("logits", logits)]))
            except (SpecDeployError, KeyError, ValueError, RuntimeError) as e:
                responses.append(error_response(f"{self.name}: {e}"))
        return responses

    def finalize(self) -> None:
        self.caches = None
