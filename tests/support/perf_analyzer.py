"""Runs NVIDIA's perf_analyzer (unmodified, from the tritonclient 2.41.0 wheel) and reads its
CSV report.

`make install` puts the binary in `.venv/perf-analyzer/bin/` (the suite's own tritonclient is
newer and no longer ships it). Even on CPU it loads libcudart.so.12, which comes from the
nvidia-cuda-runtime-cu12 wheel and is put on LD_LIBRARY_PATH here; libb64 comes from apt.
"""

from __future__ import annotations

import asyncio
import csv
import importlib.util
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path


def perf_analyzer_binary() -> Path:
    binary = Path(sys.prefix) / "perf-analyzer" / "bin" / "perf_analyzer"
    if not os.access(binary, os.X_OK):
        raise FileNotFoundError(f"{binary} is missing: run `make install`")
    return binary


def perf_analyzer_environment() -> dict[str, str]:
    spec = importlib.util.find_spec("nvidia.cuda_runtime")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the nvidia-cuda-runtime-cu12 wheel is missing: run `make install`")
    libraries = os.path.join(list(spec.submodule_search_locations)[0], "lib")
    existing = os.environ.get("LD_LIBRARY_PATH", "")
    return {**os.environ, "LD_LIBRARY_PATH": f"{libraries}:{existing}" if existing else libraries}


@dataclass(frozen=True)
class PerfFigures:
    """One concurrency level of a perf_analyzer run."""

    concurrency: int
    throughput: float
    """Inferences per second."""
    p50_ms: float
    p99_ms: float


@dataclass(frozen=True)
class PerfRun:
    returncode: int
    output: str
    figures: tuple[PerfFigures, ...]


async def run_perf_analyzer(target: str, model: str, *, concurrency: int = 1,
                            token: str = "", measurement_ms: int = 500,
                            stability_percent: int = 20, max_trials: int = 9,
                            extra: tuple[str, ...] = (), timeout: float = 120.0) -> PerfRun:
    """perf_analyzer over gRPC against `target` for `model` (a subprocess, so servers on this
    event loop keep serving). `token` goes as perf_analyzer's own `-H` header."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.csv"
        arguments = ["-i", "grpc", "-u", target, "-m", model,
                     "--concurrency-range", f"{concurrency}:{concurrency}",
                     "--measurement-interval", str(measurement_ms),
                     "--max-trials", str(max_trials), "-s", str(stability_percent),
                     "-f", str(report), *extra]
        if token:
            arguments += ["-H", f"authorization: Bearer {token}"]
        process = await asyncio.create_subprocess_exec(
            os.fspath(perf_analyzer_binary()), *arguments, env=perf_analyzer_environment(),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        try:
            output, _ = await asyncio.wait_for(process.communicate(), timeout)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
        figures = []
        if report.exists():
            with report.open() as handle:
                for row in csv.DictReader(handle):
                    figures.append(PerfFigures(
                        int(row["Concurrency"]), float(row["Inferences/Second"]),
                        int(row["p50 latency"]) / 1000, int(row["p99 latency"]) / 1000))
        return PerfRun(process.returncode, output.decode(errors="replace"), tuple(figures))
