"""Where benchmarks work: a temporary folder under MAAS_BENCH_DIR (default .maas/bench in the
checkout, on the disk rather than a small /tmp), removed when the run ends."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BENCH_DIR_ENV = "MAAS_BENCH_DIR"


def bench_root() -> Path:
    """MAAS_BENCH_DIR (default .maas/bench), created when missing; caches may live here."""
    root = Path(os.environ.get(BENCH_DIR_ENV, ".maas/bench"))
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextmanager
def bench_workdir() -> Iterator[Path]:
    """A fresh folder under `bench_root()`, removed with what is in it on exit."""
    with tempfile.TemporaryDirectory(dir=bench_root()) as directory:
        yield Path(directory)
