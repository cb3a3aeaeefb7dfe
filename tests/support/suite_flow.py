"""The shortest user journey through a running suite: train a tiny job, deploy it, predict.

Used by the end-to-end tests that need the whole path to work (TLS and mTLS on every port,
one trace across processes) but not a good model: one epoch of a 32-unit MLP on digits.
"""

from __future__ import annotations

import numpy as np
from maas.common.v1 import job_pb2, tensor_pb2
from maas.inference.v1 import deployment_pb2, inference_service_pb2 as inf, inference_service_pb2_grpc
from maas.registry.v1 import registry_service_pb2 as rs, registry_service_pb2_grpc
from maas.trainer.v1 import trainer_service_pb2_grpc

from tests.trainer.helpers import create_job, digits_spec, wait_until_final

ALIAS = "production"


class SuiteStubs:
    """Stubs of the three services over channels the caller opened (TLS, tracing, token)."""

    def __init__(self, registry_channel, trainer_channel, inference_channel):
        self.registry = registry_service_pb2_grpc.RegistryServiceStub(registry_channel)
        self.trainer = trainer_service_pb2_grpc.TrainerServiceStub(trainer_channel)
        self.inference = inference_service_pb2_grpc.InferenceServiceStub(inference_channel)


async def train_and_register(stubs: SuiteStubs, model_id: str) -> str:
    """Train one epoch and let the trainer publish it as `models/{model_id}@production`;
    returns the job's name once it succeeded."""
    job = await create_job(stubs.trainer, digits_spec(epochs=1, model_id=model_id, alias=ALIAS),
                           job_id=f"train-{model_id}")
    job = await wait_until_final(stubs.trainer, job.name, timeout=180)
    assert job.state == job_pb2.JOB_STATE_SUCCEEDED, job.error
    return job.name


async def registered_version(stubs: SuiteStubs, model_id: str):
    return await stubs.registry.GetModelVersion(rs.GetModelVersionRequest(
        name=f"models/{model_id}@{ALIAS}"))


async def deploy(stubs: SuiteStubs, model_id: str) -> deployment_pb2.Deployment:
    return await stubs.inference.CreateDeployment(inf.CreateDeploymentRequest(
        deployment_id=model_id, deployment=deployment_pb2.Deployment(
            model=f"models/{model_id}@{ALIAS}")))


async def predict(stubs: SuiteStubs, deployment_name: str) -> inf.PredictResponse:
    rows = np.full((1, 64), 8.0, np.float32)
    return await stubs.inference.Predict(inf.PredictRequest(
        deployment=deployment_name, inputs=[tensor_pb2.Tensor(
            name="input", datatype=tensor_pb2.DATA_TYPE_FP32, shape=list(rows.shape),
            raw_data=rows.tobytes())]))
