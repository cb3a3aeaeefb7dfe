"""Sanity checks for the model formats stored as opaque bytes: TorchScript, ONNX, Hugging Face.

The registry cannot run these models, and must not try: TorchScript archives contain pickles
that only `torch.jit.load` in the serving runtime ever opens. What it can do cheaply is prove
the upload is the kind of file it claims to be, so a mislabelled or truncated artifact fails
at upload (INVALID_ARGUMENT) instead of at deployment. The Hugging Face zip gets the strictest
check because the inference service unpacks it: no pickled weights, no path escaping the
extraction directory.
"""

from __future__ import annotations

import json
import os
import re
import stat
import zipfile
import zlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from maas_runtime.errors import InvalidArgument, ResourceExhausted, ViolationCollector

from maas_formats.safetensors_header import SafetensorsHeader, read_safetensors_header

# Weight formats that torch / joblib load with pickle; a Hugging Face upload must use
# safetensors instead.
PICKLE_CAPABLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib"})

# config.json is tiny in practice; the bound keeps a hostile zip from making us inflate
# gigabytes just to parse "configuration".
MAX_CONFIG_JSON_BYTES = 16 * 1024 * 1024

_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")

# What reading a damaged member raises: bad CRC (BadZipFile), damaged deflate/bzip2/lzma
# streams (zlib.error, OSError, EOFError, ValueError), unsupported compression
# (NotImplementedError).
_CORRUPT_MEMBER_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    OSError,
    EOFError,
    ValueError,
    NotImplementedError,
)


@dataclass(frozen=True)
class HfTransformerInfo:
    """What the Hugging Face check learned about a zipped model directory.

    `root` is the folder holding config.json ("" or "name/"); `weights` maps each safetensors
    member to its header.
    """

    root: str
    config: dict
    weights: dict[str, SafetensorsHeader]
    # The ONNX conversion of the model ("model.onnx" under `root`) when it ships one.
    onnx_model: str | None = None
    # Tokenizer files found under `root`, relative to it (see `hf_tokenizer_files`).
    tokenizer_files: tuple[str, ...] = ()

    @property
    def parameter_count(self) -> int:
        return sum(header.parameter_count for header in self.weights.values())


# The name the ONNX variant of a Hugging Face directory (the compressor's convert) gives its
# graph; such a directory carries the tokenizer and config but may hold no safetensors.
HF_ONNX_WEIGHTS = "model.onnx"


def hf_tokenizer_files(names: Collection[str]) -> tuple[str, ...]:
    """The tokenizer files among `names` (relative to the model folder), or () if incomplete.

    A fast tokenizer's `tokenizer.json` is complete by itself; otherwise `tokenizer_config.json`
    plus its vocabulary (`vocab.txt` for WordPiece, `vocab.json` + `merges.txt` for BPE, a
    sentencepiece `*.model`). Both the directory check (maas_text) and the zip check use it.
    """
    present = set(names)
    extras = tuple(
        sorted(
            name
            for name in ("tokenizer_config.json", "special_tokens_map.json")
            if name in present
        )
    )
    if "tokenizer.json" in present:
        return ("tokenizer.json", *extras)
    if "tokenizer_config.json" not in present:
        return ()
    sentencepiece = sorted(n for n in present if "/" not in n and n.endswith(".model"))
    for vocabulary in (("vocab.txt",), ("vocab.json", "merges.txt"), tuple(sentencepiece[:1])):
        if vocabulary and all(name in present for name in vocabulary):
            return (*extras, *vocabulary)
    return ()


def _open_zip(path: str | os.PathLike[str], field_path: str, kind: str) -> zipfile.ZipFile:
    if not zipfile.is_zipfile(path):
        raise InvalidArgument.for_field(field_path, f"{kind} must be a zip archive")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise InvalidArgument.for_field(field_path, f"{kind} zip is corrupt ({error})") from None


