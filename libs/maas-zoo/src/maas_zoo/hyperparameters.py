"""Declared hyperparameters and their strict validation.

Hyperparameters arrive from users (a training job) and from manifests written long ago (a
deployment rebuilding a module), so every value is checked for type and range, unknown keys
are refused rather than ignored, and the result is a plain JSON-friendly dict with every
default filled in. That filled dict is what a manifest records, so a rebuild never depends on
defaults that may change later. Nothing here imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from maas_runtime.errors import ViolationCollector

HYPERPARAMETERS_FIELD = "architecture.hyperparameters"


class HyperparameterValueError(ValueError):
    """A single value is out of its declared type or range; the message is user-facing."""


Normalizer = Callable[[Any], Any]


@dataclass(frozen=True)
class Hyperparameter:
    """One declared hyperparameter: its default, what it means, and how a value is checked."""

    name: str
    default: Any
    description: str
    normalize: Normalizer
    """Returns the canonical value or raises `HyperparameterValueError`."""


def _require_int(value: Any) -> int:
    # bool is an int subclass in Python; `true` for a layer width is a caller's mistake.
    if isinstance(value, bool) or not isinstance(value, int):
        raise HyperparameterValueError(f"must be an integer, got {value!r}")
    return value


def integer(minimum: int, maximum: int, *, odd: bool = False) -> Normalizer:
    """An integer in [minimum, maximum], optionally odd (kernel sizes keep 'same' padding)."""

    def normalize(value: Any) -> int:
        number = _require_int(value)
        if not minimum <= number <= maximum:
            raise HyperparameterValueError(f"must be between {minimum} and {maximum}, got {number}")
        if odd and number % 2 == 0:
            raise HyperparameterValueError(f"must be odd, got {number}")
        return number

    return normalize


def integer_list(min_length: int, max_length: int, minimum: int, maximum: int) -> Normalizer:
    """A list of integers, each in [minimum, maximum], with a bounded length."""

    def normalize(value: Any) -> list[int]:
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            raise HyperparameterValueError(f"must be a list of integers, got {value!r}")
        if not min_length <= len(value) <= max_length:
            raise HyperparameterValueError(
                f"must hold between {min_length} and {max_length} entries, got {len(value)}"
            )
        items = []
        for index, item in enumerate(value):
            if isinstance(item, bool) or not isinstance(item, int):
                raise HyperparameterValueError(f"entry {index} must be an integer, got {item!r}")
            if not minimum <= item <= maximum:
                raise HyperparameterValueError(
                    f"entry {index} must be between {minimum} and {maximum}, got {item}"
                )
            items.append(item)
        return items

    return normalize


def probability_below_one() -> Normalizer:
    """A float in [0, 1): a dropout rate of 1 would zero every activation."""

    def normalize(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise HyperparameterValueError(f"must be a number, got {value!r}")
        number = float(value)
        if not math.isfinite(number) or not 0.0 <= number < 1.0:
            raise HyperparameterValueError(f"must be in [0, 1), got {value!r}")
        return number

    return normalize


def boolean() -> Normalizer:
    """true or false; numbers are refused rather than read as truthy."""

    def normalize(value: Any) -> bool:
        if not isinstance(value, bool):
            raise HyperparameterValueError(f"must be true or false, got {value!r}")
        return value

    return normalize


def one_of(choices: Sequence[str]) -> Normalizer:
    """A string from a fixed set."""

    def normalize(value: Any) -> str:
        if value not in choices:
            raise HyperparameterValueError(f"must be one of {', '.join(choices)}; got {value!r}")
        return value

    return normalize


def resolve(declared: Sequence[Hyperparameter], given: Mapping[str, Any] | None) -> dict[str, Any]:
    """Checks `given` against `declared` and returns every hyperparameter, defaults filled.

    Every violation is reported at once, each as `architecture.hyperparameters.<key>`.
    """
    violations = ViolationCollector()
    given = {} if given is None else given
    if not isinstance(given, Mapping):
        violations.add(HYPERPARAMETERS_FIELD, f"must be an object, got {type(given).__name__}")
        violations.raise_if_any("invalid hyperparameters")
    by_name = {parameter.name: parameter for parameter in declared}
    known = ", ".join(by_name)
    for key in given:
        if key not in by_name:
            violations.add(f"{HYPERPARAMETERS_FIELD}.{key}", f"unknown hyperparameter; known: {known}")
    resolved: dict[str, Any] = {}
    for parameter in declared:
        value = given.get(parameter.name, parameter.default)
        try:
            resolved[parameter.name] = parameter.normalize(value)
        except HyperparameterValueError as error:
            violations.add(f"{HYPERPARAMETERS_FIELD}.{parameter.name}", str(error))
    violations.raise_if_any("invalid hyperparameters")
    return resolved
