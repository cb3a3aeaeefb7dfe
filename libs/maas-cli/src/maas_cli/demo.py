"""The end-to-end demo: train digits, version it, serve it on Triton, predict, follow lineage.

Runs against a live suite (`LocalSuite`): the trainer trains an MLP on scikit-learn's bundled
8×8 digits and registers it as `models/digits` with alias `production`; the inference
service deploys `models/digits@production` onto Triton; the held-out digits are classified
through Predict and through the standard KServe-v2 endpoint; the registry shows the
version's checksum, lineage and the audit record of who moved `production`.
"""

from __future__ import annotations

import time

import grpc
import numpy as np
from maas.common.v1 import job_pb2, tensor_pb2
from maas.inference.v1 import deployment_pb2, inference_service_pb2 as inf, inference_service_pb2_grpc
from maas.registry.v1 import registry_service_pb2 as rs, registry_service_pb2_grpc
from maas.trainer.v1 import trainer_service_pb2 as ts, trainer_service_pb2_grpc, training_job_pb2
from tritonclient.grpc import service_pb2, service_pb2_grpc

from maas_cli.local_suite import LocalSuite


def say(text: str) -> None:
    print(text, flush=True)


def held_out_digits(test_fraction: float = 0.2, seed: int = 0):
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    test = order[: int(len(order) * test_fraction)]
    return digits.data[test].astype(np.float32), digits.target[test]


async def run_demo(suite: LocalSuite) -> dict:
    channels = {name: suite.open_channel(name) for name in suite.services}
    try:
        return await _flow(channels)
    finally:
        for channel in channels.values():
            await channel.close()


async def _flow(channels) -> dict:
    registry = registry_service_pb2_grpc.RegistryServiceStub(channels["registry"])
    trainer = trainer_service_pb2_grpc.TrainerServiceStub(channels["trainer"])
    inference = inference_service_pb2_grpc.InferenceServiceStub(channels["inference"])
    kserve = service_pb2_grpc.GRPCInferenceServiceStub(channels["inference"])

    say("1. training an MLP on scikit-learn's 8x8 digits through the trainer")
    job_id = f"digits-{int(time.time())}"
    spec = training_job_pb2.TrainingSpec(
        architecture=training_job_pb2.ArchitectureSpec(kind="mlp"),
        data=training_job_pb2.DataSource(dataset="builtin:digits"),
        optimizer=training_job_pb2.OptimizerSpec(kind=training_job_pb2.OPTIMIZER_KIND_ADAM,
                                                 learning_rate=0.003),
        schedule=training_job_pb2.ScheduleSpec(kind=training_job_pb2.SCHEDULE_KIND_COSINE),
        epochs=25, batch_size=32, seed=0,
        output=training_job_pb2.TrainingOutput(model_id="digits", alias="production",
                                                min_test_accuracy=0.9))
    spec.architecture.hyperparameters.update({"hidden_sizes": [128]})
    job = await trainer.CreateTrainingJob(ts.CreateTrainingJobRequest(
        training_job_id=job_id, training_job=training_job_pb2.TrainingJob(spec=spec)))
    async for event in trainer.WatchTrainingJob(ts.WatchTrainingJobRequest(name=job.name)):
        kind = event.WhichOneof("kind")
        if kind == "metrics" and event.metrics.phase == "train" and event.metrics.epoch % 5 == 0:
            values = event.metrics.values
            say(f"   epoch {event.metrics.epoch:3d}  loss {values['loss']:.4f}  "
                f"val_accuracy {values['val_accuracy']:.4f}")
        elif kind == "metrics" and event.metrics.phase == "test":
            say(f"   test_accuracy {event.metrics.values['test_accuracy']:.4f}")
        elif kind == "state_change":
            say(f"   job {job.name}: {job_pb2.JobState.Name(event.state_change.state)}")
    job = await trainer.GetTrainingJob(ts.GetTrainingJobRequest(name=job.name))
    if job.state != job_pb2.JOB_STATE_SUCCEEDED:
        raise RuntimeError(f"training failed: {job.error.code} {job.error.message}")
    version = await registry.GetModelVersion(rs.GetModelVersionRequest(
        name="models/digits@production"))
    say(f"2. registered {version.name}  sha256 {version.artifact.sha256[:16]}…  "
        f"test_accuracy {version.metrics['test_accuracy']:.4f}")
    say(f"   lineage: {version.lineage.operation.kind} by {version.lineage.operation.job}")

    say("3. deploying models/digits@production onto Triton (tracking the alias)")
    deployment_id = "digits"
    try:  # a previous run's deployment, if any, makes way for this one
        await inference.DeleteDeployment(inf.DeleteDeploymentRequest(
            name=f"deployments/{deployment_id}"))
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.NOT_FOUND:
            raise
    deployment = await inference.CreateDeployment(inf.CreateDeploymentRequest(
        deployment_id=deployment_id, deployment=deployment_pb2.Deployment(
            model="models/digits@production", track_alias=True)))
    say(f"   {deployment.name}: {deployment_pb2.DeploymentState.Name(deployment.state)} "
        f"serving {list(deployment.serving_versions)}")

    say("4. classifying the held-out digits through Predict and through KServe-v2")
    features, labels = held_out_digits()
    correct = 0
    for start in range(0, len(labels), 32):
        rows = features[start:start + 32]
        reply = await inference.Predict(inf.PredictRequest(
            deployment=deployment.name, inputs=[tensor_pb2.Tensor(
                name="input", datatype=tensor_pb2.DATA_TYPE_FP32, shape=list(rows.shape),
                raw_data=rows.tobytes())]))
        logits = np.frombuffer(reply.outputs[0].raw_data, np.float32).reshape(len(rows), -1)
        correct += int((logits.argmax(1) == labels[start:start + 32]).sum())
    predict_accuracy = correct / len(labels)
    say(f"   Predict accuracy on {len(labels)} held-out digits: {predict_accuracy:.4f} "
        f"(served by {reply.model_version})")
    request = service_pb2.ModelInferRequest(model_name=deployment_id)
    request.inputs.add(name="input", datatype="FP32", shape=[8, 64])
    request.raw_input_contents.append(features[:8].tobytes())
    kserve_reply = await kserve.ModelInfer(request)
    kserve_labels = np.frombuffer(kserve_reply.raw_output_contents[0], np.float32).reshape(8, -1)
    say(f"   KServe-v2 ModelInfer on '{kserve_reply.model_name}' v{kserve_reply.model_version}: "
        f"{kserve_labels.argmax(1).tolist()} (truth {labels[:8].tolist()})")

    audit = await registry.ListAuditEvents(rs.ListAuditEventsRequest(
        filter='resource = "models/digits/aliases/production"'))
    last = audit.audit_events[-1]
    say(f"5. audit: {last.principal} ran {last.method} on {last.resource} -> "
        f"{last.after['version']}")
    return {"job": job.name, "version": version.name, "predict_accuracy": predict_accuracy,
            "test_accuracy": version.metrics["test_accuracy"]}
