"""The SmolLM2 bf16 directory (converted once, cached under build/llm-cache) for the LLM tests."""

from __future__ import annotations

import pytest
from maas_llm.directory import CausalLmDirectory

from tests.support.llm import smollm2_causal_lm


@pytest.fixture(scope="session")
def smollm2() -> CausalLmDirectory:
    return smollm2_causal_lm()