def member_name_problem(info: zipfile.ZipInfo) -> str | None:
    """Why a zip member would be unsafe to extract (zip-slip, links, encryption), or None."""
    name = info.filename
    normalised = name.replace("\\", "/")
    if normalised.startswith("/") or _WINDOWS_DRIVE.match(normalised):
        return f"member {name!r} has an absolute path"
    if ".." in PurePosixPath(normalised).parts:
        return f"member {name!r} escapes the archive with '..'"
    if "\x00" in name:
        return f"member {name!r} contains a NUL byte"
    # Unix mode bits live in the high 16 bits of external_attr; a symlink member would let
    # an extractor write outside the target directory on a later member.
    if stat.S_ISLNK(info.external_attr >> 16):
        return f"member {name!r} is a symbolic link"
    if info.flag_bits & 0x1:
        return f"member {name!r} is encrypted"
    return None


def _check_member_names(
    members: Sequence[zipfile.ZipInfo], collector: ViolationCollector, field_path: str
) -> None:
    seen: set[str] = set()
    for info in members:
        problem = member_name_problem(info)
        if problem:
            collector.add(field_path, problem)
        if info.filename in seen:
            collector.add(field_path, f"member {info.filename!r} appears twice")
        seen.add(info.filename)


def validate_torchscript(path: str | os.PathLike[str], *, field_path: str = "artifact") -> None:
    """Check that `path` looks like a `torch.jit.save` archive, without unpickling anything.

    A TorchScript archive is a zip with one top folder holding `data.pkl` and the serialized
    `code/`. A plain `torch.save` checkpoint has `data.pkl` but no `code/` — it is a pickle,
    not a TorchScript program, and `torch.jit.load` would refuse it — so both are required.
    """
    with _open_zip(path, field_path, "a TorchScript archive") as archive:
        members = archive.infolist()
        collector = ViolationCollector()
        _check_member_names(members, collector, field_path)
        collector.raise_if_any("unsafe TorchScript archive")
        names = [info.filename for info in members]
    has_data_pickle = any(re.fullmatch(r"[^/]+/data\.pkl", name) for name in names)
    has_code = any(re.match(r"[^/]+/code/", name) for name in names)
    if not (has_data_pickle and has_code):
        expected = {"<archive>/data.pkl": has_data_pickle, "<archive>/code/": has_code}
        missing = [entry for entry, present in expected.items() if not present]
        raise InvalidArgument.for_field(
            field_path,
            f"not a TorchScript archive: no {' and no '.join(missing)} entry "
            "(save the model with torch.jit.save)",
        )


def _read_varint(stream: BinaryIO) -> int | None:
    """A protobuf base-128 varint, or None at a clean end of file."""
    value = 0
    for shift in range(0, 70, 7):
        byte = stream.read(1)
        if not byte:
            if shift == 0:
                return None
            raise EOFError("file ends inside a varint")
        value |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return value
    raise ValueError("varint longer than 10 bytes")


# ModelProto field numbers (onnx.proto): 1 ir_version, 7 graph.
_ONNX_IR_VERSION_TAG = (1 << 3) | 0
_ONNX_GRAPH_FIELD = 7
# A real ModelProto has a handful of top-level fields (opset imports, metadata, functions);
# the bound keeps a file of millions of tiny fields from pinning a CPU in this loop.
MAX_ONNX_TOP_LEVEL_FIELDS = 100_000


def validate_onnx(path: str | os.PathLike[str], *, field_path: str = "artifact") -> None:
    """Check that `path` is plausibly a serialized ONNX ModelProto.

    Walks only the top-level protobuf fields (seeking over their payloads, parsing none):
    the file must start with `ir_version` (tag 0x08, as every ONNX writer emits field 1
    first), every field must fit in the file, and a `graph` (field 7) must be present.
    """
    file_size = Path(path).stat().st_size
    if file_size == 0:
        raise InvalidArgument.for_field(field_path, "ONNX model is empty")
    with open(path, "rb") as stream:
        if stream.read(1) != bytes([_ONNX_IR_VERSION_TAG]):
            raise InvalidArgument.for_field(
                field_path, "not an ONNX model: it does not start with the ir_version field"
            )
        stream.seek(0)
        try:
            fields_seen = _walk_top_level_fields(stream, file_size)
        except (EOFError, ValueError) as error:
            raise InvalidArgument.for_field(field_path, f"not an ONNX model: {error}") from None
    if _ONNX_GRAPH_FIELD not in fields_seen:
        raise InvalidArgument.for_field(field_path, "ONNX model has no graph")


