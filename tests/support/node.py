"""Runs Node.js scripts with the repository's grpc-js tooling (tools/node_modules)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROTOS = REPO / "protos"
NODE_MODULES = REPO / "tools" / "node_modules"
INSTALL_HINT = "run `make install` (npm tools, Debian protobuf-compiler/libprotobuf-dev/-java)"


async def run_node(tmp_path: Path, script: str, *args: str, timeout: float = 30) -> dict:
    """Run a node script with the tools' node_modules and return the JSON it prints."""
    if shutil.which("node") is None:
        pytest.fail(f"node not found; {INSTALL_HINT}")  # fail, not skip: it would guard nothing
    if not (NODE_MODULES / "@grpc/grpc-js").is_dir():
        pytest.fail(f"{NODE_MODULES}/@grpc/grpc-js missing; {INSTALL_HINT}")
    path = tmp_path / "client.js"
    path.write_text(script)
    process = await asyncio.create_subprocess_exec(
        "node", str(path), *args, env={**os.environ, "NODE_PATH": str(NODE_MODULES)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=timeout)
    assert process.returncode == 0, stderr.decode()
    return json.loads(stdout)
