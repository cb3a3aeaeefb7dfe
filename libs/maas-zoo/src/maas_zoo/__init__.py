"""The MaaS model zoo: declarative architectures any service can rebuild from a manifest.

A manifest's `architecture` (`kind` + `hyperparameters`) and its signature's input shape
and class count are all `build_model` needs; the weights come from safetensors.
"""

from maas_zoo.architectures import (
    ARCHITECTURES,
    Architecture,
    build_model,
    default_hyperparameters,
    get_architecture,
    resolve_hyperparameters,
)
from maas_zoo.hyperparameters import Hyperparameter

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "Hyperparameter",
    "build_model",
    "default_hyperparameters",
    "get_architecture",
    "resolve_hyperparameters",
]
