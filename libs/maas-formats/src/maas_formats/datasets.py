"""Dataset artifacts: NumPy .npz archives, CSV files with a header row, and text CSV.

The registry validates every dataset upload with `validate_dataset` and records the facts it
returns (row count, feature shape, number of classes) in the dataset schema; the trainer loads
the same files with `load_dataset`. Validation never holds a whole dataset in memory: CSV is
streamed row by row and .npz arrays are read from their zip members in chunks, so a large or
hostile upload costs time, not RAM. No pickle is ever loaded: object arrays are rejected.

Labels are class indices. A CSV label column may instead hold class names; then the distinct
names, sorted, are numbered 0..n-1 and reported in `DatasetFacts.class_names`.

A text CSV ("text-csv") is a CSV whose single feature column holds UTF-8 text: each example is
one string, so its feature shape is `()`. It is bounded (`MAX_TEXT_ROWS` rows,
`MAX_TEXT_CHARACTERS` characters per text); an empty text, bytes that are not UTF-8 or a text
over the limit is refused naming the line and the column. `load_text_dataset` returns the texts
as a list of str (never a NumPy string array, whose fixed width would pad every text to the
longest).
"""

from __future__ import annotations

import array
import csv
import math
import os
import re
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO

import numpy as np
from maas_runtime.errors import InvalidArgument, ViolationCollector

TEXT_CSV = "text-csv"
DATASET_FORMATS = ("npz", "csv", TEXT_CSV)

# Bounds of a text dataset: the trainer tokenizes every row in memory, and a text far beyond
# any model's context only costs time to tokenize before it is truncated.
MAX_TEXT_ROWS = 100_000
MAX_TEXT_CHARACTERS = 20_000

# A label column with more distinct values than this is not a classification target (it is
# probably an id or a measurement); the bound also caps the memory spent counting classes.
MAX_CLASSES = 100_000

_FLOAT32_MAX = float(np.finfo(np.float32).max)
_NUMERIC_KINDS = frozenset("biuf")  # bool, signed, unsigned, float
_CLASS_INDEX = re.compile(r"\d+")
_NPY_CHUNK_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class DatasetFacts:
    """What validation learned; it fills the output-only fields of `DatasetSchema`."""

    row_count: int
    feature_shape: tuple[int, ...]
    num_classes: int
    # Non-empty only for CSV labels that are names: class i is class_names[i].
    class_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class _FieldPaths:
    """Where violations point: the uploaded bytes and the request's schema fields."""

    artifact: str
    schema: str

    @property
    def feature_columns(self) -> str:
        return f"{self.schema}.feature_columns"

    @property
    def label_column(self) -> str:
        return f"{self.schema}.label_column"


def validate_dataset(
    path: str | os.PathLike[str],
    format_name: str,
    feature_columns: Sequence[str],
    label_column: str,
    *,
    artifact_field: str = "artifact",
    schema_field: str = "schema",
    format_field: str = "format",
) -> DatasetFacts:
    """Check a dataset against its declared schema and measure it.

    `format_name` is "npz" or "csv". For npz, `feature_columns` has exactly one entry: the
    name of the feature array. Raises `InvalidArgument` naming the offending field, column,
    array or line.
    """
    paths = _FieldPaths(artifact_field, schema_field)
    feature_columns = list(feature_columns)  # protobuf repeated fields lack list methods
    _check_schema(format_name, feature_columns, label_column, paths, format_field)
    if format_name == "npz":
        return _validate_npz(path, feature_columns[0], label_column, paths)
    if format_name == TEXT_CSV:
        texts = _TextColumn(paths)
        for _text, label in _text_csv_rows(path, feature_columns[0], label_column, paths):
            texts.add(label)
        return texts.facts()
    return _validate_csv(path, feature_columns, label_column, paths)


def load_dataset(
    path: str | os.PathLike[str],
    format_name: str,
    feature_columns: Sequence[str],
    label_column: str,
    *,
    artifact_field: str = "artifact",
    schema_field: str = "schema",
    format_field: str = "format",
) -> tuple[np.ndarray, np.ndarray]:
    """Load features as float32 `[rows, *feature_shape]` and labels as int64 class indices.

    Applies the same checks as `validate_dataset`, so a dataset that validated loads.
    """
    paths = _FieldPaths(artifact_field, schema_field)
    feature_columns = list(feature_columns)  # protobuf repeated fields lack list methods
    _check_schema(format_name, feature_columns, label_column, paths, format_field)
    if format_name == TEXT_CSV:
        raise InvalidArgument.for_field(
            format_field, "a text dataset holds strings, not features: use load_text_dataset")
    if format_name == "npz":
        _validate_npz(path, feature_columns[0], label_column, paths)
        return _load_npz(path, feature_columns[0], label_column, paths)
    return _load_csv(path, feature_columns, label_column, paths)


