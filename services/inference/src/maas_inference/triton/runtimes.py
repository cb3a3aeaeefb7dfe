"""Which runtime serves a model format on the Triton at hand.

maas-package and TorchScript versions run torch in Triton's Python backend
(`runtime_model.py`). ONNX versions run in onnxruntime: through Triton's own onnxruntime
backend when the Triton has one (the official images), else in the Python backend (the
`tritonserver` bundled in the nvidia-pytriton wheel ships the Python backend only).

Triton reports no list of its backends (server metadata names protocol extensions only), so
the answer is asked of Triton itself: a one-node identity graph is loaded with
`platform: "onnxruntime_onnx"` under a reserved name. It loads only where the backend
exists; either way it is unloaded and removed at once. The answer is asked once per
`OnnxBackendProbe`, on the first ONNX deployment, and kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
from pathlib import Path
from typing import Protocol

from maas_runtime.errors import MaasError

from maas_inference.triton.model_repository import (
    ArtifactFormat,
    BatchingPolicy,
    ModelRepository,
    ServingRuntime,
    TensorSpec,
    TritonModelSpec,
)

PROBE_MODEL_NAME = "maas-onnxruntime-backend-probe"
PROBE_LOAD_TIMEOUT_SECONDS = 30.0
PROBE_OPSET = 13

_log = logging.getLogger(__name__)


class ModelControl(Protocol):
    """The part of `TritonClient` the probe needs."""

    async def load_model(self, name: str, *, timeout: float | None = None) -> None: ...

    async def unload_model(self, name: str, *, timeout: float | None = None) -> None: ...


def identity_graph() -> bytes:
    """A valid ONNX model `y = Identity(x)` over one float: the smallest thing to load."""
    import onnx  # only the probe needs it, once

    tensor = [1]
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])],
        "maas_onnxruntime_probe",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, tensor)],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, tensor)],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", PROBE_OPSET)])
    model.ir_version = 8  # readable by every onnxruntime a Triton image ships since 2022
    return model.SerializeToString()


class OnnxBackendProbe:
    """Asks a Triton, once, whether it has the onnxruntime backend; then answers from memory."""

    def __init__(self, triton: ModelControl, repository: ModelRepository) -> None:
        self._triton = triton
        self._repository = repository
        self._answer: bool | None = None
        self._lock = asyncio.Lock()

    async def has_onnxruntime_backend(self) -> bool:
        async with self._lock:
            if self._answer is None:
                self._answer = await self._probe()
                _log.info("Triton %s the onnxruntime backend", "has" if self._answer else "lacks")
            return self._answer

    async def runtime_for(self, artifact_format: ArtifactFormat) -> ServingRuntime:
        """The runtime that serves `artifact_format` on this Triton (see module doc)."""
        if artifact_format is ArtifactFormat.ONNX and await self.has_onnxruntime_backend():
            return ServingRuntime.ONNXRUNTIME_BACKEND
        return ServingRuntime.PYTHON_BACKEND

    async def _probe(self) -> bool:
        spec = TritonModelSpec(
            name=PROBE_MODEL_NAME,
            artifact_format=ArtifactFormat.ONNX,
            inputs=(TensorSpec("x", "FP32", (1,)),),
            outputs=(TensorSpec("y", "FP32", (1,)),),
            batching=BatchingPolicy(max_batch_size=0, dynamic_batching=False),
            runtime=ServingRuntime.ONNXRUNTIME_BACKEND,
        )
        with tempfile.TemporaryDirectory() as scratch:
            graph = Path(scratch) / "identity.onnx"
            graph.write_bytes(identity_graph())
            await asyncio.to_thread(self._repository.write_model, spec, graph)
        try:
            await self._triton.load_model(PROBE_MODEL_NAME, timeout=PROBE_LOAD_TIMEOUT_SECONDS)
        except MaasError as error:
            _log.info("the onnxruntime backend probe did not load: %s", error)
            return False
        finally:
            with contextlib.suppress(MaasError):
                await self._triton.unload_model(PROBE_MODEL_NAME)
            await asyncio.to_thread(self._repository.remove_model, PROBE_MODEL_NAME)
        return True
