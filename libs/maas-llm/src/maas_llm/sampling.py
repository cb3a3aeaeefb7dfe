"""Sampling parameters of one generation, checked strictly at the edge.

The Triton generation model receives them as a JSON object (`sampling_parameters`), the
gateway as protobuf fields; both end in `SamplingParams`. Every bad value raises
InvalidArgument naming its field, unknown keys included, so a typo never falls back to a
default silently.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from maas_runtime.errors import InvalidArgument

DEFAULT_MAX_TOKENS = 256
MAX_STOP_STRINGS = 8
MAX_STOP_STRING_CHARS = 128
MAX_TEMPERATURE = 100.0
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens: temperature 0 is greedy; top_k 0 and top_p 1 switch those off."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = field(default=())
    seed: int | None = None
    repetition_penalty: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, field_prefix: str = "") -> SamplingParams:
        """Check `values` (the JSON object's keys) and build the parameters."""
        known = {f for f in cls.__dataclass_fields__}
        for key in values:
            if key not in known:
                raise InvalidArgument.for_field(
                    f"{field_prefix}{key}", f"unknown sampling parameter; known: {', '.join(sorted(known))}"
                )
        defaults = cls()

        def integer(name: str, default: int | None, low: int, high: int) -> int | None:
            value = values.get(name, default)
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidArgument.for_field(f"{field_prefix}{name}", "must be an integer")
            if not low <= value <= high:
                raise InvalidArgument.for_field(
                    f"{field_prefix}{name}", f"must be between {low} and {high}, got {value}"
                )
            return value

        def real(name: str, default: float, low: float, high: float, *, open_low: bool = False) -> float:
            value = values.get(name, default)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise InvalidArgument.for_field(f"{field_prefix}{name}", "must be a finite number")
            if value < low or value > high or (open_low and value == low):
                bound = f"above {low}" if open_low else f"at least {low}"
                raise InvalidArgument.for_field(
                    f"{field_prefix}{name}", f"must be {bound} and at most {high}, got {value}"
                )
            return float(value)

        stop = values.get("stop", [])
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise InvalidArgument.for_field(f"{field_prefix}stop", "must be a list of strings")
        if len(stop) > MAX_STOP_STRINGS:
            raise InvalidArgument.for_field(
                f"{field_prefix}stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}"
            )
        for text in stop:
            if not text or len(text) > MAX_STOP_STRING_CHARS:
                raise InvalidArgument.for_field(
                    f"{field_prefix}stop",
                    f"each stop string must have 1 to {MAX_STOP_STRING_CHARS} characters",
                )
        max_tokens = integer("max_tokens", defaults.max_tokens, 1, 1_000_000)
        top_k = integer("top_k", defaults.top_k, 0, 1_000_000)
        return cls(
            max_tokens=max_tokens if max_tokens is not None else defaults.max_tokens,
            temperature=real("temperature", defaults.temperature, 0.0, MAX_TEMPERATURE),
            top_p=real("top_p", defaults.top_p, 0.0, 1.0, open_low=True),
            top_k=top_k if top_k is not None else 0,
            stop=tuple(stop),
            seed=integer("seed", None, 0, MAX_SEED),
            repetition_penalty=real("repetition_penalty", 1.0, 0.0, 10.0, open_low=True),
        )

    @classmethod
    def from_json(cls, text: str | bytes, *, field_path: str = "sampling_parameters") -> SamplingParams:
        """Parse the JSON object the Triton model receives; "" means every default."""
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidArgument.for_field(field_path, "is not valid UTF-8") from None
        if not text.strip():
            return cls()
        try:
            values = json.loads(text)
        except ValueError as error:
            raise InvalidArgument.for_field(field_path, f"is not valid JSON ({error})") from None
        if not isinstance(values, dict):
            raise InvalidArgument.for_field(field_path, "must be a JSON object")
        return cls.from_mapping(values)

    def to_json(self) -> str:
        values: dict[str, Any] = {
            "max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
            "top_k": self.top_k, "stop": list(self.stop),
            "repetition_penalty": self.repetition_penalty,
        }
        if self.seed is not None:
            values["seed"] = self.seed
        return json.dumps(values)
