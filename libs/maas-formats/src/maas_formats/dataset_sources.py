"""Where a job's data comes from and how it is split: shared by the trainer and the compressor.

Sources:
- `builtin:digits`: scikit-learn's bundled 8×8 digits (1,797 images, pixel values 0-16),
  scaled by 1/16 to [0, 1];
- `builtin:synthetic-classification`: a fixed, seeded `make_classification` problem
  (2,000 rows, 20 features, 4 classes), standardised on the training split;
- `datasets/{dataset}/versions/{n}`: a registry dataset version (npz or csv), downloaded and
  checked against its sha256, standardised on the training split.

The service stages every source as one file in the job's directory (builtins are written
as npz), so the job process reads all of them the same way and never imports scikit-learn.
The split is a seeded permutation: the same seed gives the same split on every run,
resume and worker. Nothing here imports torch. (Normalisation lives in
`maas_formats.preprocessing`; the trainer fits it.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from maas_formats.artifacts import DATASET_FORMAT_BY_PROTO_NAME

DATASET_VERSION_PREFIX = "datasets/"
DIGITS = "builtin:digits"
SYNTHETIC_CLASSIFICATION = "builtin:synthetic-classification"
STAGED_FEATURES = "features"
STAGED_LABELS = "labels"
_SYNTHETIC_SEED = 20_240_601  # part of the dataset's definition: never derive it from a job
_SYNTHETIC_ROWS, _SYNTHETIC_FEATURES, _SYNTHETIC_CLASSES = 2_000, 20, 4


@dataclass(frozen=True)
class DatasetFacts:
    """What validation and the job process need to know about a dataset."""

    source: str
    """`builtin:...` or the registry dataset version's resource name."""
    feature_shape: tuple[int, ...]
    num_classes: int
    row_count: int
    format: str = "npz"
    """How the staged file is encoded: "npz" or "csv"."""
    feature_columns: tuple[str, ...] = (STAGED_FEATURES,)
    label_column: str = STAGED_LABELS
    sha256: str = ""
    """Digest of the registry artifact (empty for builtins)."""
    size_bytes: int = 0
    fixed_scale: float | None = None
    """Known pixel scale (digits: 1/16); None: standardise each feature on the training split."""
    class_names: tuple[str, ...] = field(default=())

    @property
    def registry_version(self) -> str | None:
        return self.source if self.source.startswith(DATASET_VERSION_PREFIX) else None

    @property
    def staged_filename(self) -> str:
        return f"dataset.{self.format}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, document: dict[str, Any]) -> DatasetFacts:
        return cls(**{**document,
                      "feature_shape": tuple(document["feature_shape"]),
                      "feature_columns": tuple(document["feature_columns"]),
                      "class_names": tuple(document.get("class_names", ()))})


BUILTIN_DATASETS: dict[str, DatasetFacts] = {
    DIGITS: DatasetFacts(DIGITS, (64,), 10, 1_797, fixed_scale=1 / 16,
                         class_names=tuple(str(digit) for digit in range(10))),
    SYNTHETIC_CLASSIFICATION: DatasetFacts(
        SYNTHETIC_CLASSIFICATION, (_SYNTHETIC_FEATURES,), _SYNTHETIC_CLASSES, _SYNTHETIC_ROWS,
        class_names=tuple(f"class_{index}" for index in range(_SYNTHETIC_CLASSES))),
}


def facts_from_dataset_version(version: dict[str, Any]) -> DatasetFacts:
    """Facts of a registry `DatasetVersion` (as a dict in the contract's JSON shape)."""
    schema = version.get("schema", {})
    artifact = version.get("artifact", {})
    return DatasetFacts(
        source=version["name"],
        feature_shape=tuple(int(d) for d in schema.get("feature_shape", ())),
        num_classes=int(schema.get("num_classes", 0)),
        row_count=int(version.get("row_count", 0)),
        format=DATASET_FORMAT_BY_PROTO_NAME.get(version.get("format", ""), "npz"),
        feature_columns=tuple(schema.get("feature_columns", ())),
        label_column=schema.get("label_column", ""),
        sha256=artifact.get("sha256", ""),
        size_bytes=int(artifact.get("size_bytes", 0)),
    )


def write_builtin_dataset(source: str, path: Path) -> None:
    """Generate a builtin dataset as an npz file (imports scikit-learn: a service-side step)."""
    from sklearn import datasets as sklearn_datasets

    if source == DIGITS:
        bunch = sklearn_datasets.load_digits()
        features, labels = bunch.data, bunch.target
    elif source == SYNTHETIC_CLASSIFICATION:
        features, labels = sklearn_datasets.make_classification(
            n_samples=_SYNTHETIC_ROWS, n_features=_SYNTHETIC_FEATURES, n_informative=10,
            n_redundant=4, n_classes=_SYNTHETIC_CLASSES, class_sep=1.5,
            random_state=_SYNTHETIC_SEED)
    else:
        raise ValueError(f"not a builtin dataset: {source!r}")
    temporary = path.with_name(path.name + ".partial")
    with temporary.open("wb") as handle:
        np.savez(handle, **{STAGED_FEATURES: features.astype(np.float32),
                            STAGED_LABELS: labels.astype(np.int64)})
    temporary.replace(path)


@dataclass(frozen=True)
class SplitSizes:
    train: int
    validation: int
    test: int


def split_sizes(row_count: int, validation_fraction: float, test_fraction: float) -> SplitSizes:
    """Held-out splits get at least one example each; training gets the rest."""
    validation = max(1, round(row_count * validation_fraction))
    test = max(1, round(row_count * test_fraction))
    return SplitSizes(row_count - validation - test, validation, test)


@dataclass(frozen=True)
class SplitIndices:
    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray


def split_indices(row_count: int, sizes: SplitSizes, seed: int) -> SplitIndices:
    order = np.random.default_rng(seed).permutation(row_count)
    test_end = sizes.test
    validation_end = test_end + sizes.validation
    return SplitIndices(train=np.sort(order[validation_end:]),
                        validation=np.sort(order[test_end:validation_end]),
                        test=np.sort(order[:test_end]))
