"""SDK predict benchmark: `maas.Client.predict` vs raw tritonclient (gRPC), same deployment.

Both clients talk to the inference service's public port (the gateway, its native data
plane) with the same bearer token, the same model (the 64→128→10 MLP maas-package of
bench_inference, dynamic batching on) and the same batch of BATCH rows: the SDK through
Predict with numpy in and out, tritonclient through the standard KServe-v2 ModelInfer with
its own `InferInput.set_data_from_numpy` / `as_numpy`. Sequential calls (c=1, latency
bound) and CONCURRENCY threads sharing one client each (throughput); ROUNDS interleaved
rounds of WINDOW_SECONDS per path, medians printed side by side.

Goal: the SDK's throughput ≥ 0.9× tritonclient's.

Run: `make bench` (or `.venv/bin/python -m tests.bench.bench_sdk`).
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import maas
import numpy as np
import tritonclient.grpc as triton_grpc

from tests.bench.bench_inference import write_package
from tests.support.bench import bench_workdir
from tests.support.processes import ServiceProcess

ROUNDS = 7
WINDOW_SECONDS = 2.0
BATCH = 8
CONCURRENCIES = (1, 8)
DEPLOYMENT = "bench-sdk"


def throughput(call: Callable[[], object], concurrency: int, seconds: float) -> float:
    """Calls per second of `call` from `concurrency` threads during `seconds`."""
    counts = [0] * concurrency
    stop_at = time.perf_counter() + seconds

    def worker(slot: int) -> None:
        while time.perf_counter() < stop_at:
            call()
            counts[slot] += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(slot,)) for slot in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.perf_counter() - started)


def main() -> None:
    with bench_workdir() as root:
        registry = ServiceProcess("registry", root / "registry")
        inference = ServiceProcess("inference", root / "inference", registry_target=registry.target,
                                   client_token_file=str(root / "registry" / "admin.token"))
        asyncio.run(registry.start())
        try:
            asyncio.run(inference.start(timeout=180))
            run(root, registry, inference)
        finally:
            inference.terminate()
            registry.terminate()


def run(root: Path, registry: ServiceProcess, inference: ServiceProcess) -> None:
    token = inference.admin_token()
    registry_token = registry.admin_token()
    package = root / "mlp.safetensors"
    write_package(package)
    with maas.Client(targets={"registry": registry.target}, token=registry_token) as admin:
        admin.upload_model("mlp", package)
    # The gateway resolves versions with its own registry token; this client holds the
    # inference service's token, and is not asked for a signature (inputs are named).
    client = maas.Client(targets={"inference": inference.target}, token=token)
    client.deploy(DEPLOYMENT, "mlp/1", max_batch_size=32)
    rows = np.random.default_rng(0).normal(size=(BATCH, 64)).astype(np.float32)
    triton = triton_grpc.InferenceServerClient(url=inference.target)
    headers = {"authorization": f"Bearer {token}"}

    def sdk_predict() -> np.ndarray:
        return client.predict(DEPLOYMENT, {"input": rows})["logits"]

    def tritonclient_infer() -> np.ndarray:
        request = triton_grpc.InferInput("input", list(rows.shape), "FP32")
        request.set_data_from_numpy(rows)
        reply = triton.infer(DEPLOYMENT, [request], headers=headers)
        return reply.as_numpy("logits")

    np.testing.assert_allclose(sdk_predict(), tritonclient_infer(), rtol=1e-5)
    paths = {"tritonclient (grpc, ModelInfer)": tritonclient_infer,
             "maas.Client.predict (Predict)": sdk_predict}
    for call in paths.values():  # warm-up: channels, Triton's first batches
        throughput(call, 1, 0.5)
    measured: dict[tuple[str, int], list[float]] = {}
    for _ in range(ROUNDS):
        for concurrency in CONCURRENCIES:
            for name, call in paths.items():
                measured.setdefault((name, concurrency), []).append(
                    throughput(call, concurrency, WINDOW_SECONDS))
    client.close()
    triton.close()
    print_table(measured, list(paths))


def print_table(measured: dict[tuple[str, int], list[float]], names: list[str]) -> None:
    base = names[0]
    header = ["path (same deployment, via the gateway)"]
    for concurrency in CONCURRENCIES:
        header += [f"calls/s c={concurrency}", f"ratio c={concurrency}"]
    rows = [header]
    for name in names:
        row = [name]
        for concurrency in CONCURRENCIES:
            value = statistics.median(measured[(name, concurrency)])
            base_value = statistics.median(measured[(base, concurrency)])
            row += [f"{value:,.0f}", f"{value / base_value:.3f}"]
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    print()
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    print(f"goal: SDK throughput ≥ 0.9× tritonclient; batch {BATCH}×64 FP32, medians of "
          f"{ROUNDS} interleaved {WINDOW_SECONDS:.0f} s windows, one client per path shared by "
          "its threads")


if __name__ == "__main__":
    main()
