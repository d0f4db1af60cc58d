"""verify (and draft): a causal LM holding one KV cache per sequence.

    tokens INT64 [m], keep INT64 [1] -> logits FP32 [m, vocab]
    control inputs from Triton's sequence batcher: START BOOL [1] (new sequence),
    END BOOL [1] (free its cache after this request), CORRID UINT64 [1] (the sequence id)

The sequence batcher routes every request of a sequence to the instance that holds its
cache, so the model may run as several instances (instance_group count, several GPUs).

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
        from specdeploy.triton_repo.runner import RESET, KVRequest
        from specdeploy.triton_repo.weights import load_weights

        setup_torch(self.settings)
        self._request, self._reset = KVRequest, RESET
        self.name = args["model_name"]
        self.instance = args.get("model_instance_name", self.name)
        self.log = logger(self.name)
        self._started = 0  # sequences this instance has started
        device = "cpu"
        if args.get("model_instance_kind") == "GPU":
            device = f"cuda:{args['model_instance_device_id']}"
        # SpecDeployError (missing or corrupt file) -> the model's load fails with its message
        model = load_weights(self.settings, device, self.settings["dtype"])
        self.caches = SequenceCaches(model, self.settings.get("max_sequences", 256))
        self.log.info("%s ready on %s (%s, %s)", self.name, device, self.settings["source"], self.settings["dtype"])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                start = bool(scalar(request, "START", default=False))
                req = self._request(
                    sequence_id=int(scalar(request, "CORRID", required=True)),
                    tokens=array(request, "tokens").reshape(-1).astype(np.int64),
                    keep=self._reset if start else int(scalar(request, "keep", required=True)),
                    release=bool(scalar(request, "END", default=False)),
                )
                if req.tokens.size and (req.tokens.min() < 0 or req.tokens.max() >= self.caches.vocab_size):
                    raise SpecDeployError(f"token ids must be in [0, {self.caches.vocab_size})")
                logits = self.caches.step(req)
                if start:
                    self._started += 1
                    if self._started == 1:  # shows which instances the sequence batcher uses
                        self.log.info("instance %s started its first sequence", self.instance)
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("logits", logits)]))
            except (SpecDeployError, KeyError, ValueError, RuntimeError) as e:
                responses.append(error_response(f"{self.name}: {e}"))
        return responses

    def finalize(self) -> None:
        self.caches = None
