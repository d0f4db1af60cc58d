"""Helpers shared by the served models: settings, typed inputs, error responses."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from specdeploy.errors import SpecDeployError
from specdeploy.triton_repo.pbtxt import SETTINGS_KEY


def settings(args: dict) -> dict:
    """The JSON settings the writer put into config.pbtxt, plus the model's folder."""
    config = json.loads(args["model_config"])
    data = json.loads(config["parameters"][SETTINGS_KEY]["string_value"])
    data["model_dir"] = str(Path(args["model_repository"]))
    return data


def setup_torch(data: dict) -> None:
    """No progress bars in the server log; torch threads as the repository says."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no progress bars in the server log
    if data.get("cpu_threads"):
        import torch

        torch.set_num_threads(int(data["cpu_threads"]))  # 2 threads in 3 busy processes on 2 cores is 4x slower


def tokenizer_from(s: dict):
    from transformers import AutoTokenizer

    setup_torch(s)
    return AutoTokenizer.from_pretrained(Path(s["model_dir"]) / s["tokenizer"])


def logger(name: str) -> logging.Logger:
    """A logger whose records reach the server log (the stub's stderr)."""
    log = logging.getLogger(f"specdeploy.triton.{name}")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"specdeploy {name} %(levelname)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


def array(request, name: str, required: bool = True) -> np.ndarray | None:
    t = pb_utils.get_input_tensor_by_name(request, name)
    if t is None:
        if required:
            raise SpecDeployError(f"missing input {name!r}")
        return None
    return t.as_numpy()


def scalar(request, name: str, default=None, required: bool = False):
    """A one-element input as a Python value (bytes decoded), or `default` when absent."""
    a = array(request, name, required)
    if a is None:
        return default
    if a.size != 1:
        raise SpecDeployError(f"input {name!r} must hold exactly one value, got shape {list(a.shape)}")
    v = a.reshape(-1)[0]
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="strict")
    return v.item() if hasattr(v, "item") else v


def strings(request, name: str) -> tuple[str, ...]:
    a = array(request, name, required=False)
    if a is None:
        return ()
    return tuple(v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in a.reshape(-1) if v not in (b"", ""))


def error_response(message: str):
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))


def string_tensor(name: str, value: str) -> "pb_utils.Tensor":
    return pb_utils.Tensor(name, np.array([value.encode("utf-8")], dtype=np.object_))
