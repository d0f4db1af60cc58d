"""preprocessing: text_input STRING [1] -> input_ids INT64 [n] (chat template, as SpecEngine.encode)."""
from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from specdeploy.errors import SpecDeployError
from specdeploy.models.tokenizers import encode_prompt
from specdeploy.triton_repo.models.common import error_response, scalar, settings, tokenizer_from


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.settings = settings(args)
        self.tokenizer = tokenizer_from(self.settings)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                text = scalar(request, "text_input", required=True)
                ids = encode_prompt(self.tokenizer, text)
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("input_ids", np.array(ids, dtype=np.int64))]))
            except (SpecDeployError, UnicodeDecodeError) as e:
                responses.append(error_response(f"preprocessing: {e}"))
        return responses
