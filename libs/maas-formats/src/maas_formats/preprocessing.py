"""The manifest's input preprocessing on NumPy arrays: `(x * scale - mean) / std`.

The trainer fits it and trains on its output, the compressor feeds its torch modules through
it, and the serving runtime applies the same formula to every request, so a model sees the
same numbers wherever it runs. Keys (all optional): `scale` (a number), `mean` and `std` (a
number, or one value per element of an example, flattened row-major).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def apply_preprocessing(preprocessing: Mapping[str, Any] | None, features: np.ndarray) -> np.ndarray:
    """`features` (a batch) as the model's first layer expects them, float32, same shape."""
    if not preprocessing:
        return features.astype(np.float32, copy=False)
    flat = features.reshape(len(features), -1).astype(np.float32)
    flat = flat * np.float32(preprocessing.get("scale", 1.0))
    if "mean" in preprocessing:
        flat = (flat - np.asarray(preprocessing["mean"], np.float32)) / np.asarray(
            preprocessing["std"], np.float32)
    return flat.reshape(features.shape)
