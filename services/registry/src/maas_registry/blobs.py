"""Content-addressed blob store on a filesystem: sha256 names, atomic commit, streaming reads.

An upload streams into `staging/` while its sha256 is computed, is fsynced, and only then
renamed to `sha256/<ab>/<digest>`: a reader can never see a partial blob, and two artifacts
with the same bytes share one file. Which blobs are still referenced is the database's
business; `collect` removes the files nobody references.

Collection runs beside uploads. Two things keep it from deleting what an upload is about to
record: this process's uploads in progress are never swept from staging, and the
`CommitGate` keeps a collection from running between an upload moving its blob into place
and recording the version that references it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from maas_runtime.errors import InvalidArgument, NotFound, OutOfRange, ResourceExhausted

_SHA256_HEX = frozenset("0123456789abcdef")


def is_sha256_hex(value: str) -> bool:
    return len(value) == 64 and set(value) <= _SHA256_HEX


@dataclass(frozen=True)
class StagedBlob:
    """A fully written, fsynced upload waiting to be committed (or discarded)."""

    path: Path
    sha256: str
    size_bytes: int


class BlobStore:
    """sha256-addressed files under `root`, written atomically."""

    def __init__(self, root: Path):
        self.root = root
        self._staging = root / "staging"
        self._objects = root / "sha256"
        self._staging.mkdir(parents=True, exist_ok=True)
        self._objects.mkdir(parents=True, exist_ok=True)
        # Staging names carry host and pid so collection can tell abandoned uploads apart.
        self._owner = f"{socket.gethostname()}-{os.getpid()}"
        # Staging files of this process's uploads not yet committed or discarded.
        self._uploading: set[Path] = set()
        self.bytes_received = 0
        """Bytes streamed into staging by this process (uploads), for the metrics."""
        self.bytes_sent = 0
        """Bytes read out by `read_chunks` in this process (downloads), for the metrics."""

    def path_of(self, sha256: str) -> Path:
        if not is_sha256_hex(sha256):
            raise InvalidArgument.for_field("sha256", f"{sha256!r} is not a sha256 hex digest")
        return self._objects / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path_of(sha256).exists()

    def new_staging_writer(self, max_bytes: int) -> StagingWriter:
        path = self._staging / f"{self._owner}-{uuid.uuid4().hex}.part"
        self._uploading.add(path)
        return StagingWriter(path, max_bytes, on_abort=self._uploading.discard)

    async def put_stream(self, chunks: AsyncIterator[bytes], max_bytes: int) -> StagedBlob:
        """Write `chunks` to staging, hashing as they come; the caller commits or discards.

        Hashing, writing and fsync run in a worker thread: a multi-GiB upload must not stall
        health checks and every other RPC on the event loop.
        """
        writer = self.new_staging_writer(max_bytes)
        try:
            async for chunk in chunks:
                await asyncio.to_thread(writer.write, chunk)
                self.bytes_received += len(chunk)
            return await asyncio.to_thread(writer.finish)
        except BaseException:
            writer.abort()
            raise

    def commit(self, staged: StagedBlob) -> Path:
        """Move a staged upload into place under its digest (a no-op copy when it exists)."""
        target = self.path_of(staged.sha256)
        target.parent.mkdir(exist_ok=True)
        if target.exists():
            staged.path.unlink(missing_ok=True)
            os.utime(target)  # fresh mtime: collection's grace period protects it again
        else:
            os.replace(staged.path, target)
            _fsync_directory(target.parent)
        self._uploading.discard(staged.path)
        return target

    def discard(self, staged: StagedBlob) -> None:
        staged.path.unlink(missing_ok=True)
        self._uploading.discard(staged.path)

    def read_chunks(self, sha256: str, offset: int, chunk_bytes: int) -> Iterator[bytes]:
        """The blob's bytes from `offset`, in chunks; OUT_OF_RANGE beyond its end."""
        path = self.path_of(sha256)
        try:
            handle = path.open("rb")
        except FileNotFoundError:
            raise NotFound("blob", sha256) from None
        with handle:
            size = os.fstat(handle.fileno()).st_size
            if offset < 0 or offset > size:
                raise OutOfRange(f"offset {offset} is beyond the artifact's {size} bytes",
                                 reason="OFFSET_OUT_OF_RANGE",
                                 metadata={"size_bytes": str(size)})
            handle.seek(offset)
            while chunk := handle.read(chunk_bytes):
                self.bytes_sent += len(chunk)
                yield chunk

    def collect_one(self, sha256: str, grace_seconds: float) -> bool:
        """Delete one unreferenced blob unless it was (re)committed within the grace period."""
        path = self.path_of(sha256)
        try:
            if path.stat().st_mtime > time.time() - grace_seconds:
                return False
            path.unlink()
        except FileNotFoundError:
            return False
        return True

    def stored_bytes(self) -> tuple[int, int]:
        """(blobs, bytes) committed under the store: a directory walk, so call it rarely."""
        count = total = 0
        for shard in os.scandir(self._objects):
            if shard.is_dir():
                for entry in os.scandir(shard.path):
                    with contextlib.suppress(FileNotFoundError):  # collected meanwhile
                        total += entry.stat().st_size
                        count += 1
        return count, total

    def stored_digests(self) -> set[str]:
        return {p.name for p in self._objects.glob("??/*") if is_sha256_hex(p.name)}

    def collect(self, referenced: set[str], grace_seconds: float) -> list[str]:
        """Delete unreferenced blobs and abandoned staging files older than the grace period."""
        deadline = time.time() - grace_seconds
        removed = []
        for digest in self.stored_digests() - referenced:
            path = self.path_of(digest)
            try:
                if path.stat().st_mtime <= deadline:
                    path.unlink()
                    removed.append(digest)
            except FileNotFoundError:
                continue
        for staged in self._staging.glob("*.part"):
            if staged in self._uploading:
                continue  # an upload of ours still receiving or about to commit
            try:
                writer = self._staging_writer(staged)
                if writer == "live":
                    continue  # a running process on this host is still receiving it
                if writer == "dead" or staged.stat().st_mtime <= deadline:
                    staged.unlink()
            except FileNotFoundError:
                continue
        return removed

    @staticmethod
    def _staging_writer(staged: Path) -> Literal["live", "dead", "elsewhere"]:
        """Who writes a staging file (`<host>-<pid>-<uuid>.part`): "live", a running process on
        this host (a replica sharing the blob directory included), never swept whatever its
        age; "dead", a process of this host that is gone; "elsewhere", another host or an
        unknown writer, which only the grace period may expire."""
        host, _, pid = staged.name.rsplit("-", 1)[0].rpartition("-")
        if host != socket.gethostname() or not pid.isdigit():
            return "elsewhere"
        if int(pid) == os.getpid():
            return "live"
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return "dead"
        except PermissionError:
            return "live"
        return "live"


