"""postprocessing: output_ids (all generated so far) + previous_length -> the new text_output.

Stateless: a streamed response carries every id generated so far and how many the
previous responses carried, so each piece is decoded from whole characters. The
acceptance statistics and the decision from spec_decode pass through unchanged.
"""
from __future__ import annotations

import triton_python_backend_utils as pb_utils

from specdeploy.errors import SpecDeployError
from specdeploy.triton_repo.models.common import array, error_response, scalar, settings, string_tensor, strings, tokenizer_from
from specdeploy.triton_repo.text import text_delta

PASS_THROUGH = ("acceptance_rate", "total_accepted_draft_tokens", "total_draft_tokens", "acceptance_length", "finish_reason",
                "decision")


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.settings = settings(args)
        self.tokenizer = tokenizer_from(self.settings)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                ids = array(request, "output_ids").reshape(-1).tolist()
                previous = int(scalar(request, "previous_length", required=True))
                finish = scalar(request, "finish_reason", default="")
                text = text_delta(self.tokenizer, ids, previous, strings(request, "stop_words"), final=bool(finish))
                outputs = [string_tensor("text_output", text)]
                outputs += [pb_utils.Tensor(name, array(request, name)) for name in PASS_THROUGH]
                responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
            except (SpecDeployError, UnicodeDecodeError) as e:
                responses.append(error_response(f"postprocessing: {e}"))
        return responses
