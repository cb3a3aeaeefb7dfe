"""Drill: the inference image, built for real with buildah, serves from inside a container.

`deploy/images/build.py` (what `make images` runs) builds the image on the debootstrap base,
layers cached. The gateway then starts inside a working container (`buildah run`, chroot
isolation, the host's network) as the image's non-root user, in remote mode against a real
tritonserver started on the host by the project's launcher, as the chart runs it against the
Triton pod; its native data plane owns the port. It answers gRPC health (`liveness`, and the
service's own name once Triton is ready). The image holds no torch and weighs under 400 MB.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from maas_cli.local_suite import free_port
from maas_inference.triton import TritonProcessConfig, TritonServerProcess
from maas_runtime.client import open_channel
from maas_runtime.server import LIVENESS_SERVICE

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


def stop_tree(process: subprocess.Popen) -> None:
    """SIGTERM to the session `buildah run` leads, SIGKILL to whatever outlives it."""
    pids = list(uids_of_tree(process.pid))
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
    labels = image_builder().image_labels(IMAGE)
    print(f"\ninference image: {size_mb:.0f} MB (goal < {SIZE_GOAL_MB}), "
          f"built in {build_seconds:.0f} s")
    assert size_mb < SIZE_GOAL_MB
    assert labels["org.opencontainers.image.version"] == IMAGE_VERSION
    assert labels["org.opencontainers.image.revision"] == revision
    assert labels["org.opencontainers.image.source"].startswith("https://")

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
                serving_uids = {uid for pid, uid in uids_of_tree(process.pid).items()
                                if pid != process.pid and "maas-inference" in
                                Path(f"/proc/{pid}/cmdline").read_text(errors="replace")}
                assert serving_uids == {IMAGE_UID}
                assert (state / "admin.token").stat().st_uid == IMAGE_UID
            finally:
                stop_tree(process)
    finally:
        await triton.stop()
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
