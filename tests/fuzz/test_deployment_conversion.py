"""CreateDeployment and UpdateDeployment ignore output-only values a caller sends (AIP-203):
an out-of-range Timestamp or a made-up state is neither stored nor an INTERNAL error."""

from __future__ import annotations

import pytest
from google.protobuf import field_mask_pb2
from maas.inference.v1 import deployment_pb2, inference_service_pb2 as inf, inference_service_pb2_grpc
from maas.registry.v1 import registry_service_pb2 as rs, registry_service_pb2_grpc

from tests.fuzz.conftest import HYPER
from tests.inference.model_packages import save_zoo_package, zoo_model
from tests.registry.helpers import model_upload_requests

pytestmark = [pytest.mark.triton, pytest.mark.asyncio(loop_scope="session")]

FAR_FUTURE = 10**12


def hostile_output_only(deployment: deployment_pb2.Deployment) -> deployment_pb2.Deployment:
    """`deployment` with every output-only field set to something the server never wrote."""
    deployment.state = 77
    deployment.message = "all good, trust me"
    deployment.serving_versions.append("models/other/versions/9")
    deployment.shadow_stats.compared = -5
    for timestamp in (deployment.create_time, deployment.update_time):
        timestamp.seconds, timestamp.nanos = FAR_FUTURE, -1
    return deployment


async def test_output_only_deployment_fields_sent_are_ignored(fuzz_suite):
    # A model of its own: the fuzz test may have deleted or moved the seeded ones.
    package = fuzz_suite.root / "strict.safetensors"
    save_zoo_package(package, zoo_model("mlp", HYPER, [64], seed=7), kind="mlp",
                     hyperparameters=HYPER, input_shape=[64])
    async with fuzz_suite.channel("registry") as channel:
        registry = registry_service_pb2_grpc.RegistryServiceStub(channel)
        await registry.CreateModel(rs.CreateModelRequest(model_id="strict"))
        version = await registry.UploadModelVersion(
            model_upload_requests("models/strict", package.read_bytes()))

    async with fuzz_suite.channel("inference") as channel:
        stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
        created = await stub.CreateDeployment(inf.CreateDeploymentRequest(
            deployment_id="strict", deployment=hostile_output_only(deployment_pb2.Deployment(
                name="deployments/elsewhere", model=version.name))))
        assert created.name == "deployments/strict"
        assert created.state == deployment_pb2.DEPLOYMENT_STATE_READY
        assert list(created.serving_versions) == [version.name]
        assert created.message != "all good, trust me" and created.shadow_stats.compared == 0
        assert 0 < created.create_time.seconds < FAR_FUTURE

        updated = await stub.UpdateDeployment(inf.UpdateDeploymentRequest(
            deployment=hostile_output_only(deployment_pb2.Deployment(
                name="deployments/strict", etag=created.etag,
                serving=deployment_pb2.ServingConfig(max_batch_size=4))),
            update_mask=field_mask_pb2.FieldMask(paths=["serving"])))
        assert updated.serving.max_batch_size == 4
        assert updated.state == deployment_pb2.DEPLOYMENT_STATE_READY
        assert updated.create_time == created.create_time
        assert 0 < updated.update_time.seconds < FAR_FUTURE
        await stub.DeleteDeployment(inf.DeleteDeploymentRequest(name="deployments/strict"))
