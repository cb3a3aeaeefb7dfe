"""GGUF headers for the generative-model code: the registry's reader, re-exported.

The parser lives in `maas_formats.gguf` because the registry validates MODEL_FORMAT_GGUF
uploads with it and must not depend on this package's torch stack; one parser serves both.
"""

from __future__ import annotations

from maas_formats.gguf import GgufArray, GgufHeader, GgufTensorInfo, read_gguf_header

__all__ = ["GgufArray", "GgufHeader", "GgufTensorInfo", "read_gguf_header"]