def load_text_dataset(
    path: str | os.PathLike[str],
    text_column: str,
    label_column: str,
    *,
    artifact_field: str = "artifact",
    schema_field: str = "schema",
) -> tuple[list[str], np.ndarray, tuple[str, ...]]:
    """Load a text CSV: the texts, int64 class indices and the class names (empty when the
    labels are class indices). Applies the same checks as `validate_dataset`."""
    paths = _FieldPaths(artifact_field, schema_field)
    _check_schema(TEXT_CSV, [text_column], label_column, paths, "format")
    texts: list[str] = []
    labels: list[str] = []
    column = _TextColumn(paths)
    for text, label in _text_csv_rows(path, text_column, label_column, paths):
        texts.append(text)
        labels.append(label)
        column.add(label)
    facts = column.facts()
    return texts, column.vocabulary.indexes(labels), facts.class_names


def _check_schema(
    format_name: str,
    feature_columns: list[str],
    label_column: str,
    paths: _FieldPaths,
    format_field: str,
) -> None:
    if format_name not in DATASET_FORMATS:
        raise InvalidArgument.for_field(
            format_field,
            f"unknown dataset format {format_name!r}; expected one of {', '.join(DATASET_FORMATS)}",
        )
    collector = ViolationCollector()
    collector.check(bool(feature_columns), paths.feature_columns, "at least one is required")
    if format_name == "npz":
        collector.check(
            len(feature_columns) <= 1,
            paths.feature_columns,
            "an npz dataset names exactly one feature array",
        )
    if format_name == TEXT_CSV:
        collector.check(
            len(feature_columns) <= 1,
            paths.feature_columns,
            "a text dataset names exactly one feature column: the column holding the text",
        )
    for index, column in enumerate(feature_columns):
        collector.check(bool(column), f"{paths.feature_columns}[{index}]", "must not be empty")
    duplicates = sorted({c for c in feature_columns if feature_columns.count(c) > 1})
    collector.check(
        not duplicates, paths.feature_columns, f"listed more than once: {', '.join(duplicates)}"
    )
    collector.check(bool(label_column), paths.label_column, "is required")
    collector.check(
        label_column not in feature_columns,
        paths.label_column,
        f"{label_column!r} is also a feature column",
    )
    collector.raise_if_any("invalid dataset schema")


# --- npz -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _NpyMember:
    """One array of an .npz archive, known from its .npy header only."""

    member: zipfile.ZipInfo
    dtype: np.dtype
    shape: tuple[int, ...]


def _open_npz_archive(path: str | os.PathLike[str], paths: _FieldPaths) -> zipfile.ZipFile:
    if not zipfile.is_zipfile(path):
        raise InvalidArgument.for_field(paths.artifact, "not an .npz archive (not a zip file)")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise InvalidArgument.for_field(paths.artifact, f"corrupt .npz archive ({error})") from None


def _read_npy_header(
    archive: zipfile.ZipFile, name: str, field: str, paths: _FieldPaths
) -> _NpyMember:
    names = archive.namelist()
    member_name = f"{name}.npy" if f"{name}.npy" in names else name
    if member_name not in names:
        arrays = sorted(n.removesuffix(".npy") for n in names)
        raise InvalidArgument.for_field(
            field, f"array {name!r} is not in the archive (it holds: {', '.join(arrays)})"
        )
    info = archive.getinfo(member_name)
    try:
        with archive.open(info) as stream:
            version = np.lib.format.read_magic(stream)
            if version == (1, 0):
                shape, _fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
            elif version == (2, 0):
                shape, _fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
            else:
                raise ValueError(f"unsupported .npy version {version}")
            header_size = stream.tell()
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, SyntaxError) as error:
        raise InvalidArgument.for_field(
            paths.artifact, f"array {name!r} has a corrupt .npy header ({error})"
        ) from None
    if dtype.hasobject:
        raise InvalidArgument.for_field(
            paths.artifact,
            f"array {name!r} is an object array, which only pickle can load; store numeric arrays",
        )
    expected_size = header_size + math.prod(shape) * dtype.itemsize
    if info.file_size != expected_size:
        raise InvalidArgument.for_field(
            paths.artifact,
            f"array {name!r} holds {info.file_size} bytes but its header promises "
            f"{expected_size} (truncated or padded)",
        )
    return _NpyMember(member=info, dtype=dtype, shape=tuple(shape))


