"""Inference benchmark: direct Triton vs the gateway's Predict vs its KServe-v2 endpoint.

The gateway rows go through the service's public port, i.e. its native data plane; the same
service in `data_plane=python` mode is a reference row, as is a bare Python pass-through.

Same model (64→128→10 MLP maas-package), same client code, one run. The registry and the
inference service (which supervises the bundled tritonserver) run as subprocesses; the load
generator runs here. Prints p50/p99 at concurrency 1 and throughput at concurrency 16 for
each path, with ratios to direct Triton and the CPU time its serving processes spent per
request (what bounds throughput when client, hop and Triton share two cores), and dynamic
batching on vs off at concurrency 32.
MLServer serving the same weights (TorchScript) is a second reference when it installs
(`tests.bench.mlserver_reference`).

Run: `make bench` (or `.venv/bin/python -m tests.bench.bench_inference`).
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
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

from tests.bench.mlserver_reference import (
    MLSERVER_VERSION,
    MODEL_NAME,
    mlserver_python,
    start_mlserver,
)
from tests.registry.helpers import model_upload_requests
from tests.support.bench import bench_root, bench_workdir
from tests.support.processes import (
    ServiceProcess,
    children_named,
    free_port,
    inference_process,
    process_tree_cpu_seconds,
)

LATENCY_REQUESTS = 1000
THROUGHPUT_SECONDS = 5.0
ROUNDS = 3
HYPER = {"hidden_sizes": [128]}


def write_package(path: Path) -> torch.nn.Module:
    """The benchmark's MLP as a maas-package at `path`; returns the module (for MLServer)."""
    torch.manual_seed(0)
    module = build_model("mlp", HYPER, [64], 10)
    manifest = ModelManifest.model_validate({
        "architecture": {"kind": "mlp", "hyperparameters": resolve_hyperparameters("mlp", HYPER)},
        "signature": {"inputs": [{"name": "input", "datatype": "FP32", "shape": [64]}],
                      "outputs": [{"name": "logits", "datatype": "FP32", "shape": [10]}]}})
    save_torch_package(path, manifest, module.state_dict())
    return module


async def latency(call, requests: int) -> tuple[float, float]:
    timings = []
    for _ in range(200):  # warm-up
        await call()
    for _ in range(requests):
        started = time.perf_counter()
        await call()
        timings.append((time.perf_counter() - started) * 1000)
    return statistics.median(timings), statistics.quantiles(timings, n=100)[98]


async def latency_and_throughput(call, server_pids: list[int]) -> tuple[float, ...]:
    """p50 and p99 at concurrency 1; then requests/s at concurrency 16 and the CPU time the
    serving side (`server_pids` and their child processes) spent per request meanwhile."""
    p50, p99 = await latency(call, LATENCY_REQUESTS)
    cpu_before = process_tree_cpu_seconds(server_pids)
    requests, elapsed = await load(call, 16, THROUGHPUT_SECONDS)
    cpu_per_request = (process_tree_cpu_seconds(server_pids) - cpu_before) / requests
    return p50, p99, requests / elapsed, cpu_per_request * 1e6


async def interleaved_rounds(paths: dict) -> dict[str, tuple[float, ...]]:
    """`latency_and_throughput` of every path, ROUNDS times, the paths taking turns; the
    median of each figure (a 2-core machine shared with the load generator drifts)."""
    rounds: dict[str, list[tuple[float, ...]]] = {name: [] for name in paths}
    for _ in range(ROUNDS):
        for name, (call, server_pids) in paths.items():
            rounds[name].append(await latency_and_throughput(call, server_pids))
    return {name: tuple(statistics.median(figures) for figures in zip(*measured, strict=True))
            for name, measured in rounds.items()}


async def throughput(call, concurrency: int, seconds: float) -> float:
    requests, elapsed = await load(call, concurrency, seconds)
    return requests / elapsed


