"""Drill: the images, built for real with buildah, serve from inside a container.

`deploy/images/build.py` (what `make images` runs) builds each image on the debootstrap base,
layers cached, and the service then starts inside a working container (`buildah run`, chroot
isolation, the host's network) as the image's non-root user:

* the inference gateway, in remote mode against a real tritonserver started on the host by the
  project's launcher, as the chart runs it against the Triton pod; its native data plane owns
  the port. It answers gRPC health (`liveness`, and the service's own name once Triton is
  ready). The image holds no torch and weighs under 400 MB.
* the trainer and the compressor, each with CPU torch (from the wheel on this machine's disk),
  answer gRPC health; their torch code imports and runs a zoo model inside the image.
* the Triton image, built on the nvidia-pytriton substitute (NGC is unreachable here): its
  tritonserver loads one of the suite's Python-backend models (a maas-package MLP, served by
  runtime_model.py in the stub, i.e. everything the models import is in the image), reports
  ready, and answers an inference with the logits torch computes on the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from maas_cli.local_suite import free_port
from maas_inference.triton import (
    ModelRepository,
    TritonModelSpec,
    TritonProcessConfig,
    TritonServerProcess,
)
from maas_inference.triton.launcher import pick_free_ports
from maas_runtime.client import open_channel
from maas_runtime.server import LIVENESS_SERVICE
from tritonclient.grpc import InferInput
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from tests.inference.model_packages import DIGITS_FEATURES, save_zoo_package, zoo_model
from tests.support.images import (
    BUILD_SCRIPT,
    MODEL_RUNTIME_DISTRIBUTIONS,
    build_images,
    image_builder,
    image_size_mb,
    python_distributions,
    run_command,
    working_container,
)
from tests.support.processes import process_alive, process_table

pytestmark = [pytest.mark.triton, pytest.mark.slow]

IMAGE_VERSION = "drill"
IMAGE = f"localhost/maas-inference:{IMAGE_VERSION}"
SIZE_GOAL_MB = 400
IMAGE_UID = 10001
STATE_IN_IMAGE = "/var/lib/maas/inference"
# Modules of the image with native extensions, and the gateway's own entry points.
NATIVE_MODULES = ("numpy", "onnx", "ml_dtypes", "grpc", "google.protobuf", "tokenizers",
                  "sqlalchemy", "psycopg", "pydantic_core", "aiohttp", "yarl", "multidict",
                  "rapidjson", "safetensors", "yaml", "wrapt", "maas_inference.server",
                  "maas_llm")
# The job services: their port and the modules of theirs that run torch (and onnxruntime).
JOB_SERVICE_TORCH_MODULES = {
    "trainer": ("maas_trainer.training", "maas_trainer.text_training"),
    "compressor": ("maas_compressor.torch_models", "maas_compressor.onnx_models",
                   "maas_compressor.steps.prune", "maas_compressor.steps.quantize_torch",
                   "maas_compressor.steps.distill"),
}
TORCH_PROBE = ("import json, torch, maas_zoo; "
               "model = maas_zoo.build_model('mlp', {'hidden_sizes': [8]}, [4], 3).eval(); "
               "logits = model(torch.zeros(2, 4)); "
               "print(json.dumps([torch.__version__, torch.version.cuda, list(logits.shape)]))")
TRITON_IMAGE = f"localhost/maas-triton:{IMAGE_VERSION}"
TRITON_UID = 1000


async def health_status(port: int, service: str) -> int:
    async with open_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=2)
        return reply.status


async def wait_for_health(port: int, service: str, process: subprocess.Popen,
                          timeout: float) -> int:
    deadline = time.monotonic() + timeout
    status = health_pb2.HealthCheckResponse.UNKNOWN
    while time.monotonic() < deadline and process.poll() is None:
        try:
            status = await health_status(port, service)
            if status == health_pb2.HealthCheckResponse.SERVING:
                break
        except Exception:  # noqa: BLE001 - not listening yet
            pass
        await asyncio.sleep(0.5)
    return status


def uids_of_tree(root: int) -> dict[int, int]:
    """pid → real uid of `root` and its descendants."""
    table = process_table()
    tree, pending = {}, [root]
    while pending:
        pid = pending.pop()
        if pid in tree:
            continue
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        tree[pid] = int(next(line for line in status.splitlines()
                             if line.startswith("Uid:")).split()[1])
        pending += [child for child, info in table.items() if info.parent == pid]
    return tree


def uids_of(process: subprocess.Popen, command_word: str) -> set[int]:
    """Real uids of the processes under `buildah run` whose command line names `command_word`."""
    return {uid for pid, uid in uids_of_tree(process.pid).items()
            if pid != process.pid and command_word in
            Path(f"/proc/{pid}/cmdline").read_text(errors="replace")}


def stop_tree(process: subprocess.Popen) -> None:
    """SIGTERM to the session `buildah run` leads, SIGKILL to whatever outlives it."""
    pids = list(uids_of_tree(process.pid))
    with contextlib.suppress(ProcessLookupError):  # it may have exited already
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    for pid in pids:
        if process_alive(pid):
            os.kill(pid, signal.SIGKILL)


async def test_the_inference_image_serves_health_as_non_root_without_torch_under_400_mb(
        tmp_path):
    started = time.monotonic()
    revision = f"drill-{time.time_ns()}"  # unlike any earlier build's
    await asyncio.to_thread(build_images, ["inference"], IMAGE_VERSION, revision)
    build_seconds = time.monotonic() - started
    size_mb = image_size_mb(IMAGE)
    print(f"\ninference image: {size_mb:.0f} MB (goal < {SIZE_GOAL_MB}), "
          f"built in {build_seconds:.0f} s")
    assert size_mb < SIZE_GOAL_MB
    assert_labelled(IMAGE, revision)

    triton = TritonServerProcess(TritonProcessConfig(
        state_dir=tmp_path / "triton", model_repository=tmp_path / "triton" / "models"))
    await triton.start()
    try:
        with working_container(IMAGE) as container:
            distributions = python_distributions(container)
            assert {"maas-inference", "maas-runtime", "onnx", "tritonclient"} <= distributions
            assert not distributions & set(MODEL_RUNTIME_DISTRIBUTIONS)
            # The wheels' shared libraries are stripped in the build: every one still loads.
            imported = subprocess.run(
                run_command(container, ["python", "-c", f"import {', '.join(NATIVE_MODULES)}"]),
                capture_output=True, text=True, check=False)
            assert imported.returncode == 0, imported.stderr[-3000:]

            # What the chart mounts: the state volume and the model repository shared with
            # Triton, writable by the image's user; the control key Triton demands.
            state = tmp_path / "state"
            state.mkdir()
            os.chown(state, IMAGE_UID, IMAGE_UID)
            os.chmod(triton.model_repository, 0o777)
            key_file = tmp_path / "triton-control.key"
            key_file.write_text(triton.control_key + "\n")
            key_file.chmod(0o644)
            port = free_port()
            log_path = tmp_path / "inference.log"
            env = {"MAAS_INFERENCE_HOST": "127.0.0.1", "MAAS_INFERENCE_PORT": str(port),
                   "MAAS_INFERENCE_TRITON_URL": triton.grpc_url,
                   "MAAS_INFERENCE_TRITON_MODEL_REPOSITORY": str(triton.model_repository),
                   "MAAS_INFERENCE_TRITON_CONTROL_KEY_FILE": str(key_file),
                   # No registry runs here; the gateway dials it only when a deployment asks.
                   "MAAS_INFERENCE_REGISTRY_TARGET": f"127.0.0.1:{free_port()}"}
            volumes = [f"{state}:{STATE_IN_IMAGE}",
                       f"{triton.model_repository}:{triton.model_repository}",
                       f"{key_file}:{key_file}:ro"]
            with log_path.open("wb") as log:
                process = subprocess.Popen(
                    run_command(container, ["maas-inference"], env=env, volumes=volumes),
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                liveness = await wait_for_health(port, LIVENESS_SERVICE, process, timeout=90)
                assert liveness == health_pb2.HealthCheckResponse.SERVING, \
                    log_path.read_text()[-3000:]
                assert await wait_for_health(port, "inference", process, timeout=30) == \
                    health_pb2.HealthCheckResponse.SERVING
                assert uids_of(process, "maas-inference") == {IMAGE_UID}
                assert (state / "admin.token").stat().st_uid == IMAGE_UID
            finally:
                stop_tree(process)
    finally:
        await triton.stop()
    print(f"drill: {time.monotonic() - started:.0f} s in all")


def assert_labelled(image: str, revision: str) -> None:
    labels = image_builder().image_labels(image)
    assert labels["org.opencontainers.image.version"] == IMAGE_VERSION
    assert labels["org.opencontainers.image.revision"] == revision
    assert labels["org.opencontainers.image.source"].startswith("https://")


@pytest.mark.parametrize("service", sorted(JOB_SERVICE_TORCH_MODULES))
async def test_a_job_service_image_serves_health_as_non_root_with_cpu_torch(service, tmp_path):
    started = time.monotonic()
    revision = f"drill-{time.time_ns()}"
    await asyncio.to_thread(build_images, [service], IMAGE_VERSION, revision)
    build_seconds = time.monotonic() - started
    image = f"localhost/maas-{service}:{IMAGE_VERSION}"
    print(f"\n{service} image: {image_size_mb(image):.0f} MB, built in {build_seconds:.0f} s")
    assert_labelled(image, revision)

    with working_container(image) as container:
        distributions = python_distributions(container)
        assert {f"maas-{service}", "maas-jobs", "maas-zoo", "torch"} <= distributions
        # Its torch code imports, and a zoo model runs, on the CPU build of torch.
        imports = f"import {', '.join(JOB_SERVICE_TORCH_MODULES[service])}; "
        probe = subprocess.run(run_command(container, ["python", "-c", imports + TORCH_PROBE]),
                               capture_output=True, text=True, check=False)
        assert probe.returncode == 0, probe.stderr[-3000:]
        torch_version, cuda, logits_shape = json.loads(probe.stdout.splitlines()[-1])
        assert torch_version == torch.__version__ and torch_version.endswith("+cpu")
        assert cuda is None
        assert logits_shape == [2, 3]

        state = tmp_path / "state"
        state.mkdir()
        os.chown(state, IMAGE_UID, IMAGE_UID)
        port = free_port()
        prefix = f"MAAS_{service.upper()}_"
        env = {f"{prefix}HOST": "127.0.0.1", f"{prefix}PORT": str(port),
               # No registry runs here; a job service dials it only when a job needs it.
               f"{prefix}REGISTRY_TARGET": f"127.0.0.1:{free_port()}"}
        log_path = tmp_path / f"{service}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                run_command(container, [f"maas-{service}"], env=env,
                            volumes=[f"{state}:/var/lib/maas/{service}"]),
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            for health_name in (LIVENESS_SERVICE, service):
                status = await wait_for_health(port, health_name, process, timeout=120)
                assert status == health_pb2.HealthCheckResponse.SERVING, \
                    log_path.read_text()[-3000:]
            assert uids_of(process, f"maas-{service}") == {IMAGE_UID}
        finally:
            stop_tree(process)
    print(f"drill: {time.monotonic() - started:.0f} s in all")


def write_mlp_model(repository: Path, workdir: Path) -> torch.nn.Module:
    """The digits MLP as a maas-package in `repository`, as the gateway writes a deployment."""
    mlp = zoo_model("mlp", {"hidden_sizes": [32]}, [DIGITS_FEATURES], seed=7)
    artifact = workdir / "mlp.safetensors"
    signature = save_zoo_package(artifact, mlp, kind="mlp", hyperparameters={
        "hidden_sizes": [32]}, input_shape=[DIGITS_FEATURES])
    ModelRepository(repository).write_model(
        TritonModelSpec.from_signature("mlp", "maas-package", signature), artifact)
    return mlp


async def wait_for_triton_ready(grpc_url: str, process: subprocess.Popen,
                                timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    async with InferenceServerClient(grpc_url) as client:
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if await client.is_server_ready(client_timeout=2):
                    return True
            except InferenceServerException:
                pass  # not listening yet
            await asyncio.sleep(0.5)
    return False


async def test_the_triton_image_on_the_pytriton_substitute_serves_a_python_backend_model(
        tmp_path):
    started = time.monotonic()
    revision = f"drill-{time.time_ns()}"
    await asyncio.to_thread(build_images, ["triton"], IMAGE_VERSION, revision,
                            ["--tritonserver", "nvidia-pytriton"])
    build_seconds = time.monotonic() - started
    print(f"\ntriton image (nvidia-pytriton substitute): {image_size_mb(TRITON_IMAGE):.0f} MB, "
          f"built in {build_seconds:.0f} s")
    assert_labelled(TRITON_IMAGE, revision)

    repository = tmp_path / "models"
    mlp = write_mlp_model(repository, tmp_path)
    grpc_port, http_port, metrics_port = pick_free_ports("127.0.0.1", 3)
    command = ["tritonserver", f"--model-repository={repository}",
               f"--grpc-port={grpc_port}", f"--http-port={http_port}",
               f"--metrics-port={metrics_port}"]
    with working_container(TRITON_IMAGE) as container:
        log_path = tmp_path / "tritonserver.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                run_command(container, command, volumes=[f"{repository}:{repository}:ro"]),
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            grpc_url = f"127.0.0.1:{grpc_port}"
            # Ready only once every model in the repository has loaded (strict readiness).
            assert await wait_for_triton_ready(grpc_url, process, timeout=180), \
                log_path.read_text()[-4000:]
            features = np.random.default_rng(7).integers(
                0, 17, size=(4, DIGITS_FEATURES)).astype(np.float32)
            async with InferenceServerClient(grpc_url) as client:
                assert await client.is_model_ready("mlp")
                request = InferInput("features", list(features.shape), "FP32")
                request.set_data_from_numpy(features)
                result = await client.infer("mlp", [request], client_timeout=30)
            with torch.inference_mode():
                expected = mlp(torch.from_numpy(features)).numpy()
            np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-5,
                                       atol=1e-5)
            assert uids_of(process, "tritonserver") == {TRITON_UID}
        finally:
            stop_tree(process)
    print(f"drill: {time.monotonic() - started:.0f} s in all")


def test_make_images_skips_the_triton_image_naming_its_missing_base():
    missing_base = "localhost/maas-no-such-tritonserver:0-py3"
    result = subprocess.run(
        [sys.executable, str(BUILD_SCRIPT), "triton", "--triton-base", missing_base],
        capture_output=True, text=True, check=False, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"SKIPPED the Triton image: its base is not available here (cannot pull " \
           f"{missing_base}" in result.stdout
    assert "STEP" not in result.stdout  # no build began
