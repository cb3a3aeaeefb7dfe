"""Generative models in the SDK: import a GGUF file or a Hugging Face causal-LM directory.

`import_gguf` registers the GGUF itself (MODEL_FORMAT_GGUF; the registry reads its header and
records architecture, context length, vocabulary, quantization and chat-template presence as
`gguf.*` labels) and, with `bf16`, its conversion to a bf16 safetensors causal-LM directory
(MODEL_FORMAT_CAUSAL_LM, lineage pointing at the GGUF version, operation "convert"), which a
deployment loads in seconds instead of converting at every start. Both are served as text in
(BYTES `text_input`) and a token stream out (BYTES `text_output`). Conversion runs here, in
the caller's process, and needs maas-llm's `engine` extra (torch, transformers).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maas.registry.v1 import model_pb2
from maas_llm.directory import CausalLmDirectory, zip_causal_lm
from maas_runtime.errors import FailedPrecondition

TEXT_INPUT = "text_input"
TEXT_OUTPUT = "text_output"
LABEL_PREFIX = "llm."


def generation_signature() -> dict[str, Any]:
    """The signature of a generative version: one prompt text in, the generated text out."""
    return {
        "inputs": [{"name": TEXT_INPUT, "datatype": "DATA_TYPE_BYTES", "shape": [1]}],
        "outputs": [{"name": TEXT_OUTPUT, "datatype": "DATA_TYPE_BYTES", "shape": [1]}],
    }


@dataclass(frozen=True)
class LlmImport:
    """What an import registered: the GGUF version and, when converted, its bf16 version."""

    gguf: model_pb2.ModelVersion | None
    causal_lm: model_pb2.ModelVersion | None

    @property
    def versions(self) -> list[model_pb2.ModelVersion]:
        return [version for version in (self.gguf, self.causal_lm) if version is not None]


def causal_lm_fields(
    directory: str | os.PathLike[str], work_dir: str | os.PathLike[str]
) -> tuple[Path, dict[str, str]]:
    """(zip to upload, labels) of a causal-LM directory (checked: no pickle, safetensors)."""
    checked = CausalLmDirectory.open(directory)
    archive = zip_causal_lm(checked.path, Path(work_dir) / "model.zip")
    labels = {f"{LABEL_PREFIX}{key}": value[:63] for key, value in checked.facts().items() if value}
    return archive, labels


def convert_gguf(path: str | os.PathLike[str], work_dir: str | os.PathLike[str]) -> CausalLmDirectory:
    """The bf16 causal-LM directory of a GGUF file, written under `work_dir`."""
    try:
        from maas_llm.convert import convert_gguf_to_causal_lm
    except ImportError as error:  # the engine extra is missing
        raise FailedPrecondition(
            f"converting a GGUF needs torch and transformers ({error}); install maas-llm[engine] "
            "or import with bf16=False",
            reason="LLM_ENGINE_NOT_INSTALLED",
        ) from None
    return convert_gguf_to_causal_lm(path, Path(work_dir) / "bf16")
