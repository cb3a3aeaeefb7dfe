"""Parse and check a safetensors header without touching the tensor data.

A safetensors file is `u64 little-endian header length` + `JSON header` + `data section`.
The registry runs this on every upload, so it reads exactly `8 + header length` bytes and
proves the rest of the file is consistent with the header from the file size alone: every
tensor's byte range is in bounds, has the size its dtype and shape imply, and the ranges tile
the data section with no gap and no overlap. Anything wrong is the uploader's mistake and
surfaces as `InvalidArgument` — never as a `json`, `struct` or `UnicodeDecodeError`.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from maas_runtime.errors import InvalidArgument

# The same bound the reference (Rust) implementation enforces; a larger length is corruption
# or an attempt to make the server allocate a huge buffer.
MAX_HEADER_BYTES = 100_000_000

HEADER_LENGTH_BYTES = 8
METADATA_KEY = "__metadata__"

# Bits per element for every dtype the safetensors format defines (0.8). Bits, not bytes,
# because F4 and the F6 types pack several elements into a byte.
SAFETENSORS_DTYPE_BITS: Mapping[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
}

_TENSOR_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header describes it; `data_offsets` are relative to the data section."""

    dtype: str
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]

    @property
    def element_count(self) -> int:
        return math.prod(self.shape)

    @property
    def byte_length(self) -> int:
        return self.data_offsets[1] - self.data_offsets[0]


@dataclass(frozen=True)
class SafetensorsHeader:
    """A header that passed every check, plus the sizes that prove the file is whole."""

    tensors: Mapping[str, TensorEntry]
    metadata: Mapping[str, str]
    header_length: int
    data_length: int

    @property
    def parameter_count(self) -> int:
        return sum(entry.element_count for entry in self.tensors.values())


def read_safetensors_header(
    source: str | os.PathLike[str] | IO[bytes],
    *,
    size: int | None = None,
    field_path: str = "artifact",
    label: str = "safetensors header",
) -> SafetensorsHeader:
    """Read and check the header of a safetensors file, reading no tensor data.

    `source` is a path or a binary file object positioned at the start of the safetensors
    bytes. `size` is the total byte length of the safetensors content; it is taken from the
    file system or by seeking when omitted (pass it for streams that cannot seek cheaply,
    such as zip members). Problems raise `InvalidArgument` on `field_path`, each description
    starting with `label`.
    """
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        with path.open("rb") as stream:
            return read_safetensors_header(
                stream,
                size=path.stat().st_size if size is None else size,
                field_path=field_path,
                label=label,
            )
    if size is None:
        size = _remaining_size(source)
    return _parse_header(source, size, _Complaint(field_path, label))


@dataclass(frozen=True)
class _Complaint:
    """Builds the `InvalidArgument` for one artifact so every message has the same shape."""

    field_path: str
    label: str

    def __call__(self, description: str) -> InvalidArgument:
        return InvalidArgument.for_field(self.field_path, f"{self.label}: {description}")


def _remaining_size(stream: IO[bytes]) -> int:
    start = stream.tell()
    end = stream.seek(0, os.SEEK_END)
    stream.seek(start)
    return end - start


