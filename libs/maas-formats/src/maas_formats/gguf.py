"""Read a GGUF file's header as data: magic, version, metadata key/values and tensor infos.

GGUF (llama.cpp's format) is `magic "GGUF"` + `u32 version` + `u64 tensor count` +
`u64 metadata count`, then the metadata (a string key, a u32 value type, the value), then one
info per tensor (name, dimensions, ggml type, offset into the aligned data section), then the
tensor data. Everything here is parsed with `struct` from a bounded stream: nothing in the file
is executed, every count and length is checked against limits and against the file size
before anything is allocated, and each tensor's byte range must lie inside the file. A damaged,
truncated or hostile file raises `InvalidArgument` (reason GGUF_INVALID) naming what is wrong.

The registry validates MODEL_FORMAT_GGUF uploads with `read_gguf_header`; `maas_llm` records
`GgufHeader.facts()` on the version. The `gguf` package supplies only the constant tables (ggml
block sizes, file-type names), never its reader.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType
from maas_runtime.errors import InvalidArgument

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = frozenset({2, 3})
DEFAULT_ALIGNMENT = 32

# Bounds far above any real model (SmolLM2: 30 layers, 272 tensors, ~40 keys, 49k tokens) and
# far below what would let a 100-byte file make the parser allocate gigabytes.
MAX_METADATA_ENTRIES = 65_536
MAX_TENSORS = 1_000_000
MAX_STRING_BYTES = 16 * 1024 * 1024
MAX_ARRAY_LENGTH = 16_000_000
MAX_DIMENSIONS = 8
# Array values kept in memory (longer arrays keep only their length and element type).
KEPT_ARRAY_LENGTH = 64

_STRING = 8
_ARRAY = 9
# value type → struct format of a scalar (GGUF spec: gguf_metadata_value_type).
_SCALAR_FORMATS: Mapping[int, str] = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
    10: "<Q", 11: "<q", 12: "<d",
}

MetadataValue = int | float | bool | str | tuple[int | float | bool | str, ...]


@dataclass(frozen=True)
class GgufArray:
    """An array value too long to keep: its length and element type only."""

    length: int
    element_type: int


@dataclass(frozen=True)
class GgufTensorInfo:
    """One tensor as the header describes it; `offset` is relative to the data section."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int

    @property
    def element_count(self) -> int:
        return math.prod(self.shape)

    @property
    def type_name(self) -> str:
        try:
            return GGMLQuantizationType(self.ggml_type).name
        except ValueError:
            return f"type-{self.ggml_type}"

    @property
    def byte_length(self) -> int | None:
        """Bytes of its data, or None for a ggml type the tables do not know."""
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(self.ggml_type)]
        except (ValueError, KeyError):
            return None
        return self.element_count // block * type_size


@dataclass(frozen=True)
class GgufHeader:
    """A GGUF header that passed every check."""

    version: int
    metadata: Mapping[str, MetadataValue | GgufArray]
    tensors: tuple[GgufTensorInfo, ...]
    data_offset: int
    file_size: int

    def _text(self, key: str) -> str:
        value = self.metadata.get(key)
        return value if isinstance(value, str) else ""

    def _integer(self, key: str) -> int | None:
        value = self.metadata.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def architecture(self) -> str:
        return self._text("general.architecture")

    @property
    def name(self) -> str:
        return self._text("general.name")

    @property
    def context_length(self) -> int | None:
        return self._integer(f"{self.architecture}.context_length")

    @property
    def vocabulary_size(self) -> int | None:
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        if isinstance(tokens, GgufArray):
            return tokens.length
        if isinstance(tokens, tuple):
            return len(tokens)
        return self._integer(f"{self.architecture}.vocab_size")

    @property
    def chat_template(self) -> str:
        return self._text("tokenizer.chat_template")

    @property
    def file_type(self) -> str:
        """The quantization the file declares (general.file_type), e.g. "MOSTLY_Q4_1"."""
        code = self._integer("general.file_type")
        if code is None:
            return ""
        try:
            return LlamaFileType(code).name
        except ValueError:
            return f"file-type-{code}"

    @property
    def parameter_count(self) -> int:
        return sum(tensor.element_count for tensor in self.tensors)

    def facts(self) -> dict[str, str]:
        """What the registry records on a GGUF version (labels), all as strings."""
        return {
            "architecture": self.architecture,
            "model_name": self.name,
            "context_length": str(self.context_length or ""),
            "vocabulary_size": str(self.vocabulary_size or ""),
            "quantization": self.file_type,
            "chat_template": "present" if self.chat_template else "absent",
            "parameter_count": str(self.parameter_count),
            "gguf_version": str(self.version),
        }


