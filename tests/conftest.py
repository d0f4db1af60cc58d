"""Shared fixtures: the embedded SmolLM2 in float32 (CPU), loaded once per test session."""
from __future__ import annotations

import pytest
import torch

from specdeploy.models.loader import LoadedModel, load_model


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    torch.manual_seed(0)
    return load_model("smollm2", dtype=torch.float32)


@pytest.fixture(scope="session")
def smollm2_dir(smollm2) -> str:
    """The converted safetensors directory of SmolLM2 (a plain Hugging Face model dir)."""
    from specdeploy.models.loader import cache_root

    return str(cache_root() / "models" / smollm2.source_hash[:24])