def _walk_top_level_fields(stream: BinaryIO, file_size: int) -> set[int]:
    fields_seen: set[int] = set()
    field_count = 0
    while (tag := _read_varint(stream)) is not None:
        field_count += 1
        if field_count > MAX_ONNX_TOP_LEVEL_FIELDS:
            raise ValueError(f"more than {MAX_ONNX_TOP_LEVEL_FIELDS} top-level fields")
        field_number, wire_type = tag >> 3, tag & 0x7
        if field_number == 0:
            raise ValueError("field number 0 is invalid")
        if wire_type == 0:
            if _read_varint(stream) is None:
                raise EOFError(f"file ends inside field {field_number}")
            payload_length = 0
        elif wire_type == 1:
            payload_length = 8
        elif wire_type == 2:
            declared_length = _read_varint(stream)
            if declared_length is None:
                raise EOFError(f"file ends inside field {field_number}")
            payload_length = declared_length
        elif wire_type == 5:
            payload_length = 4
        else:
            raise ValueError(f"field {field_number} has unsupported wire type {wire_type}")
        if stream.tell() + payload_length > file_size:
            raise EOFError(f"field {field_number} runs past the end of the file (truncated?)")
        stream.seek(payload_length, os.SEEK_CUR)
        fields_seen.add(field_number)
    return fields_seen


def _find_config_root(names: Sequence[str], field_path: str) -> str:
    # A zipped model directory has config.json either at the top or inside one folder
    # ("zip -r model.zip my-model/"); anything deeper is ambiguous about which model is meant.
    if "config.json" in names:
        return ""
    nested = sorted(n for n in names if re.fullmatch(r"[^/]+/config\.json", n))
    if len(nested) == 1:
        return nested[0][: -len("config.json")]
    if nested:
        raise InvalidArgument.for_field(
            field_path, f"several config.json files ({', '.join(nested)}); zip one model"
        )
    raise InvalidArgument.for_field(
        field_path, "Hugging Face archive has no config.json at its top level or in one folder"
    )


def validate_hf_transformer(
    path: str | os.PathLike[str], *, field_path: str = "artifact", allow_causal_lm: bool = False
) -> HfTransformerInfo:
    """Check a zipped Hugging Face model directory.

    Requires a JSON-object config.json, weights as at least one safetensors file whose header
    parses (or the ONNX conversion `model.onnx`), and a tokenizer (`hf_tokenizer_files`);
    rejects pickle-capable weight files and members that would extract outside the target
    directory. Every offending member is reported, not only the first. A causal LM (a
    *ForCausalLM architecture) is refused unless `allow_causal_lm`: it is MODEL_FORMAT_CAUSAL_LM,
    served as a token stream, not as an encoder.
    """
    with _open_zip(path, field_path, "a Hugging Face model") as archive:
        members = archive.infolist()
        collector = ViolationCollector()
        _check_member_names(members, collector, field_path)
        for info in members:
            suffix = PurePosixPath(info.filename).suffix.lower()
            if suffix in PICKLE_CAPABLE_SUFFIXES:
                collector.add(
                    field_path,
                    f"member {info.filename!r} is a pickle-capable weight file ({suffix}); "
                    "ship weights as .safetensors",
                )
        collector.raise_if_any("Hugging Face archive rejected")

        files = [info for info in members if not info.is_dir()]
        root = _find_config_root([info.filename for info in files], field_path)
        config = _read_config(archive, archive.getinfo(f"{root}config.json"), field_path)
        weights = {
            info.filename: _read_member_header(archive, info, field_path)
            for info in files
            if info.filename.startswith(root) and info.filename.lower().endswith(".safetensors")
        }
        relative = [info.filename[len(root) :] for info in files if info.filename.startswith(root)]
        onnx_model = None
        if HF_ONNX_WEIGHTS in relative:
            onnx_model = f"{root}{HF_ONNX_WEIGHTS}"
            with archive.open(onnx_model) as member:
                if member.read(1) != bytes([_ONNX_IR_VERSION_TAG]):
                    raise InvalidArgument.for_field(
                        field_path, f"member {onnx_model!r} is not an ONNX model"
                    )
    if not weights and onnx_model is None:
        raise InvalidArgument.for_field(
            field_path,
            f"Hugging Face archive has no .safetensors weights (nor {HF_ONNX_WEIGHTS}) "
            f"under {root or '/'}",
        )
    if not allow_causal_lm and is_causal_lm_config(config):
        raise InvalidArgument.for_field(
            field_path,
            f"config.json names a causal LM ({config.get('architectures')!r}); upload it as "
            "a causal LM (MODEL_FORMAT_CAUSAL_LM), not as a Hugging Face encoder",
            reason="CAUSAL_LM_NOT_ENCODER",
        )
    tokenizer_files = hf_tokenizer_files(relative)
    if not tokenizer_files:
        raise InvalidArgument.for_field(
            field_path,
            f"Hugging Face archive has no tokenizer under {root or '/'} (tokenizer.json, or "
            "tokenizer_config.json with its vocabulary such as vocab.txt)",
            reason="TOKENIZER_MISSING",
        )
    return HfTransformerInfo(
        root=root,
        config=config,
        weights=weights,
        onnx_model=onnx_model,
        tokenizer_files=tokenizer_files,
    )