def _read_exactly(stream: IO[bytes], length: int) -> bytes:
    # File objects may return short reads (pipes, zip members); loop until done or EOF.
    chunks = []
    remaining = length
    while remaining > 0:
        chunk = stream.read(remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _parse_header(stream: IO[bytes], size: int, complaint: _Complaint) -> SafetensorsHeader:
    if size < HEADER_LENGTH_BYTES:
        raise complaint(
            f"file is {size} bytes, too short for the {HEADER_LENGTH_BYTES}-byte header length"
        )
    length_bytes = _read_exactly(stream, HEADER_LENGTH_BYTES)
    if len(length_bytes) != HEADER_LENGTH_BYTES:
        raise complaint("file ends before the header length")
    (header_length,) = struct.unpack("<Q", length_bytes)
    if header_length > MAX_HEADER_BYTES:
        raise complaint(
            f"header length {header_length} exceeds the limit of {MAX_HEADER_BYTES} bytes"
        )
    if HEADER_LENGTH_BYTES + header_length > size:
        raise complaint(
            f"header length {header_length} exceeds the file "
            f"({size - HEADER_LENGTH_BYTES} bytes follow the length)"
        )
    header_bytes = _read_exactly(stream, header_length)
    if len(header_bytes) != header_length:
        raise complaint(
            f"file ends inside the header ({len(header_bytes)} of {header_length} bytes)"
        )

    document = _decode_json_object(header_bytes, complaint)
    data_length = size - HEADER_LENGTH_BYTES - header_length
    metadata = _check_metadata(document.pop(METADATA_KEY, {}), complaint)
    tensors = {
        name: _check_tensor_entry(name, entry, data_length, complaint)
        for name, entry in document.items()
    }
    _check_offsets_tile_data_section(tensors, data_length, complaint)
    return SafetensorsHeader(
        tensors=tensors,
        metadata=metadata,
        header_length=header_length,
        data_length=data_length,
    )


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # json.loads keeps the last duplicate silently; two readers could then disagree on which
    # bytes a tensor name refers to, so a duplicate makes the header invalid.
    document: dict[str, object] = {}
    for key, value in pairs:
        if key in document:
            raise ValueError(f"duplicate key {key!r}")
        document[key] = value
    return document


def _reject_non_finite_constant(constant: str) -> object:
    raise ValueError(f"{constant} is not valid JSON")


def _decode_json_object(header_bytes: bytes, complaint: _Complaint) -> dict[str, object]:
    try:
        text = header_bytes.decode("utf-8")
    except UnicodeDecodeError as error:
        raise complaint(f"not UTF-8 text (byte {error.start})") from None
    try:
        document = json.loads(
            text,
            object_pairs_hook=_reject_duplicate_keys,
            parse_constant=_reject_non_finite_constant,
        )
    except (ValueError, RecursionError) as error:
        # json.JSONDecodeError is a ValueError; so are the hooks' rejections.
        raise complaint(f"not valid JSON ({error})") from None
    if not isinstance(document, dict):
        raise complaint(f"must be a JSON object, got {type(document).__name__}")
    return document


def _check_metadata(metadata: object, complaint: _Complaint) -> dict[str, str]:
    if not isinstance(metadata, dict):
        raise complaint(f"{METADATA_KEY} must be an object of strings")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise complaint(f"{METADATA_KEY} entry {key!r} must be a string")
    return metadata


def _is_int(value: object) -> bool:
    # JSON true/false arrive as bool, which is an int subclass in Python.
    return isinstance(value, int) and not isinstance(value, bool)


def _check_tensor_entry(
    name: str, entry: object, data_length: int, complaint: _Complaint
) -> TensorEntry:
    where = f"tensor {name!r}"
    if not isinstance(entry, dict):
        raise complaint(f"{where} must be an object with dtype, shape and data_offsets")
    missing = sorted(_TENSOR_ENTRY_KEYS - entry.keys())
    if missing:
        raise complaint(f"{where} lacks {', '.join(missing)}")
    unknown = sorted(entry.keys() - _TENSOR_ENTRY_KEYS)
    if unknown:
        raise complaint(f"{where} has unknown keys {', '.join(unknown)}")

    dtype = entry["dtype"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPE_BITS:
        raise complaint(f"{where} has unknown dtype {dtype!r}")

    shape = entry["shape"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise complaint(f"{where} shape must be a list of non-negative integers, got {shape!r}")

    offsets = entry["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
        raise complaint(f"{where} data_offsets must be [begin, end] integers, got {offsets!r}")
    begin, end = offsets
    if begin < 0 or end < begin:
        raise complaint(f"{where} data_offsets [{begin}, {end}] are not an ascending range")
    if end > data_length:
        raise complaint(
            f"{where} data_offsets [{begin}, {end}] exceed the file "
            f"(data section is {data_length} bytes)"
        )

    bits = math.prod(shape) * SAFETENSORS_DTYPE_BITS[dtype]
    if bits % 8:
        raise complaint(f"{where} shape {shape} of {dtype} does not fill whole bytes")
    if end - begin != bits // 8:
        raise complaint(
            f"{where} occupies {end - begin} bytes but shape {shape} of {dtype} needs {bits // 8}"
        )
    return TensorEntry(dtype=dtype, shape=tuple(shape), data_offsets=(begin, end))


def _check_offsets_tile_data_section(
    tensors: Mapping[str, TensorEntry], data_length: int, complaint: _Complaint
) -> None:
    # Writers order tensors by alignment, not by name, so walk them in file order.
    in_file_order = sorted(tensors.items(), key=lambda item: item[1].data_offsets)
    covered_until = 0
    previous_name: str | None = None
    for name, entry in in_file_order:
        begin, end = entry.data_offsets
        if begin < covered_until:
            raise complaint(
                f"tensor {name!r} data_offsets [{begin}, {end}] overlap tensor {previous_name!r}"
            )
        if begin > covered_until:
            raise complaint(
                f"{begin - covered_until} bytes before tensor {name!r} "
                f"(offset {covered_until}) belong to no tensor"
            )
        covered_until = end
        previous_name = name
    # Every end was checked against data_length, so only trailing bytes can remain.
    if covered_until != data_length:
        raise complaint(
            f"{data_length - covered_until} trailing bytes after the last tensor "
            f"(offset {covered_until}) belong to no tensor"
        )