def _npy_chunks(
    archive: zipfile.ZipFile, array_info: _NpyMember, name: str, paths: _FieldPaths
) -> Iterator[np.ndarray]:
    """Yield the array's elements as flat chunks; element order is irrelevant to callers."""
    itemsize = array_info.dtype.itemsize
    chunk_bytes = max(itemsize, _NPY_CHUNK_BYTES // itemsize * itemsize)
    try:
        with archive.open(array_info.member) as stream:
            _skip_npy_header(stream)
            while chunk := stream.read(chunk_bytes):
                yield np.frombuffer(chunk, dtype=array_info.dtype)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise InvalidArgument.for_field(
            paths.artifact, f"array {name!r} is unreadable ({error})"
        ) from None


def _skip_npy_header(stream: IO[bytes]) -> None:
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        np.lib.format.read_array_header_1_0(stream)
    else:
        np.lib.format.read_array_header_2_0(stream)


def _validate_npz(
    path: str | os.PathLike[str], feature_name: str, label_name: str, paths: _FieldPaths
) -> DatasetFacts:
    with _open_npz_archive(path, paths) as archive:
        features = _read_npy_header(archive, feature_name, paths.feature_columns, paths)
        labels = _read_npy_header(archive, label_name, paths.label_column, paths)
        _check_npz_shapes(features, labels, feature_name, label_name, paths)
        if features.dtype.kind == "f":
            for chunk in _npy_chunks(archive, features, feature_name, paths):
                if not (np.isfinite(chunk).all() and (np.abs(chunk) <= _FLOAT32_MAX).all()):
                    raise InvalidArgument.for_field(
                        paths.artifact,
                        f"array {feature_name!r} holds NaN, infinity or values beyond float32",
                    )
        classes: set[int] = set()
        for chunk in _npy_chunks(archive, labels, label_name, paths):
            if chunk.size and chunk.min() < 0:
                raise InvalidArgument.for_field(
                    paths.artifact, f"array {label_name!r} holds negative class indices"
                )
            classes.update(np.unique(chunk).tolist())
            _check_class_count(len(classes), paths)
    return DatasetFacts(
        row_count=features.shape[0],
        feature_shape=features.shape[1:],
        num_classes=len(classes),
    )


def _check_npz_shapes(
    features: _NpyMember,
    labels: _NpyMember,
    feature_name: str,
    label_name: str,
    paths: _FieldPaths,
) -> None:
    collector = ViolationCollector()
    collector.check(
        features.dtype.kind in _NUMERIC_KINDS,
        paths.feature_columns,
        f"array {feature_name!r} has non-numeric dtype {features.dtype}",
    )
    collector.check(
        len(features.shape) >= 2,
        paths.feature_columns,
        f"array {feature_name!r} has shape {list(features.shape)}; expected [rows, *feature_shape]",
    )
    collector.check(
        labels.dtype.kind in "iu",
        paths.label_column,
        f"array {label_name!r} has dtype {labels.dtype}; labels must be integer class indices",
    )
    collector.check(
        len(labels.shape) == 1,
        paths.label_column,
        f"array {label_name!r} has shape {list(labels.shape)}; expected [rows]",
    )
    if features.shape and labels.shape:
        collector.check(
            features.shape[0] == labels.shape[0],
            paths.artifact,
            f"array {feature_name!r} has {features.shape[0]} rows but "
            f"{label_name!r} has {labels.shape[0]}",
        )
        collector.check(features.shape[0] > 0, paths.artifact, "dataset has no rows")
    collector.raise_if_any("npz dataset does not match its schema")


def _load_npz(
    path: str | os.PathLike[str], feature_name: str, label_name: str, paths: _FieldPaths
) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            features = archive[feature_name].astype(np.float32)
            labels = archive[label_name].astype(np.int64)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        # allow_pickle=False turns an object array into ValueError; validation already
        # rejected those, so this is a file that changed or broke after validation.
        raise InvalidArgument.for_field(paths.artifact, f"unreadable .npz ({error})") from None
    return features, labels


# --- csv -----------------------------------------------------------------------------------


def _check_class_count(count: int, paths: _FieldPaths) -> None:
    if count > MAX_CLASSES:
        raise InvalidArgument.for_field(
            paths.label_column,
            f"more than {MAX_CLASSES} distinct labels; a classification label column expected",
        )


def _csv_rows(
    path: str | os.PathLike[str],
    feature_columns: Sequence[str],
    label_column: str,
    paths: _FieldPaths,
) -> Iterator[tuple[list[float], str]]:
    """Yield (features, label) per data row, checking each row as it streams past."""
    try:
        # utf-8-sig drops the byte-order mark spreadsheet exports put before the header.
        with open(path, newline="", encoding="utf-8-sig") as text:
            reader = csv.reader(text, strict=True)
            header = next(reader, [])
            feature_indexes, label_index = _locate_columns(
                header, feature_columns, label_column, paths
            )
            for row in reader:
                if not row:
                    continue  # blank lines, typically a trailing newline
                if len(row) != len(header):
                    raise InvalidArgument.for_field(
                        paths.artifact,
                        f"line {reader.line_num}: {len(row)} fields, the header has {len(header)}",
                    )
                features = [
                    _parse_feature(row[i], header[i], reader.line_num, paths)
                    for i in feature_indexes
                ]
                label = row[label_index].strip()
                if not label:
                    raise InvalidArgument.for_field(
                        paths.artifact,
                        f"line {reader.line_num}: label column {label_column!r} is empty",
                    )
                yield features, label
    except UnicodeDecodeError as error:
        raise InvalidArgument.for_field(
            paths.artifact, f"CSV is not UTF-8 text (byte {error.start} of a read block)"
        ) from None
    except csv.Error as error:
        raise InvalidArgument.for_field(
            paths.artifact, f"malformed CSV near line {reader.line_num}: {error}"
        ) from None


def _locate_columns(
    header: list[str], feature_columns: Sequence[str], label_column: str, paths: _FieldPaths
) -> tuple[list[int], int]:
    if not header:
        raise InvalidArgument.for_field(paths.artifact, "CSV is empty; expected a header row")
    header = [name.strip() for name in header]
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise InvalidArgument.for_field(
            paths.artifact, f"CSV header names a column more than once: {', '.join(duplicates)}"
        )
    position = {name: index for index, name in enumerate(header)}
    collector = ViolationCollector()
    for column in feature_columns:
        collector.check(
            column in position, paths.feature_columns, f"column {column!r} is not in the CSV header"
        )
    collector.check(
        label_column in position,
        paths.label_column,
        f"column {label_column!r} is not in the CSV header",
    )
    collector.raise_if_any("CSV header does not match the schema")
    return [position[c] for c in feature_columns], position[label_column]


def _parse_feature(value: str, column: str, line_number: int, paths: _FieldPaths) -> float:
    try:
        number = float(value)
    except ValueError:
        raise InvalidArgument.for_field(
            paths.artifact, f"line {line_number}, column {column!r}: {value!r} is not a number"
        ) from None
    if not math.isfinite(number) or abs(number) > _FLOAT32_MAX:
        raise InvalidArgument.for_field(
            paths.artifact,
            f"line {line_number}, column {column!r}: {value!r} is not a finite float32",
        )
    return number


class _LabelVocabulary:
    """Distinct labels seen so far, and whether they can all be read as class indices."""

    def __init__(self, paths: _FieldPaths) -> None:
        self._paths = paths
        self._distinct: set[str] = set()
        self._indexes: set[int] = set()
        self.all_class_indexes = True

    def add(self, label: str) -> None:
        if label in self._distinct:
            return
        self._distinct.add(label)
        if self.all_class_indexes and _CLASS_INDEX.fullmatch(label):
            self._indexes.add(int(label))
        else:
            self.all_class_indexes = False
        _check_class_count(len(self._distinct), self._paths)

    @property
    def num_classes(self) -> int:
        # "1" and "01" are the same class index.
        return len(self._indexes) if self.all_class_indexes else len(self._distinct)

    @property
    def class_names(self) -> tuple[str, ...]:
        return () if self.all_class_indexes else tuple(sorted(self._distinct))

    def indexes(self, labels: Sequence[str]) -> np.ndarray:
        """Every label of `labels` (all added before) as its int64 class index."""
        if self.all_class_indexes:
            return np.array([int(label) for label in labels], dtype=np.int64)
        index_of = {name: index for index, name in enumerate(self.class_names)}
        return np.array([index_of[label] for label in labels], dtype=np.int64)


def _validate_csv(
    path: str | os.PathLike[str],
    feature_columns: Sequence[str],
    label_column: str,
    paths: _FieldPaths,
) -> DatasetFacts:
    row_count = 0
    vocabulary = _LabelVocabulary(paths)
    for _features, label in _csv_rows(path, feature_columns, label_column, paths):
        row_count += 1
        vocabulary.add(label)
    if row_count == 0:
        raise InvalidArgument.for_field(paths.artifact, "CSV has a header but no data rows")
    return DatasetFacts(
        row_count=row_count,
        feature_shape=(len(feature_columns),),
        num_classes=vocabulary.num_classes,
        class_names=vocabulary.class_names,
    )


def _load_csv(
    path: str | os.PathLike[str],
    feature_columns: Sequence[str],
    label_column: str,
    paths: _FieldPaths,
) -> tuple[np.ndarray, np.ndarray]:
    # array.array grows in place with 4 bytes per value, far less than lists of floats.
    values = array.array("f")
    labels: list[str] = []
    vocabulary = _LabelVocabulary(paths)
    for features, label in _csv_rows(path, feature_columns, label_column, paths):
        values.extend(features)
        labels.append(label)
        vocabulary.add(label)
    if not labels:
        raise InvalidArgument.for_field(paths.artifact, "CSV has a header but no data rows")
    features_array = np.frombuffer(values, dtype=np.float32).reshape(len(labels), -1).copy()
    return features_array, vocabulary.indexes(labels)


# --- text csv ------------------------------------------------------------------------------


class _TextColumn:
    """Counts the rows of a text CSV against its bound and collects its labels."""

    def __init__(self, paths: _FieldPaths) -> None:
        self._paths = paths
        self.vocabulary = _LabelVocabulary(paths)
        self.row_count = 0

    def add(self, label: str) -> None:
        self.row_count += 1
        if self.row_count > MAX_TEXT_ROWS:
            raise InvalidArgument.for_field(
                self._paths.artifact,
                f"more than {MAX_TEXT_ROWS} rows; a text dataset holds at most {MAX_TEXT_ROWS}",
                reason="TOO_MANY_ROWS", metadata={"limit": str(MAX_TEXT_ROWS)})
        self.vocabulary.add(label)

    def facts(self) -> DatasetFacts:
        if self.row_count == 0:
            raise InvalidArgument.for_field(self._paths.artifact, "CSV has a header but no data rows")
        return DatasetFacts(row_count=self.row_count, feature_shape=(),
                            num_classes=self.vocabulary.num_classes,
                            class_names=self.vocabulary.class_names)


def _undecodable(value: str) -> int | None:
    """Index of the first byte that was not UTF-8 (read with surrogateescape), or None."""
    for index, character in enumerate(value):
        if "\udc80" <= character <= "\udcff":
            return index
    return None


def _text_csv_rows(
    path: str | os.PathLike[str], text_column: str, label_column: str, paths: _FieldPaths
) -> Iterator[tuple[str, str]]:
    """Yield (text, label) per data row; every problem names its line and column."""
    try:
        # surrogateescape keeps bytes that are not UTF-8 as lone surrogates, so the row and
        # column holding them can be named instead of an offset into a read block.
        with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as stream:
            reader = csv.reader(stream, strict=True)
            header = next(reader, [])
            for index, name in enumerate(header):
                if _undecodable(name) is not None:
                    raise InvalidArgument.for_field(
                        paths.artifact, f"CSV header, column {index + 1}: not UTF-8 text")
            (text_index,), label_index = _locate_columns(header, [text_column], label_column,
                                                         paths)
            for row in reader:
                if not row:
                    continue
                line = reader.line_num
                if len(row) != len(header):
                    raise InvalidArgument.for_field(
                        paths.artifact, f"line {line}: {len(row)} fields, the header has {len(header)}")
                text, label = row[text_index], row[label_index].strip()
                for column, value in ((text_column, text), (label_column, label)):
                    position = _undecodable(value)
                    if position is not None:
                        raise InvalidArgument.for_field(
                            paths.artifact, f"line {line}, column {column!r}: not UTF-8 text "
                                            f"(character {position})", reason="NOT_UTF8")
                if not text.strip():
                    raise InvalidArgument.for_field(
                        paths.artifact, f"line {line}: text column {text_column!r} is empty",
                        reason="EMPTY_TEXT")
                if len(text) > MAX_TEXT_CHARACTERS:
                    raise InvalidArgument.for_field(
                        paths.artifact, f"line {line}, column {text_column!r}: {len(text)} "
                                        f"characters; the limit is {MAX_TEXT_CHARACTERS}",
                        reason="TEXT_TOO_LONG", metadata={"limit": str(MAX_TEXT_CHARACTERS)})
                if not label:
                    raise InvalidArgument.for_field(
                        paths.artifact, f"line {line}: label column {label_column!r} is empty")
                yield text, label
    except csv.Error as error:
        raise InvalidArgument.for_field(
            paths.artifact, f"malformed CSV near line {reader.line_num}: {error}") from None
