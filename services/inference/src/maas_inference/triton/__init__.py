"""The inference service's Triton layer: process lifecycle, model repository, client, runtime.

No gRPC servicer code lives here. `runtime_model.py` is not imported by the service: it is
the Python-backend `model.py` copied into every Triton model directory.
"""

from maas_inference.triton.client import (
    InferReply,
    RawTensor,
    TritonClient,
    TritonModelLoadError,
    TritonModelNotFound,
    build_infer_request,
    with_model_name,
)
from maas_inference.triton.launcher import (
    BundledTriton,
    RemoteTriton,
    TritonHealth,
    TritonProcessConfig,
    TritonServer,
    TritonServerProcess,
    TritonStartError,
    TritonSupervisor,
)
from maas_inference.triton.model_repository import (
    ArtifactFormat,
    BatchingPolicy,
    InstanceKind,
    ModelRepository,
    TensorSpec,
    TritonModelSpec,
    build_model_config,
    validate_triton_model_name,
)

__all__ = [
    "ArtifactFormat",
    "BatchingPolicy",
    "BundledTriton",
    "InferReply",
    "InstanceKind",
    "ModelRepository",
    "RawTensor",
    "RemoteTriton",
    "TensorSpec",
    "TritonClient",
    "TritonHealth",
    "TritonModelLoadError",
    "TritonModelNotFound",
    "TritonModelSpec",
    "TritonProcessConfig",
    "TritonServer",
    "TritonServerProcess",
    "TritonStartError",
    "TritonSupervisor",
    "build_infer_request",
    "build_model_config",
    "validate_triton_model_name",
    "with_model_name",
]