class _Reader:
    """Bounded little-endian reads that turn a short read into a clear complaint."""

    def __init__(self, stream: BinaryIO, file_size: int) -> None:
        self.stream = stream
        self.file_size = file_size

    def exact(self, count: int, what: str) -> bytes:
        if self.stream.tell() + count > self.file_size:
            raise _Damaged(f"the file ends inside {what} (truncated?)")
        data = self.stream.read(count)
        if len(data) != count:
            raise _Damaged(f"the file ends inside {what} (truncated?)")
        return data

    def scalar(self, fmt: str, what: str) -> int | float | bool:
        value: int | float | bool = struct.unpack(fmt, self.exact(struct.calcsize(fmt), what))[0]
        return value

    def u32(self, what: str) -> int:
        return int(self.scalar("<I", what))

    def u64(self, what: str) -> int:
        return int(self.scalar("<Q", what))

    def string(self, what: str, *, keep: bool = True) -> str:
        length = self.u64(f"the length of {what}")
        if length > MAX_STRING_BYTES:
            raise _Damaged(f"{what} claims {length} bytes (limit {MAX_STRING_BYTES})")
        if not keep:
            if self.stream.tell() + length > self.file_size:
                raise _Damaged(f"the file ends inside {what} (truncated?)")
            self.stream.seek(length, os.SEEK_CUR)
            return ""
        raw = self.exact(length, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Damaged(f"{what} is not valid UTF-8") from None


class _Damaged(Exception):
    """Internal: what is wrong with the bytes; turned into InvalidArgument at the edge."""


def _read_value(reader: _Reader, value_type: int, key: str) -> MetadataValue | GgufArray:
    if value_type == _STRING:
        return reader.string(f"the value of {key!r}")
    if value_type in _SCALAR_FORMATS:
        return reader.scalar(_SCALAR_FORMATS[value_type], f"the value of {key!r}")
    if value_type != _ARRAY:
        raise _Damaged(f"metadata {key!r} has unknown value type {value_type}")
    element_type = reader.u32(f"the element type of {key!r}")
    length = reader.u64(f"the length of {key!r}")
    if length > MAX_ARRAY_LENGTH:
        raise _Damaged(f"metadata {key!r} claims {length} elements (limit {MAX_ARRAY_LENGTH})")
    keep = length <= KEPT_ARRAY_LENGTH
    if element_type in _SCALAR_FORMATS:
        fmt = _SCALAR_FORMATS[element_type]
        size = struct.calcsize(fmt)
        raw = reader.exact(size * length, f"the array {key!r}")
        if not keep:
            return GgufArray(length, element_type)
        return tuple(struct.unpack(f"<{length}{fmt[1]}", raw))
    if element_type == _STRING:
        items = tuple(reader.string(f"an element of {key!r}", keep=keep) for _ in range(length))
        return items if keep else GgufArray(length, element_type)
    raise _Damaged(f"metadata {key!r} is an array of unsupported type {element_type}")


def read_gguf_header(path: str | os.PathLike[str], *, field_path: str = "artifact") -> GgufHeader:
    """Parse and check the header of the GGUF file at `path`; InvalidArgument if it is not one."""
    try:
        file_size = Path(path).stat().st_size
        with open(path, "rb") as stream:
            return _parse(_Reader(stream, file_size))
    except _Damaged as problem:
        raise InvalidArgument.for_field(
            field_path, f"not a usable GGUF file: {problem}", reason="GGUF_INVALID"
        ) from None
    except OSError as error:
        raise InvalidArgument.for_field(
            field_path, f"cannot read the GGUF file ({error.strerror})", reason="GGUF_INVALID"
        ) from None


def _parse(reader: _Reader) -> GgufHeader:
    if reader.file_size < 4 or reader.exact(4, "the magic") != GGUF_MAGIC:
        raise _Damaged("it does not start with the magic bytes 'GGUF'")
    version = reader.u32("the version")
    if version not in SUPPORTED_VERSIONS:
        raise _Damaged(f"version {version} is not supported (expected 2 or 3)")
    tensor_count = reader.u64("the tensor count")
    entry_count = reader.u64("the metadata count")
    if tensor_count > MAX_TENSORS:
        raise _Damaged(f"it claims {tensor_count} tensors (limit {MAX_TENSORS})")
    if entry_count > MAX_METADATA_ENTRIES:
        raise _Damaged(f"it claims {entry_count} metadata entries (limit {MAX_METADATA_ENTRIES})")
    metadata: dict[str, MetadataValue | GgufArray] = {}
    for index in range(entry_count):
        key = reader.string(f"metadata key #{index}")
        if key in metadata:
            raise _Damaged(f"metadata key {key!r} appears twice")
        metadata[key] = _read_value(reader, reader.u32(f"the type of {key!r}"), key)
    tensors = []
    for index in range(tensor_count):
        name = reader.string(f"tensor name #{index}")
        dimensions = reader.u32(f"the dimension count of {name!r}")
        if dimensions > MAX_DIMENSIONS:
            raise _Damaged(f"tensor {name!r} claims {dimensions} dimensions")
        shape = tuple(reader.u64(f"a dimension of {name!r}") for _ in range(dimensions))
        ggml_type = reader.u32(f"the type of {name!r}")
        offset = reader.u64(f"the offset of {name!r}")
        tensors.append(GgufTensorInfo(name, shape, ggml_type, offset))
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or (
        alignment & (alignment - 1)
    ):
        raise _Damaged(f"general.alignment {alignment!r} is not a power of two")
    position = reader.stream.tell()
    data_offset = position + (-position % alignment)
    data_size = reader.file_size - data_offset
    if tensors and data_size < 0:
        raise _Damaged("the file ends before its tensor data (truncated?)")
    for tensor in tensors:
        length = tensor.byte_length or 0
        if tensor.offset + length > data_size:
            raise _Damaged(
                f"tensor {tensor.name!r} runs past the end of the file (truncated?)"
            )
    return GgufHeader(
        version=version,
        metadata=metadata,
        tensors=tuple(tensors),
        data_offset=data_offset,
        file_size=reader.file_size,
    )