async def load(call, concurrency: int, seconds: float) -> tuple[int, float]:
    """`concurrency` callers in a loop for `seconds`: requests done and the time taken."""
    done = 0
    stop_at = time.perf_counter() + seconds

    async def worker():
        nonlocal done
        while time.perf_counter() < stop_at:
            await call()
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done, time.perf_counter() - started


async def main() -> None:
    bench_dir = bench_root()
    mlserver, mlserver_missing = mlserver_python(bench_dir)
    with bench_workdir() as root:
        registry = ServiceProcess("registry", root / "registry")
        await registry.start()
        triton_port = free_port()
        inference = inference_process(root, registry, triton_grpc_port=str(triton_port))
        python_gateway = inference_process(root, registry, "inference-python", data_plane="python")
        try:
            await inference.start(timeout=120)
            await python_gateway.start(timeout=120)
            rows = await measure(root, registry, inference, triton_port, mlserver, python_gateway)
        finally:
            python_gateway.terminate()
            inference.terminate()
            registry.terminate()
    print_table(rows)
    if mlserver is None:
        print(f"MLServer {MLSERVER_VERSION} is not in the table: {mlserver_missing}")


async def deploy(gateway, name: str, batching: bool) -> None:
    deployments = inference_service_pb2_grpc.InferenceServiceStub(gateway)
    await deployments.CreateDeployment(inf.CreateDeploymentRequest(
        deployment_id=name, deployment=deployment_pb2.Deployment(
            model="models/mlp/versions/1", serving=deployment_pb2.ServingConfig(
                max_batch_size=32, dynamic_batching=batching, max_queue_delay_microseconds=100))))


async def register_package(root: Path, registry: ServiceProcess) -> torch.nn.Module:
    """Write the benchmark's MLP under `root` and register it as models/mlp version 1;
    returns the module (for MLServer)."""
    package = root / "mlp.safetensors"
    module = write_package(package)
    async with registry.stub() as channel:
        stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
        await stub.CreateModel(rs.CreateModelRequest(model_id="mlp"))
        await stub.UploadModelVersion(model_upload_requests("models/mlp", package.read_bytes()))
    return module


