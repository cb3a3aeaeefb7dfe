"""Inference benchmark: direct Triton vs the gateway's Predict vs its KServe-v2 endpoint.

Same model (64→128→10 MLP maas-package), same client code, one run. The registry and the
inference service (which supervises the bundled tritonserver) run as subprocesses; the load
generator runs here. Prints p50/p99 at concurrency 1 and throughput at concurrency 16 for
each path, with ratios to direct Triton, and dynamic batching on vs off at concurrency 32.

Run: `make bench` (or `.venv/bin/python -m tests.bench.bench_inference`).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from maas.common.v1 import tensor_pb2
from maas.inference.v1 import (
    deployment_pb2,
    inference_service_pb2 as inf,
    inference_service_pb2_grpc,
)
from maas.registry.v1 import registry_service_pb2 as rs, registry_service_pb2_grpc
from maas_formats import ModelManifest
from maas_formats.torch_io import save_torch_package
from maas_runtime.client import open_channel
from maas_zoo import build_model, resolve_hyperparameters
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.registry.helpers import model_upload_requests
from tests.support.processes import ServiceProcess, free_port

LATENCY_REQUESTS = 2000
THROUGHPUT_SECONDS = 5.0
HYPER = {"hidden_sizes": [128]}


def write_package(path: Path) -> None:
    torch.manual_seed(0)
    module = build_model("mlp", HYPER, [64], 10)
    manifest = ModelManifest.model_validate({
        "architecture": {"kind": "mlp", "hyperparameters": resolve_hyperparameters("mlp", HYPER)},
        "signature": {"inputs": [{"name": "input", "datatype": "FP32", "shape": [64]}],
                      "outputs": [{"name": "logits", "datatype": "FP32", "shape": [10]}]}})
    save_torch_package(path, manifest, module.state_dict())


async def latency(call, requests: int) -> tuple[float, float]:
    timings = []
    for _ in range(200):  # warm-up
        await call()
    for _ in range(requests):
        started = time.perf_counter()
        await call()
        timings.append((time.perf_counter() - started) * 1000)
    return statistics.median(timings), statistics.quantiles(timings, n=100)[98]


async def throughput(call, concurrency: int, seconds: float) -> float:
    done = 0
    stop_at = time.perf_counter() + seconds

    async def worker():
        nonlocal done
        while time.perf_counter() < stop_at:
            await call()
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - started)


async def main() -> None:
    bench_dir = Path(os.environ.get("MAAS_BENCH_DIR", ".maas/bench"))
    bench_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=bench_dir) as tmp:
        root = Path(tmp)
        registry = ServiceProcess("registry", root / "registry")
        await registry.start()
        triton_port = free_port()
        inference = ServiceProcess(
            "inference", root / "inference", registry_target=registry.target,
            client_token_file=str(root / "registry" / "admin.token"),
            triton_grpc_port=str(triton_port))
        try:
            await inference.start(timeout=120)
            rows = await measure(root, registry, inference, triton_port)
        finally:
            inference.terminate()
            registry.terminate()
    print_table(rows)


async def measure(root: Path, registry, inference, triton_port: int) -> list[tuple]:
    package = root / "mlp.safetensors"
    write_package(package)
    async with registry.stub() as channel:
        stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
        await stub.CreateModel(rs.CreateModelRequest(model_id="mlp"))
        await stub.UploadModelVersion(model_upload_requests("models/mlp", package.read_bytes()))
    auth_on = (inference.state_dir / "admin.token").exists()
    gateway = inference.stub() if auth_on else open_channel(inference.target)
    deployments = inference_service_pb2_grpc.InferenceServiceStub(gateway)
    for name, batching in (("bench", True), ("nobatch", False)):
        await deployments.CreateDeployment(inf.CreateDeploymentRequest(
            deployment_id=name, deployment=deployment_pb2.Deployment(
                model="models/mlp/versions/1", serving=deployment_pb2.ServingConfig(
                    max_batch_size=32, dynamic_batching=batching,
                    max_queue_delay_microseconds=100))))

    row = np.random.default_rng(0).random((1, 64), dtype=np.float32)
    predict = inf.PredictRequest(deployment="deployments/bench", inputs=[tensor_pb2.Tensor(
        name="input", datatype=tensor_pb2.DATA_TYPE_FP32, shape=[1, 64], raw_data=row.tobytes())])
    predict_nobatch = inf.PredictRequest()
    predict_nobatch.CopyFrom(predict)
    predict_nobatch.deployment = "deployments/nobatch"

    def kserve_request(model_name: str) -> service_pb2.ModelInferRequest:
        request = service_pb2.ModelInferRequest(model_name=model_name)
        request.inputs.add(name="input", datatype="FP32", shape=[1, 64])
        request.raw_input_contents.append(row.tobytes())
        return request

    direct_channel = open_channel(f"127.0.0.1:{triton_port}")
    direct = service_pb2_grpc.GRPCInferenceServiceStub(direct_channel)
    kserve = service_pb2_grpc.GRPCInferenceServiceStub(gateway)
    direct_request, kserve_request_ = kserve_request("bench.mlp.v1"), kserve_request("bench")

    passthrough_port = free_port()
    passthrough_process = subprocess.Popen(
        [sys.executable, "-m", "tests.bench.passthrough", str(passthrough_port),
         f"127.0.0.1:{triton_port}", "bench.mlp.v1"])
    passthrough_channel = open_channel(f"127.0.0.1:{passthrough_port}")
    await passthrough_channel.channel_ready()
    passthrough = service_pb2_grpc.GRPCInferenceServiceStub(passthrough_channel)

    paths = {
        "direct Triton (KServe-v2)": lambda: direct.ModelInfer(direct_request),
        "reference: bare Python pass-through": lambda: passthrough.ModelInfer(kserve_request_),
        "gateway Predict": lambda: deployments.Predict(predict),
        "gateway KServe-v2": lambda: kserve.ModelInfer(kserve_request_),
    }
    results = {}
    for name, call in paths.items():
        p50, p99 = await latency(call, LATENCY_REQUESTS)
        rps = await throughput(call, 16, THROUGHPUT_SECONDS)
        results[name] = (p50, p99, rps)
    batched = await throughput(lambda: deployments.Predict(predict), 32, THROUGHPUT_SECONDS)
    unbatched = await throughput(lambda: deployments.Predict(predict_nobatch), 32,
                                 THROUGHPUT_SECONDS)
    direct_nobatch_request = kserve_request("nobatch.mlp.v1")
    direct_batched = await throughput(lambda: direct.ModelInfer(direct_request), 32,
                                      THROUGHPUT_SECONDS)
    direct_unbatched = await throughput(lambda: direct.ModelInfer(direct_nobatch_request), 32,
                                        THROUGHPUT_SECONDS)
    await direct_channel.close()
    await gateway.close()
    await passthrough_channel.close()
    passthrough_process.terminate()
    passthrough_process.wait()

    base_p50, _, base_rps = results["direct Triton (KServe-v2)"]
    rows = []
    for name, (p50, p99, rps) in results.items():
        rows.append((name, f"{p50:.2f}", f"{p99:.2f}", f"{p50 - base_p50:+.2f}", f"{rps:,.0f}",
                     f"{rps / base_rps:.2f}"))
    rows.append(("dynamic batching on / off, c=32 (gateway)", "-", "-", "-",
                 f"{batched:,.0f} / {unbatched:,.0f}", f"{batched / unbatched:.2f}"))
    rows.append(("dynamic batching on / off, c=32 (direct)", "-", "-", "-",
                 f"{direct_batched:,.0f} / {direct_unbatched:,.0f}",
                 f"{direct_batched / direct_unbatched:.2f}"))
    return rows


def print_table(rows) -> None:
    header = ("path", "p50 ms c=1", "p99 ms c=1", "Δp50 vs direct", "req/s c=16",
              "ratio vs direct")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print()
    for row in (header, *rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    print("goals: gateway p50 ≤ direct + 0.3 ms; throughput ≥ 0.9× direct; batching ≥ 3×")


if __name__ == "__main__":
    asyncio.run(main())
