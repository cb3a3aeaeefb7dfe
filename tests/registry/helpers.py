"""Helpers for registry tests: artifacts, upload/download over a real stub, databases."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
from maas.common.v1 import tensor_pb2
from maas.registry.v1 import dataset_pb2, model_pb2, registry_service_pb2
from safetensors.numpy import save

from tests.support.postgres import (  # noqa: F401 (re-exported to the registry tests)
    fresh_postgres_database,
    postgres_admin_url,
)


def mlp_package(seed: int = 0, hidden: int = 16) -> bytes:
    """A maas-package (safetensors + manifest in its header) of a 64→hidden→10 MLP."""
    rng = np.random.default_rng(seed)
    tensors = {
        "layers.0.weight": rng.standard_normal((hidden, 64)).astype(np.float32),
        "layers.0.bias": np.zeros(hidden, np.float32),
        "layers.2.weight": rng.standard_normal((10, hidden)).astype(np.float32),
        "layers.2.bias": np.zeros(10, np.float32),
    }
    manifest = {
        "format_version": 1,
        "architecture": {"kind": "mlp", "hyperparameters": {"hidden_sizes": [hidden]}},
        "signature": {"inputs": [{"name": "input", "datatype": "FP32", "shape": [64]}],
                      "outputs": [{"name": "logits", "datatype": "FP32", "shape": [10]}]},
        "tensors": {name: {"dtype": "F32", "shape": list(array.shape)}
                    for name, array in tensors.items()},
    }
    return save(tensors, metadata={"maas.manifest": json.dumps(manifest)})


def digits_npz(rows: int = 40) -> bytes:
    rng = np.random.default_rng(1)
    buffer = io.BytesIO()
    np.savez(buffer, features=rng.random((rows, 64)).astype(np.float32),
             labels=rng.integers(0, 10, rows))
    return buffer.getvalue()


def digits_csv(rows: int = 30) -> bytes:
    lines = ["f0,f1,f2,label"] + [f"{i},{i * 2},{i % 3},{i % 4}" for i in range(rows)]
    return ("\n".join(lines) + "\n").encode()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digits_signature() -> model_pb2.Signature:
    """What an opaque (ONNX, TorchScript) digits classifier must declare to be served."""
    return model_pb2.Signature(
        inputs=[tensor_pb2.TensorSpec(name="input", datatype=tensor_pb2.DATA_TYPE_FP32,
                                      shape=[64])],
        outputs=[tensor_pb2.TensorSpec(name="logits", datatype=tensor_pb2.DATA_TYPE_FP32,
                                       shape=[10])])


def model_upload_requests(parent: str, data: bytes, *, chunk: int = 64 * 1024,
                          fmt=model_pb2.MODEL_FORMAT_MAAS_PACKAGE, expected: str | None = None,
                          size: int | None = None, metrics=None, labels=None, parents=(),
                          operation=None, signature: model_pb2.Signature | None = None,
                          require_existing_model: bool = False):
    version = model_pb2.ModelVersion(format=fmt, metrics=metrics or {}, labels=labels or {})
    version.lineage.parents.extend(parents)
    if operation:
        version.lineage.operation.kind = operation
    if signature is not None:
        version.signature.CopyFrom(signature)
    header = registry_service_pb2.UploadModelVersionHeader(
        parent=parent, model_version=version,
        expected_sha256=sha256(data) if expected is None else expected,
        size_bytes=len(data) if size is None else size,
        require_existing_model=require_existing_model)
    yield registry_service_pb2.UploadModelVersionRequest(header=header)
    for start in range(0, len(data), chunk):
        yield registry_service_pb2.UploadModelVersionRequest(chunk=data[start:start + chunk])


def dataset_upload_requests(parent: str, data: bytes, fmt, feature_columns, label_column,
                            parents=()):
    version = dataset_pb2.DatasetVersion(format=fmt)
    version.schema.feature_columns.extend(feature_columns)
    version.schema.label_column = label_column
    version.lineage.parents.extend(parents)
    yield registry_service_pb2.UploadDatasetVersionRequest(
        header=registry_service_pb2.UploadDatasetVersionHeader(
            parent=parent, dataset_version=version, expected_sha256=sha256(data),
            size_bytes=len(data)))
    for start in range(0, len(data), 65536):
        yield registry_service_pb2.UploadDatasetVersionRequest(chunk=data[start:start + 65536])


async def download(call) -> tuple[object, bytes]:
    header, parts = None, []
    async for message in call:
        if message.WhichOneof("content") == "header":
            header = message.header
        else:
            parts.append(message.chunk)
    return header, b"".join(parts)


def blob_files(state_dir: Path) -> list[Path]:
    return sorted((state_dir / "blobs" / "sha256").glob("??/*"))


def staging_files(state_dir: Path) -> list[Path]:
    return sorted((state_dir / "blobs" / "staging").glob("*"))