class StagingWriter:
    """One upload in progress: bytes appended, hashed and counted; size limit enforced."""

    def __init__(self, path: Path, max_bytes: int,
                 on_abort: Callable[[Path], None] = lambda path: None):
        self.path = path
        self._max_bytes = max_bytes
        self._on_abort = on_abort
        self._digest = hashlib.sha256()
        self._size = 0
        self._handle = path.open("xb")

    def write(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size > self._max_bytes:
            raise ResourceExhausted(
                f"artifact exceeds the limit of {self._max_bytes} bytes",
                reason="ARTIFACT_TOO_LARGE", metadata={"limit_bytes": str(self._max_bytes)})
        self._digest.update(chunk)
        self._handle.write(chunk)

    def finish(self) -> StagedBlob:
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        return StagedBlob(self.path, self._digest.hexdigest(), self._size)

    def abort(self) -> None:
        if not self._handle.closed:
            self._handle.close()
        self.path.unlink(missing_ok=True)
        self._on_abort(self.path)


class CommitGate:
    """Uploads hold it shared from moving their blob into place until their version is
    recorded; a collection holds it alone. So a collection never sees a committed blob whose
    version is not recorded yet, whatever the grace period (within this process; replicas
    sharing a blob directory still rely on the grace period)."""

    def __init__(self) -> None:
        self._changed = asyncio.Condition()
        self._commits = 0
        self._collecting = False

    @contextlib.asynccontextmanager
    async def committing(self) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: not self._collecting)
            self._commits += 1
        try:
            yield
        finally:
            async with self._changed:
                self._commits -= 1
                self._changed.notify_all()

    @contextlib.asynccontextmanager
    async def collecting(self) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: not self._collecting and not self._commits)
            self._collecting = True
        try:
            yield
        finally:
            async with self._changed:
                self._collecting = False
                self._changed.notify_all()


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
