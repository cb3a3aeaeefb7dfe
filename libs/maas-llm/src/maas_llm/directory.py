"""Hugging Face causal-LM directories: check one, zip it for the registry, unzip it to serve.

A causal-LM directory is what `maas_llm.convert` writes (and what Hugging Face ships for a
generator): config.json naming a *ForCausalLM architecture, model.safetensors, tokenizer.json
with tokenizer_config.json, the chat template (chat_template.jinja or inside
tokenizer_config.json) and generation_config.json. The file rules (no pickle-capable weights,
no symbolic links, a complete tokenizer) are maas_text's `HfDirectory.open`; the zip rules are
`maas_formats.validate_causal_lm`, the registry's own check of MODEL_FORMAT_CAUSAL_LM.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maas_formats.opaque import is_causal_lm_config, validate_causal_lm
from maas_runtime.errors import InvalidArgument
from maas_text.directory import HfDirectory, unzip_directory, zip_directory

CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"


@dataclass(frozen=True)
class CausalLmDirectory:
    """A checked causal-LM directory; build it with `CausalLmDirectory.open`."""

    path: Path
    config: dict[str, Any]
    tokenizer_config: dict[str, Any]
    chat_template: str

    @classmethod
    def open(
        cls, directory: str | os.PathLike[str], *, field_path: str = "directory"
    ) -> CausalLmDirectory:
        """Check `directory`; InvalidArgument naming what is missing or refused."""
        checked = HfDirectory.open(directory, field_path=field_path)
        if not is_causal_lm_config(checked.config):
            raise InvalidArgument.for_field(
                field_path,
                f"config.json names no *ForCausalLM architecture "
                f"({checked.config.get('architectures')!r})",
                reason="NOT_A_CAUSAL_LM",
            )
        if checked.weights_format != "safetensors" or "tokenizer.json" not in checked.files:
            raise InvalidArgument.for_field(
                field_path,
                "a causal LM needs model.safetensors and tokenizer.json",
                reason="CAUSAL_LM_FILES_MISSING",
            )
        return cls(
            path=checked.path,
            config=checked.config,
            tokenizer_config=checked.tokenizer_config,
            chat_template=_chat_template(checked.path, checked.tokenizer_config),
        )

    @property
    def context_length(self) -> int:
        value = self.config.get("max_position_embeddings")
        return value if isinstance(value, int) and value > 0 else 2048

    def eos_token_ids(self) -> tuple[int, ...]:
        """Token ids that end a generation: generation_config.json's, else config.json's."""
        generation_path = self.path / GENERATION_CONFIG_FILE
        sources = [self.config]
        if generation_path.is_file():
            sources.insert(0, json.loads(generation_path.read_text(encoding="utf-8")))
        for source in sources:
            value = source.get("eos_token_id")
            if isinstance(value, int):
                return (value,)
            if isinstance(value, list) and all(isinstance(v, int) for v in value):
                return tuple(value)
        return ()

    def facts(self) -> dict[str, str]:
        """What the registry records on a CAUSAL_LM version (labels)."""
        return {
            "architecture": str(self.config.get("model_type", "")),
            "context_length": str(self.context_length),
            "vocabulary_size": str(self.config.get("vocab_size", "")),
            "chat_template": "present" if self.chat_template else "absent",
            "dtype": str(self.config.get("dtype") or self.config.get("torch_dtype") or ""),
        }


def _chat_template(path: Path, tokenizer_config: dict[str, Any]) -> str:
    template_file = path / CHAT_TEMPLATE_FILE
    if template_file.is_file():
        return template_file.read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    return template if isinstance(template, str) else ""


def zip_causal_lm(
    directory: str | os.PathLike[str], destination: str | os.PathLike[str]
) -> Path:
    """Check `directory` as a causal LM and zip it into `destination` (a CAUSAL_LM artifact)."""
    CausalLmDirectory.open(directory)
    return zip_directory(directory, destination, validate=validate_causal_lm)


def unzip_causal_lm(
    archive_path: str | os.PathLike[str], destination: str | os.PathLike[str]
) -> CausalLmDirectory:
    """Validate a CAUSAL_LM zip, extract it atomically and open the directory it holds."""
    root = unzip_directory(archive_path, destination, validate=validate_causal_lm)
    return CausalLmDirectory.open(root)
