"""The trainer's view of its data: sources, staging and splits from the shared
`maas_formats.dataset_sources` (the compressor measures on the same splits), and the one thing
only training does, fitting the normalisation a trained package records.

Re-exported names keep the trainer's imports in one place; nothing is defined twice.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from maas_formats.dataset_sources import (
    BUILTIN_DATASETS,
    DATASET_VERSION_PREFIX,
    DIGITS,
    STAGED_FEATURES,
    STAGED_LABELS,
    SYNTHETIC_CLASSIFICATION,
    DatasetFacts,
    SplitIndices,
    SplitSizes,
    facts_from_dataset_version,
    split_indices,
    split_sizes,
    write_builtin_dataset,
)

__all__ = [
    "BUILTIN_DATASETS", "DATASET_VERSION_PREFIX", "DIGITS", "STAGED_FEATURES", "STAGED_LABELS",
    "SYNTHETIC_CLASSIFICATION", "DatasetFacts", "SplitIndices", "SplitSizes",
    "facts_from_dataset_version", "fit_preprocessing", "split_indices", "split_sizes",
    "write_builtin_dataset",
]

_MIN_STD = 1e-6


def fit_preprocessing(facts: DatasetFacts, train_features: np.ndarray) -> dict[str, Any]:
    """The manifest's preprocessing: `(x * scale - mean) / std`, as the inference runtime
    applies it (mean and std per element of an example, flattened row-major)."""
    if facts.fixed_scale is not None:
        return {"scale": facts.fixed_scale}
    flat = train_features.reshape(len(train_features), -1).astype(np.float64)
    mean = flat.mean(axis=0)
    std = flat.std(axis=0)
    # A constant feature carries nothing; dividing by ~0 would only blow up noise.
    std = np.where(std < _MIN_STD, 1.0, std)
    return {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}
