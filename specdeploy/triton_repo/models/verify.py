"""verify (and draft): a causal LM holding one KV cache per sequence_id.

    sequence_id UINT64 [1], tokens INT64 [m], keep INT64 [1] (-1: new sequence), release BOOL [1]
    -> logits FP32 [m, vocab]

Weights load through `weights.load_weights` (load_model after checking every file the
repository lists), so a missing or corrupt file fails the load with a message naming it.
"""
from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from specdeploy.errors import SpecDeployError
from specdeploy.triton_repo.models.common import array, error_response, logger, scalar, settings, setup_torch
from specdeploy.triton_repo.weights import check_files


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.settings = settings(args)
        check_files(self.settings["files"])  # before torch is imported: a broken repository fails fast

        from specdeploy.triton_repo.kvstore import SequenceCaches
        from specdeploy.triton_repo.runner import KVRequest
        from specdeploy.triton_repo.weights import load_weights

        setup_torch(self.settings)
        self._request = KVRequest
        self.name = args["model_name"]
        device = "cpu"
        if args.get("model_instance_kind") == "GPU":
            device = f"cuda:{args['model_instance_device_id']}"
        # SpecDeployError (missing or corrupt file) -> the model's load fails with its message
        model = load_weights(self.settings, device, self.settings["dtype"])
        self.caches = SequenceCaches(model, self.settings.get("max_sequences", 256))
        logger(self.name).info("%s ready on %s (%s, %s)", self.name, device, self.settings["source"], self.settings["dtype"])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                req = self._request(
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
