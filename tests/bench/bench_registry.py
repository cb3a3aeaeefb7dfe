"""Registry benchmark: artifact streaming vs a plain file copy, memory, and paged listing.

Prints one table. Measures, in one run on this machine:
- upload then download of a generated 1 GiB artifact through the registry, against copying
  the same file twice on the same disk (throughput ratio; goal ≥ 0.5);
- the registry process's peak RSS for a 128 MiB and a 1 GiB artifact (goal < 200 MB and flat:
  it streams, never buffers whole files);
- ListModelVersions p50 per page over a model with 10,000 versions.

Run: `make bench` (or `.venv/bin/python -m tests.bench.bench_registry`).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from maas.registry.v1 import model_pb2, registry_service_pb2 as rs, registry_service_pb2_grpc
from sqlalchemy import insert, select

from tests.support.artifacts import varint
from tests.support.bench import bench_workdir
from tests.support.processes import RegistryProcess

CHUNK = 1024 * 1024


def write_artifact(path: Path, size: int) -> str:
    """An ONNX-framed artifact of `size` payload bytes; returns its sha256."""
    digest = hashlib.sha256()
    block = os.urandom(CHUNK)
    with path.open("wb") as handle:
        head = b"\x08\x07\x3a" + varint(size)
        handle.write(head)
        digest.update(head)
        for _ in range(size // CHUNK):
            handle.write(block)
            digest.update(block)
    return digest.hexdigest()


async def upload_file(stub, path: Path, sha256: str):
    async def requests():
        yield rs.UploadModelVersionRequest(header=rs.UploadModelVersionHeader(
            parent="models/bench", expected_sha256=sha256, size_bytes=path.stat().st_size,
            model_version=model_pb2.ModelVersion(format=model_pb2.MODEL_FORMAT_ONNX)))
        with path.open("rb") as handle:
            while chunk := handle.read(CHUNK):
                yield rs.UploadModelVersionRequest(chunk=chunk)

    return await stub.UploadModelVersion(requests())


async def download_file(stub, name: str, path: Path) -> None:
    with path.open("wb") as handle:
        async for message in stub.DownloadModelVersion(rs.DownloadModelVersionRequest(name=name)):
            if message.WhichOneof("content") == "chunk":
                handle.write(message.chunk)


async def stream_round_trip(work: Path, size: int) -> dict:
    registry = RegistryProcess(work / f"state-{size}")
    registry.settings["max_artifact_bytes"] = str(4 * 1024**3)
    await registry.start()
    try:
        source, copy_a, copy_b, fetched = (work / f"{n}-{size}" for n in ("src", "a", "b", "dl"))
        sha256 = write_artifact(source, size)
        os.sync()
        started = time.perf_counter()
        shutil.copyfile(source, copy_a)
        shutil.copyfile(copy_a, copy_b)
        os.sync()
        copy_seconds = time.perf_counter() - started
        async with registry.stub() as channel:
            stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
            await stub.CreateModel(rs.CreateModelRequest(model_id="bench"))
            started = time.perf_counter()
            version = await upload_file(stub, source, sha256)
            await download_file(stub, version.name, fetched)
            os.sync()
            registry_seconds = time.perf_counter() - started
        if hashlib.sha256(fetched.read_bytes()).hexdigest() != sha256:
            raise AssertionError("downloaded bytes differ")
        peak_rss = registry.peak_rss_bytes()
        for path in (source, copy_a, copy_b, fetched):
            path.unlink()
        return {"copy_s": copy_seconds, "registry_s": registry_seconds,
                "peak_rss": peak_rss, "bytes": size}
    finally:
        registry.terminate()
        shutil.rmtree(work / f"state-{size}", ignore_errors=True)


def seed_versions(state_dir: Path, count: int) -> None:
    """Insert `count` versions straight into the registry database (setup, not measured)."""
    from maas_registry.database import create_database_engine, migrate
    from maas_registry.schema import model_versions, models

    engine = create_database_engine(f"sqlite:///{state_dir / 'registry.db'}")
    migrate(engine)
    now = datetime.now(UTC)
    with engine.begin() as connection:
        connection.execute(insert(models).values(
            model_id="many", display_name="", description="", task="", labels={},
            create_time=now, update_time=now, etag="x", last_version_id=count))
        model_pk = connection.execute(select(models.c.pk)).scalar_one()
        connection.execute(insert(model_versions), [
            {"model_pk": model_pk, "version_id": n, "format": "onnx", "sha256": "0" * 64,
             "size_bytes": 1, "signature": {}, "metrics": {"accuracy": 0.9}, "labels": {},
             "lineage": {}, "description": "", "creator": "bench", "create_time": now,
             "etag": "x"} for n in range(1, count + 1)])
    engine.dispose()


async def list_pages(work: Path, count: int) -> dict:
    state = work / "state-list"
    state.mkdir()
    seed_versions(state, count)
    registry = RegistryProcess(state)
    await registry.start()
    try:
        async with registry.stub() as channel:
            stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
            timings, token, seen = [], "", 0
            while True:
                started = time.perf_counter()
                page = await stub.ListModelVersions(rs.ListModelVersionsRequest(
                    parent="models/many", page_size=100, page_token=token))
                timings.append((time.perf_counter() - started) * 1000)
                seen += len(page.model_versions)
                token = page.next_page_token
                if not token:
                    break
        if seen != count:
            raise AssertionError(f"paged through {seen} of {count} versions")
        return {"p50_ms": statistics.median(timings),
                "p99_ms": statistics.quantiles(timings, n=100)[98], "pages": len(timings)}
    finally:
        registry.terminate()


async def main() -> None:
    with bench_workdir() as work:
        small = await stream_round_trip(work, 128 * 1024**2)
        large = await stream_round_trip(work, 1024**3)
        listing = await list_pages(work, 10_000)
    gib = 1024**3

    def throughput(result, seconds_key):
        return 2 * result["bytes"] / result[seconds_key] / gib  # two passes over the bytes

    rows = [
        ("1 GiB upload+download, GiB/s", f"{throughput(large, 'registry_s'):.2f}",
         f"{throughput(large, 'copy_s'):.2f} (2× cp)",
         f"{large['copy_s'] / large['registry_s']:.2f}", "≥ 0.5"),
        ("128 MiB upload+download, GiB/s", f"{throughput(small, 'registry_s'):.2f}",
         f"{throughput(small, 'copy_s'):.2f} (2× cp)",
         f"{small['copy_s'] / small['registry_s']:.2f}", "≥ 0.5"),
        ("registry peak RSS, MB (128 MiB → 1 GiB)",
         f"{small['peak_rss'] / 1e6:.0f} → {large['peak_rss'] / 1e6:.0f}", "-",
         f"{large['peak_rss'] / small['peak_rss']:.2f}", "< 200 MB, flat"),
        ("ListModelVersions p50 / p99 ms (10,000 versions, 100/page)",
         f"{listing['p50_ms']:.2f} / {listing['p99_ms']:.2f}", "-", f"{listing['pages']} pages",
         "-"),
    ]
    widths = [max(len(str(r[i])) for r in rows + [("measure", "registry", "reference",
                                                      "ratio", "goal")]) for i in range(5)]
    header = ("measure", "registry", "reference", "ratio", "goal")
    print()
    for row in (header, *rows):
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))
    sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(main())
