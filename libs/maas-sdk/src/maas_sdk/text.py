"""Text models in the SDK: import a Hugging Face directory, send texts as KServe BYTES.

`hf_version_fields` checks and zips a directory with maas_text (no pickle read, nothing
fetched) and describes the version: the served signature (BYTES `text` [1] per item in; FP32
`embedding` [dim], L2-normalized, and BOOL `truncated` [1] out) and the tokenizer facts as
labels (`text.tokenizer_class`, `text.max_length`, ...). The zip itself carries the tokenizer.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from maas.common.v1 import tensor_pb2
from maas_runtime.errors import InvalidArgument
from maas_text.directory import HfDirectory, zip_directory

TEXT_INPUT = "text"
EMBEDDING_OUTPUT = "embedding"
TRUNCATED_OUTPUT = "truncated"


def hf_signature(directory: HfDirectory) -> dict[str, Any]:
    return {
        "inputs": [{"name": TEXT_INPUT, "datatype": "DATA_TYPE_BYTES", "shape": [1]}],
        "outputs": [
            {"name": EMBEDDING_OUTPUT, "datatype": "DATA_TYPE_FP32", "shape": [directory.dimension]},
            {"name": TRUNCATED_OUTPUT, "datatype": "DATA_TYPE_BOOL", "shape": [1]},
        ],
    }


def hf_version_fields(
    directory: str | os.PathLike[str], work_dir: str | os.PathLike[str]
) -> tuple[Path, dict[str, Any], dict[str, str]]:
    """(zip to upload, signature, labels) for a Hugging Face model directory."""
    checked = HfDirectory.open(directory)
    archive = zip_directory(checked.path, Path(work_dir) / "model.zip")
    return archive, hf_signature(checked), checked.labels()


def text_tensor(texts: Sequence[str | bytes], name: str = TEXT_INPUT) -> tensor_pb2.Tensor:
    """A BYTES tensor of shape [n, 1]: each item a 4-byte little-endian length and its bytes."""
    if isinstance(texts, str | bytes):
        raise InvalidArgument.for_field(name, "pass a list of texts, not one string")
    raw = bytearray()
    for text in texts:
        item = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        raw += len(item).to_bytes(4, "little") + item
    return tensor_pb2.Tensor(name=name, datatype=tensor_pb2.DATA_TYPE_BYTES,
                             shape=[len(texts), 1], raw_data=bytes(raw))
