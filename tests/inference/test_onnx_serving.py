"""ONNX versions served end to end: a real registry, a real inference service, the bundled
Triton (Python backend only, so onnxruntime runs inside it), Predict through the gateway.

The graphs are the compressor's own: a digits MLP exported by the convert step (fp32) and
quantized by the quantize step (int8 dynamic). Served outputs must equal onnxruntime's on the
same raw inputs: bit for bit for int8 (same graph, same runtime, one thread), within 1e-5 for
fp32. The deployment records which runtime serves it, and the int8 graph stays int8 on disk
in Triton's model repository.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import pytest_asyncio
from maas.common.v1 import tensor_pb2
from maas.inference.v1 import deployment_pb2, inference_service_pb2 as inf, inference_service_pb2_grpc
from maas.registry.v1 import model_pb2, registry_service_pb2_grpc
from maas_compressor.onnx_models import onnx_session
from maas_compressor.steps.base import OnnxForm
from maas_compressor.steps.convert import convert
from maas_compressor.steps.quantize import quantize
from maas_inference.server import build_server as build_inference
from maas_inference.settings import InferenceSettings
from maas_inference.triton.model_repository import (
    ArtifactFormat,
    ServingRuntime,
    TensorSpec,
    TritonModelSpec,
    build_model_config,
)
from maas_registry.server import build_server as build_registry
from maas_registry.settings import RegistrySettings
from maas_runtime.client import open_channel
from maas_runtime.discovery import StaticDiscovery

from tests.compressor.torch_helpers import (
    RecordingContext,
    digits_splits,
    train_in_place,
    zoo_model,
)
from tests.registry.helpers import model_upload_requests

pytestmark = [pytest.mark.triton]
served_async = pytest.mark.asyncio(loop_scope="session")


def upload_signature() -> model_pb2.Signature:
    signature = model_pb2.Signature()
    signature.inputs.add(name="input", datatype=tensor_pb2.DATA_TYPE_FP32, shape=[64])
    signature.outputs.add(name="logits", datatype=tensor_pb2.DATA_TYPE_FP32, shape=[10])
    return signature


class Served:
    """The running registry and inference service, and the two graphs uploaded to them."""

    graphs: dict[str, OnnxForm]
    inference_channel: object
    registry_channel: object
    model_repository: Path

    def predict_stub(self):
        return inference_service_pb2_grpc.InferenceServiceStub(self.inference_channel)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def served(tmp_path_factory):
    root: Path = tmp_path_factory.mktemp("onnx-serving")
    data = digits_splits()
    context = RecordingContext(data=data, workdir=root / "compressor")
    model = train_in_place(zoo_model("mlp", {"hidden_sizes": [64]}), context, epochs=4)
    fp32 = convert(model, {}, context).model
    int8 = quantize(fp32, {"dtype": "int8", "mode": "dynamic"}, context).model
    s = Served()
    s.graphs = {"fp32": fp32.form, "int8": int8.form}  # type: ignore[dict-item]

    s.registry = build_registry(RegistrySettings(state_dir=root / "registry", port=0))
    registry_port = await s.registry.start()
    registry_token = (root / "registry" / "admin.token").read_text().strip()
    s.registry_channel = open_channel(f"127.0.0.1:{registry_port}", token=registry_token)
    registry = registry_service_pb2_grpc.RegistryServiceStub(s.registry_channel)
    for name in ("fp32", "int8"):  # versions 1 and 2
        await registry.UploadModelVersion(
            model_upload_requests(
                "models/digits-onnx",
                s.graphs[name].path.read_bytes(),
                fmt=model_pb2.MODEL_FORMAT_ONNX,
                signature=upload_signature(),
            )
        )

    settings = InferenceSettings(
        state_dir=root / "inference", port=0, client_token_file=root / "registry" / "admin.token"
    )
    s.inference, app = build_inference(
        settings, discovery=StaticDiscovery({"registry": [f"127.0.0.1:{registry_port}"]})
    )
    port = await s.inference.start()
    s.model_repository = app.supervisor.server.model_repository
    token = (root / "inference" / "admin.token").read_text().strip()
    s.inference_channel = open_channel(f"127.0.0.1:{port}", token=token)
    yield s
    await s.inference_channel.close()
    await s.inference.stop(0)
    await s.registry_channel.close()
    await s.registry.stop(0)


def raw_digits(rows: int, seed: int) -> np.ndarray:
    """Pixels as a client sends them (0-16); the graphs scale them themselves."""
    return np.random.default_rng(seed).integers(0, 17, (rows, 64)).astype(np.float32)


async def deploy_and_predict(served: Served, deployment_id: str, version: int, data: np.ndarray):
    deployment = await served.predict_stub().CreateDeployment(
        inf.CreateDeploymentRequest(
            deployment_id=deployment_id,
            deployment=deployment_pb2.Deployment(model=f"models/digits-onnx/versions/{version}"),
        )
    )
    assert deployment.state == deployment_pb2.DEPLOYMENT_STATE_READY
    tensor = tensor_pb2.Tensor(
        name="input", datatype=tensor_pb2.DATA_TYPE_FP32, shape=list(data.shape), raw_data=data.tobytes()
    )
    reply = await served.predict_stub().Predict(
        inf.PredictRequest(deployment=f"deployments/{deployment_id}", inputs=[tensor])
    )
    output = reply.outputs[0]
    assert output.name == "logits"
    return deployment, np.frombuffer(output.raw_data, np.float32).reshape(tuple(output.shape))


def onnxruntime_outputs(form: OnnxForm, data: np.ndarray) -> np.ndarray:
    session = onnx_session(form, threads=1)
    return session.run(["logits"], {"input": data})[0]


@served_async
async def test_an_fp32_onnx_version_serves_what_onnxruntime_computes(served):
    data = raw_digits(7, seed=1)
    deployment, outputs = await deploy_and_predict(served, "digits-onnx-fp32", 1, data)

    np.testing.assert_allclose(outputs, onnxruntime_outputs(served.graphs["fp32"], data), atol=1e-5, rtol=0)
    # The bundled Triton has no onnxruntime backend: onnxruntime runs in the Python backend.
    assert "onnxruntime in Triton's Python backend" in deployment.message
    config = (served.model_repository / "digits-onnx-fp32.digits-onnx.v1" / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and '"onnx"' in config


@served_async
async def test_an_int8_onnx_version_serves_exactly_the_int8_graphs_outputs(served):
    data = raw_digits(5, seed=2)
    deployment, outputs = await deploy_and_predict(served, "digits-onnx-int8", 2, data)

    np.testing.assert_array_equal(outputs, onnxruntime_outputs(served.graphs["int8"], data))
    assert not np.allclose(outputs, onnxruntime_outputs(served.graphs["fp32"], data), atol=1e-6, rtol=0)
    served_graph = served.model_repository / "digits-onnx-int8.digits-onnx.v2" / "1" / "model.onnx"
    weights = [init for init in onnx.load(str(served_graph)).graph.initializer if len(init.dims) == 2]
    assert weights and all(init.data_type == onnx.TensorProto.INT8 for init in weights)


def test_a_triton_with_the_onnxruntime_backend_gets_an_onnxruntime_onnx_config():
    spec = TritonModelSpec(
        name="digits.v1",
        artifact_format=ArtifactFormat.ONNX,
        inputs=(TensorSpec("input", "FP32", (64,)),),
        outputs=(TensorSpec("logits", "FP32", (10,)),),
        runtime=ServingRuntime.ONNXRUNTIME_BACKEND,
    )
    config = build_model_config(spec)
    assert config.platform == "onnxruntime_onnx" and config.backend == "onnxruntime"
    assert config.default_model_filename == "model.onnx"
    assert config.parameters["intra_op_thread_count"].string_value == "1"
    assert "maas.artifact_format" not in config.parameters


def test_the_onnxruntime_backend_refuses_a_torch_artifact():
    from maas_runtime.errors import InvalidArgument

    spec = TritonModelSpec(
        name="digits.v1",
        artifact_format=ArtifactFormat.MAAS_PACKAGE,
        inputs=(TensorSpec("input", "FP32", (64,)),),
        outputs=(TensorSpec("logits", "FP32", (10,)),),
        runtime=ServingRuntime.ONNXRUNTIME_BACKEND,
    )
    with pytest.raises(InvalidArgument) as refused:
        build_model_config(spec)
    assert refused.value.field_violations[0].field == "runtime"

