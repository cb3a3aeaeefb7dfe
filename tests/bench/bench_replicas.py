"""Replicas benchmark: the same Predict load on one gateway, then balanced over two.

Two inference services, each supervising its own bundled Triton, serve the same model (the
64→128→10 MLP maas-package of bench_inference, dynamic batching on) from one registry. The
load is `maas.Client.predict` from THREADS threads for SECONDS: first with the client given
one gateway, then with both (`inference=a,b`: round-robin over the healthy ones, the SDK's
replica path). The two set-ups take turns for ROUNDS rounds; medians are printed with the
two-gateway/one-gateway ratio, and the CPU seconds each gateway's process tree (service, data
plane, Triton and its model stubs) spent, which shows that both replicas did the work.

On a 2-core machine the client, two data planes and two Tritons share the same cores, so the
ratio is bounded by the CPU, not by the replicas: the point is that it does not fall (nothing
serialises across replicas), not that it doubles.

Run: `.venv/bin/python -m tests.bench.bench_replicas`.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import threading
import time

import maas
import numpy as np
from maas_runtime.auth import ensure_admin_token
from maas_runtime.client import open_channel

from tests.bench.bench_inference import deploy, register_package
from tests.support.bench import bench_workdir
from tests.support.processes import ServiceProcess, inference_process, process_tree_cpu_seconds

THREADS = 8
SECONDS = 6.0
WARM_UP_SECONDS = 1.0
ROUNDS = 3
DEPLOYMENT = "bench"
ROWS = np.random.default_rng(0).random((1, 64)).astype(np.float32)


def predict_load(client: maas.Client, seconds: float) -> tuple[float, list[float]]:
    """THREADS threads predicting for `seconds`: requests per second and every latency (ms)."""
    latencies: list[list[float]] = [[] for _ in range(THREADS)]
    stop_at = time.perf_counter() + seconds

    failures: list[maas.MaasError] = []

    def worker(timings: list[float]) -> None:
        while (started := time.perf_counter()) < stop_at:
            try:
                client.predict(DEPLOYMENT, {"input": ROWS})
            except maas.MaasError as error:
                failures.append(error)
                return
            timings.append((time.perf_counter() - started) * 1000)

    threads = [threading.Thread(target=worker, args=(timings,)) for timings in latencies]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if failures:
        raise failures[0]
    every = [latency for timings in latencies for latency in timings]
    return len(every) / elapsed, every


def measure(client: maas.Client, gateways: list[ServiceProcess]) -> tuple[float, ...]:
    """Requests/s, p50 and p99 (ms) of one load run, and the CPU seconds of each gateway."""
    predict_load(client, WARM_UP_SECONDS)
    cpu_before = [process_tree_cpu_seconds([g.process.pid]) for g in gateways]
    rate, latencies = predict_load(client, SECONDS)
    cpu = [process_tree_cpu_seconds([g.process.pid]) - before
           for g, before in zip(gateways, cpu_before, strict=True)]
    return (rate, statistics.median(latencies), statistics.quantiles(latencies, n=100)[98],
            *cpu)


async def main() -> None:
    with bench_workdir() as root:
        registry = ServiceProcess("registry", root / "registry")
        await registry.start()
        # One tokens file for both gateways, so one token is good at either.
        ensure_admin_token(root / "admin.token", root / "tokens.json")
        gateways = [inference_process(root, registry, f"inference-{i}",
                                      tokens_file=str(root / "tokens.json"),
                                      admin_token_file=str(root / "admin.token"))
                    for i in range(2)]
        try:
            await asyncio.gather(*(gateway.start(timeout=180) for gateway in gateways))
            await register_package(root, registry)
            token = (root / "admin.token").read_text().strip()
            for gateway in gateways:  # each replica's own deployment of the same version
                async with open_channel(gateway.target, token=token) as admin:
                    await deploy(admin, DEPLOYMENT, True)
            setups = {
                "one gateway": maas.Client(targets={"inference": gateways[0].target},
                                           token=token),
                "two gateways (round-robin)": maas.Client(
                    targets={"inference": ",".join(g.target for g in gateways)}, token=token),
            }
            rounds: dict[str, list[tuple[float, ...]]] = {name: [] for name in setups}
            for _ in range(ROUNDS):
                for name, client in setups.items():
                    rounds[name].append(await asyncio.to_thread(measure, client, gateways))
            for client in setups.values():
                client.close()
        finally:
            for gateway in gateways:
                gateway.terminate()
            registry.terminate()
    print_table({name: tuple(statistics.median(column) for column in zip(*runs, strict=True))
                 for name, runs in rounds.items()})


def print_table(rows: dict[str, tuple[float, ...]]) -> None:
    one = rows["one gateway"][0]
    print(f"\nPredict, {THREADS} client threads (maas.Client), batch 1, {SECONDS:.0f} s per run, "
          f"median of {ROUNDS} interleaved rounds, {os.cpu_count()} cores")
    print(f"{'setup':28s} {'req/s':>8s} {'vs one':>7s} {'p50 ms':>7s} {'p99 ms':>7s} "
          f"{'CPU s gateway A':>16s} {'CPU s gateway B':>16s}")
    for name, (rate, p50, p99, cpu_a, cpu_b) in rows.items():
        print(f"{name:28s} {rate:8.0f} {rate / one:6.2f}x {p50:7.2f} {p99:7.2f} "
              f"{cpu_a:16.2f} {cpu_b:16.2f}")


if __name__ == "__main__":
    asyncio.run(main())
