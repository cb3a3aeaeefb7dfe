"""Gateway benchmark with a standard client: perf_analyzer, direct Triton vs the gateway.

NVIDIA's perf_analyzer (unmodified, tritonclient 2.41.0) drives the same model (64→128→10 MLP
maas-package, dynamic batching on) through two doors: Triton's own gRPC port, and the
inference service's public port (its native data plane) with a bearer token sent by
perf_analyzer's `-H`. Concurrency 1 (latency) and 16 (throughput), ROUNDS rounds taking turns;
medians printed side by side. The registry and the inference service (which supervises the
bundled tritonserver) run as subprocesses.

Goals: throughput at c=16 ≥ 0.95× direct; p50 at c=1 ≤ direct + 0.15 ms.

Run: `make bench` (or `.venv/bin/python -m tests.bench.bench_gateway`).
"""

from __future__ import annotations

import asyncio
import statistics

from tests.bench.bench_inference import deploy, register_package
from tests.support.bench import bench_workdir
from tests.support.perf_analyzer import PerfFigures, run_perf_analyzer
from tests.support.processes import ServiceProcess, free_port, inference_process

ROUNDS = 3
MEASUREMENT_MS = 1500
STABILITY_PERCENT = 50
"""perf_analyzer's default (10%) is rarely met on 2 cores shared with the load generator."""
CONCURRENCIES = (1, 16)


async def measure(target: str, model: str, concurrency: int, token: str = "") -> PerfFigures:
    run = await run_perf_analyzer(target, model, concurrency=concurrency, token=token,
                                  measurement_ms=MEASUREMENT_MS,
                                  stability_percent=STABILITY_PERCENT, max_trials=12, timeout=300)
    if run.returncode != 0 or len(run.figures) != 1:
        raise RuntimeError(f"perf_analyzer failed against {target} ({model}):\n{run.output}")
    return run.figures[0]


async def main() -> None:
    with bench_workdir() as root:
        registry = ServiceProcess("registry", root / "registry")
        await registry.start()
        triton_port = free_port()
        inference = inference_process(root, registry, triton_grpc_port=str(triton_port))
        try:
            await inference.start(timeout=120)
            await register_package(root, registry)
            async with inference.stub() as admin:
                await deploy(admin, "bench", True)
            paths = {
                "direct Triton": (f"127.0.0.1:{triton_port}", "bench.mlp.v1", ""),
                "gateway (data plane, token)": (inference.target, "bench",
                                                inference.admin_token()),
            }
            measured: dict[tuple[str, int], list[PerfFigures]] = {}
            for _ in range(ROUNDS):
                for concurrency in CONCURRENCIES:
                    for name, (target, model, token) in paths.items():
                        figures = await measure(target, model, concurrency, token)
                        measured.setdefault((name, concurrency), []).append(figures)
        finally:
            inference.terminate()
            registry.terminate()
    print_table(measured, list(paths))


def print_table(measured: dict[tuple[str, int], list[PerfFigures]], names: list[str]) -> None:
    def median(name: str, concurrency: int, attribute: str) -> float:
        return statistics.median(getattr(f, attribute) for f in measured[(name, concurrency)])

    base = names[0]
    base_p50, base_rps = median(base, 1, "p50_ms"), median(base, 16, "throughput")
    header = ("path (perf_analyzer, gRPC)", "p50 ms c=1", "Δp50 vs direct", "p99 ms c=1",
              "infer/s c=16", "ratio vs direct", "p50 ms c=16")
    rows = [header]
    for name in names:
        p50, rps = median(name, 1, "p50_ms"), median(name, 16, "throughput")
        rows.append((name, f"{p50:.3f}", f"{p50 - base_p50:+.3f}",
                     f"{median(name, 1, 'p99_ms'):.3f}", f"{rps:,.0f}", f"{rps / base_rps:.3f}",
                     f"{median(name, 16, 'p50_ms'):.3f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    print()
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    print("goals: gateway throughput at c=16 ≥ 0.95× direct; gateway p50 at c=1 ≤ direct "
          "+ 0.15 ms")
    print(f"every figure is the median of {ROUNDS} interleaved perf_analyzer runs "
          f"({MEASUREMENT_MS} ms windows, stable within {STABILITY_PERCENT}%); same model, dynamic "
          "batching on")


if __name__ == "__main__":
    asyncio.run(main())
