"""config.pbtxt text for Python-backend models and ensembles (protobuf text format).

All models use max_batch_size 0: a request's shapes are exactly the dims below.
Settings travel as one JSON string parameter, `specdeploy`, read back by
`models.common.settings(args)`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

SETTINGS_KEY = "specdeploy"


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # Triton datatype without TYPE_: STRING, INT64, FP32, BOOL ...
    dims: list[int]
    optional: bool = False

    def pbtxt(self) -> str:
        opt = "\n    optional: true" if self.optional else ""
        return (f'  {{\n    name: "{self.name}"\n    data_type: TYPE_{self.dtype}\n'
                f'    dims: [ {", ".join(map(str, self.dims))} ]{opt}\n  }}')


def quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def instance_group(kind: str, count: int, gpus: tuple[int, ...] = ()) -> str:
    gpu_list = f"\n    gpus: [ {', '.join(map(str, gpus))} ]" if gpus else ""
    return f"instance_group [\n  {{\n    kind: KIND_{kind.upper()}\n    count: {count}{gpu_list}\n  }}\n]\n"


def sequence_batching(max_sequences: int, idle_s: float) -> str:
    """Triton's sequence batcher, Oldest strategy, for models that keep state per sequence.

    Every request with one correlation ID (a sequence: SEQUENCE_START flag on its first
    request, SEQUENCE_END on its last) reaches the same model instance, so with several
    instances a sequence's steps still find its KV cache. Each instance takes up to
    `max_sequences` sequences at once (more wait in Triton's backlog); the control inputs
    START, END (TYPE_BOOL [1]) and CORRID (TYPE_UINT64 [1]) tell the model which
    sequence a request belongs to. A sequence idle for `idle_s` is dropped by Triton.
    """
    def control(name: str, kind: str, value: str) -> str:
        return (f'    {{\n      name: "{name}"\n      control [\n        {{\n          kind: CONTROL_SEQUENCE_{kind}\n'
                f'          {value}\n        }}\n      ]\n    }}')

    controls = ",\n".join([control("START", "START", "bool_false_true: [ false, true ]"),
                           control("END", "END", "bool_false_true: [ false, true ]"),
                           control("CORRID", "CORRID", "data_type: TYPE_UINT64")])
    return (f"sequence_batching {{\n  max_sequence_idle_microseconds: {int(idle_s * 1e6)}\n"
            f"  oldest {{\n    max_candidate_sequences: {max_sequences}\n  }}\n"
            f"  control_input [\n{controls}\n  ]\n}}\n")


def model_config(name: str, inputs: list[Tensor], outputs: list[Tensor], group: str, settings: dict,
                 *, decoupled: bool = False, scheduling: str = "") -> str:
    """config.pbtxt of a Python-backend model; `scheduling`: e.g. a sequence_batching block."""
    parts = [
        f'name: "{name}"',
        'backend: "python"',
        "max_batch_size: 0",
        "input [\n" + ",\n".join(t.pbtxt() for t in inputs) + "\n]",
        "output [\n" + ",\n".join(t.pbtxt() for t in outputs) + "\n]",
        group.rstrip(),
    ]
    if scheduling:
        parts.append(scheduling.rstrip())
    if decoupled:
        parts.append("model_transaction_policy {\n  decoupled: true\n}")
    parts.append(f'parameters {{\n  key: "{SETTINGS_KEY}"\n  value: {{\n    string_value: {quote(json.dumps(settings))}\n  }}\n}}')
    return "\n".join(parts) + "\n"


def ensemble_config(name: str, inputs: list[Tensor], outputs: list[Tensor],
                    steps: list[tuple[str, dict[str, str], dict[str, str]]]) -> str:
    """steps: (model, {model input: ensemble tensor}, {model output: ensemble tensor})."""
    step_text = []
    for model, input_map, output_map in steps:
        maps = [f'      input_map {{ key: "{k}" value: "{v}" }}' for k, v in input_map.items()]
        maps += [f'      output_map {{ key: "{k}" value: "{v}" }}' for k, v in output_map.items()]
        step_text.append(f'    {{\n      model_name: "{model}"\n      model_version: -1\n' + "\n".join(maps) + "\n    }")
    return "\n".join([
        f'name: "{name}"',
        'platform: "ensemble"',
        "max_batch_size: 0",
        "input [\n" + ",\n".join(t.pbtxt() for t in inputs) + "\n]",
        "output [\n" + ",\n".join(t.pbtxt() for t in outputs) + "\n]",
        "ensemble_scheduling {\n  step [\n" + ",\n".join(step_text) + "\n  ]\n}",
    ]) + "\n"
