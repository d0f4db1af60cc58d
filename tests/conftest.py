"""Shared fixtures: the embedded SmolLM2 in float32 (CPU), loaded once per test session."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # set before transformers imports Triton: fused-kernel tests run its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from specdeploy.config import SamplingParams, SpecConfig

from specdeploy.models.loader import LoadedModel, load_model
from specdeploy.runtime.switch import SpecSwitch


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test beside a tritonserver that has exited reports the server's exit code and log tail."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    from specdeploy.triton_repo.server import TritonServer

    for name, value in getattr(item, "funcargs", {}).items():
        if isinstance(value, TritonServer) and value.process is not None and value.process.poll() is not None:
            report.sections.append((f"tritonserver of fixture {name!r} exited with code {value.process.returncode}",
                                    value.log_tail(80)))


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    torch.manual_seed(0)
    return load_model("smollm2", dtype=torch.float32)


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules whose tests run beside server processes: on 2 cores one torch thread each is faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2_dir(smollm2) -> str:
    """The converted safetensors directory of SmolLM2 (a plain Hugging Face model dir)."""
    from specdeploy.models.loader import cache_root

    return str(cache_root() / "models" / smollm2.source_hash[:24])


def greedy_reference(target: LoadedModel, prompts: list[str], max_new: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, the target's own greedy `generate` continuation) for each prompt."""
    from specdeploy.runtime.engine import SpecEngine

    engine = SpecEngine(target, SpecConfig(method="none"))
    out = []
    for prompt in prompts:
        ids = engine.encode(prompt, max_new_tokens=max_new)
        x = torch.tensor([ids])
        with torch.no_grad():
            gen = target.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new,
                                        eos_token_id=sorted(engine.eos_ids), pad_token_id=target.tokenizer.eos_token_id)
        out.append((ids, gen[0, len(ids):].tolist()))
    return out


def assert_matches_reference(engine, reference, prompts: list[str], max_new: int) -> None:
    """Every prompt's speculative greedy output equals the reference, token for token."""
    for i, (ids, ref) in enumerate(reference):
        got = engine.generate_ids(ids, SamplingParams(max_new_tokens=max_new)).token_ids
        assert got == ref, f"prompt {i} ({prompts[i]!r}): {got} != {ref}"


class AlternatingSwitch(SpecSwitch):
    """Spec for `on` steps out of every `period`: drafts must catch up on the tokens of plain steps."""

    def __init__(self, on: int, period: int) -> None:
        super().__init__("auto")
        self.on, self.period = on, period

    def choose(self, slots: int = 1) -> bool:
        self._steps += 1
        return self._steps % self.period < self.on

    def expects_spec(self) -> bool:
        return (self._steps + 1) % self.period < self.on