async def measure(root: Path, registry, inference, triton_port: int,
                  mlserver: Path | None, python_gateway) -> list[tuple]:
    module = await register_package(root, registry)
    # The token goes as call metadata, as tritonclient's `headers=` sends it (a Python client
    # interceptor would cost the load generator more CPU than the hop being measured).
    token = (("authorization", f"Bearer {inference.admin_token()}"),)
    python_token = (("authorization", f"Bearer {python_gateway.admin_token()}"),)
    gateway = open_channel(inference.target)
    python_channel = open_channel(python_gateway.target)
    deployments = inference_service_pb2_grpc.InferenceServiceStub(gateway)
    python_deployments = inference_service_pb2_grpc.InferenceServiceStub(python_channel)
    async with inference.stub() as admin:
        for name, batching in (("bench", True), ("nobatch", False)):
            await deploy(admin, name, batching)
    async with python_gateway.stub() as admin:
        await deploy(admin, "bench", True)

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

    [triton_pid] = children_named(inference.process.pid, "tritonserver")
    passthrough_port = free_port()
    passthrough_process = subprocess.Popen(
        [sys.executable, "-m", "tests.bench.passthrough", str(passthrough_port),
         f"127.0.0.1:{triton_port}", "bench.mlp.v1"])
    passthrough_channel = open_channel(f"127.0.0.1:{passthrough_port}")
    try:
        await passthrough_channel.channel_ready()
        passthrough = service_pb2_grpc.GRPCInferenceServiceStub(passthrough_channel)

        # Each path: the call, and the processes serving it (whose CPU time is counted).
        paths = {
            "direct Triton (KServe-v2)": (lambda: direct.ModelInfer(direct_request),
                                          [triton_pid]),
            "reference: bare Python pass-through": (
                lambda: passthrough.ModelInfer(kserve_request_),
                [passthrough_process.pid, triton_pid]),
            "gateway Predict": (lambda: deployments.Predict(predict, metadata=token),
                                [inference.process.pid]),
            "gateway KServe-v2": (lambda: kserve.ModelInfer(kserve_request_, metadata=token),
                                  [inference.process.pid]),
            "reference: gateway Predict, Python data plane": (
                lambda: python_deployments.Predict(predict, metadata=python_token),
                [python_gateway.process.pid]),
        }
        results = await interleaved_rounds(paths)
        if mlserver is not None:
            reference = await start_mlserver(mlserver, root / "mlserver", module)
            mlserver_channel = open_channel(reference.grpc_target)
            mlserver_stub = service_pb2_grpc.GRPCInferenceServiceStub(mlserver_channel)
            mlserver_request = kserve_request(MODEL_NAME)
            try:
                results.update(await interleaved_rounds({
                    f"reference: MLServer {MLSERVER_VERSION} (KServe-v2, TorchScript)": (
                        lambda: mlserver_stub.ModelInfer(mlserver_request),
                        [reference.process.pid])}))
            finally:
                await mlserver_channel.close()
                reference.stop()
        direct_nobatch_request = kserve_request("nobatch.mlp.v1")
        batching = {  # each measured ROUNDS times, interleaved; medians reported
            "gateway on": lambda: deployments.Predict(predict, metadata=token),
            "gateway off": lambda: deployments.Predict(predict_nobatch, metadata=token),
            "direct on": lambda: direct.ModelInfer(direct_request),
            "direct off": lambda: direct.ModelInfer(direct_nobatch_request),
        }
        rounds: dict[str, list[float]] = {name: [] for name in batching}
        for _ in range(ROUNDS):
            for name, call in batching.items():
                rounds[name].append(await throughput(call, 32, THROUGHPUT_SECONDS))
        batched, unbatched, direct_batched, direct_unbatched = (
            statistics.median(rounds[name]) for name in batching)
    finally:
        await direct_channel.close()
        await gateway.close()
        await python_channel.close()
        await passthrough_channel.close()
        passthrough_process.terminate()
        passthrough_process.wait()

    base_p50, _, base_rps, _ = results["direct Triton (KServe-v2)"]
    rows = []
    for name, (p50, p99, rps, cpu_us) in results.items():
        rows.append((name, f"{p50:.2f}", f"{p99:.2f}", f"{p50 - base_p50:+.2f}", f"{rps:,.0f}",
                     f"{rps / base_rps:.2f}", f"{cpu_us:,.0f}"))
    rows.append(("dynamic batching on / off, c=32 (direct)", "-", "-", "-",
                 f"{direct_batched:,.0f} / {direct_unbatched:,.0f}",
                 f"{direct_batched / direct_unbatched:.2f}", "-"))
    rows.append(("dynamic batching on / off, c=32 (gateway)", "-", "-", "-",
                 f"{batched:,.0f} / {unbatched:,.0f}", f"{batched / unbatched:.2f}", "-"))
    rows.append(("gateway / direct, both with batching off, c=32", "-", "-", "-",
                 f"{unbatched:,.0f} / {direct_unbatched:,.0f}",
                 f"{unbatched / direct_unbatched:.2f}", "-"))
    return rows


def print_table(rows) -> None:
    header = ("path", "p50 ms c=1", "p99 ms c=1", "Δp50 vs direct", "req/s c=16",
              "ratio vs direct", "server CPU µs/req c=16")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print()
    for row in (header, *rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    print("goals: gateway p50 ≤ direct + 0.3 ms; throughput ≥ 0.9× direct; batching ≥ 3×")
    print("server CPU: every serving process of the path (hop + Triton and its model stubs), "
          "per request; the load generator shares the same 2 cores")
    print(f"every figure is the median of {ROUNDS} interleaved rounds; the gateway shares Triton "
          "calls among concurrent requests itself, so Triton's own batching switch matters little "
          "behind it")


if __name__ == "__main__":
    asyncio.run(main())