CAUSAL_LM_ARCHITECTURE_SUFFIX = "ForCausalLM"


def is_causal_lm_config(config: Mapping[str, Any]) -> bool:
    """Whether a Hugging Face config.json describes a causal language model (a generator).

    Decided by `architectures` (e.g. ["LlamaForCausalLM"]), the field `from_pretrained` uses.
    """
    architectures = config.get("architectures")
    return isinstance(architectures, list) and any(
        isinstance(name, str) and name.endswith(CAUSAL_LM_ARCHITECTURE_SUFFIX)
        for name in architectures
    )


def validate_causal_lm(
    path: str | os.PathLike[str], *, field_path: str = "artifact"
) -> HfTransformerInfo:
    """Check a zipped Hugging Face causal-LM directory (MODEL_FORMAT_CAUSAL_LM).

    Every rule of `validate_hf_transformer` (no pickle, safe member names, config, tokenizer),
    plus: config.json names a *ForCausalLM architecture and the weights are safetensors (the
    generation engine runs torch; an ONNX-only directory is not servable as a token stream).
    """
    info = validate_hf_transformer(path, field_path=field_path, allow_causal_lm=True)
    if not is_causal_lm_config(info.config):
        raise InvalidArgument.for_field(
            field_path,
            "config.json names no *ForCausalLM architecture (its architectures: "
            f"{info.config.get('architectures')!r}); a causal LM generates text",
            reason="NOT_A_CAUSAL_LM",
        )
    if not info.weights:
        raise InvalidArgument.for_field(
            field_path,
            f"a causal LM needs safetensors weights under {info.root or '/'}",
            reason="CAUSAL_LM_WEIGHTS_MISSING",
        )
    return info


def _read_config(archive: zipfile.ZipFile, info: zipfile.ZipInfo, field_path: str) -> dict:
    if info.file_size > MAX_CONFIG_JSON_BYTES:
        raise ResourceExhausted(
            f"{info.filename} is {info.file_size} bytes; the limit is {MAX_CONFIG_JSON_BYTES}",
            metadata={"limit_bytes": str(MAX_CONFIG_JSON_BYTES)},
        )
    try:
        with archive.open(info) as member:
            # One byte past the limit: the central directory's size may lie.
            raw = member.read(MAX_CONFIG_JSON_BYTES + 1)
        config = json.loads(raw.decode("utf-8"))
    except (*_CORRUPT_MEMBER_ERRORS, UnicodeDecodeError) as error:
        # ValueError also covers json.JSONDecodeError.
        raise InvalidArgument.for_field(
            field_path, f"{info.filename} is not valid JSON ({error})"
        ) from None
    if len(raw) > MAX_CONFIG_JSON_BYTES:
        raise ResourceExhausted(f"{info.filename} exceeds {MAX_CONFIG_JSON_BYTES} bytes")
    if not isinstance(config, dict):
        raise InvalidArgument.for_field(
            field_path, f"{info.filename} must hold a JSON object, got {type(config).__name__}"
        )
    return config


def _read_member_header(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, field_path: str
) -> SafetensorsHeader:
    label = f"member {info.filename!r} safetensors header"
    try:
        with archive.open(info) as member:
            # Only the header prefix is inflated; size comes from the central directory.
            return read_safetensors_header(
                member, size=info.file_size, field_path=field_path, label=label
            )
    except _CORRUPT_MEMBER_ERRORS as error:
        raise InvalidArgument.for_field(field_path, f"{label}: unreadable ({error})") from None
